"""The package's import graph has no cycles (docs/architecture.md: which module may import which).

Every import of one fsae module by another counts, also one inside a function: a deferred import keeps
start-up light, it does not make two modules that need each other into layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fsae

PACKAGE = Path(fsae.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Names of the ``fsae`` modules (and imported attributes) that the module ``name`` imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "fsae" or m.startswith("fsae.")}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        imports = imported_modules(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imports if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_finder_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_count():
    tree = ast.parse("import fsae.io\nimport torch\nfrom fsae.labels import x\ndef f():\n    import fsae.train\n")
    assert imported_modules(tree, "fsae.m", False) == {"fsae.io", "fsae.labels", "fsae.labels.x", "fsae.train"}
    tree = ast.parse("from . import io\nfrom .methods import cam\n")
    assert imported_modules(tree, "fsae.m", False) == {"fsae", "fsae.io", "fsae.methods", "fsae.methods.cam"}


def test_no_import_cycle_inside_fsae():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_irn_and_psa_share_refine_affinity_not_each_other():
    """What both random walks need lives in fsae.refine.affinity; neither method package imports the other."""
    graph = import_graph()
    for own, other in (("fsae.refine.irn", "fsae.refine.psa"), ("fsae.refine.psa", "fsae.refine.irn")):
        modules = [m for m in graph if m == own or m.startswith(own + ".")]
        assert len(modules) > 5  # the package was read
        crossing = {m: sorted(i for i in graph[m] if i == other or i.startswith(other + ".")) for m in modules}
        crossing = {m: found for m, found in crossing.items() if found}
        assert not crossing, f"{own} imports {other}: {crossing}"
    assert "fsae.refine.affinity" in graph["fsae.refine.psa.train"] | graph["fsae.refine.irn.train"]
