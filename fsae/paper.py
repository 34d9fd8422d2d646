"""The paper's rows (``configs/paper/rows.yaml``): each row's chain of stages and the paper's numbers.

``load_rows(path)`` reads the table into ``Row`` dataclasses and checks every entry: each stage is one of
``STAGES``, each recipe path exists (relative to the repository root, the folder above ``configs/``), each
stage's input is an earlier stage that makes what it reads, and each paper number is a float in [0, 100]
with a citation (table, row, column). A bad entry raises ``FsaeError`` naming the file and the field.
The schema is described at the top of ``configs/paper/rows.yaml`` and in ``docs/paper_rows.md``.

``tiny_overrides(row, stage_id)``: the ``--set`` overrides of ``configs/paper/tiny.yaml`` that shrink one
stage of a row to CPU size (sizes only: that file's header); ``tiny_flags(stage)``: the command-line flags
of the stages without ``--set`` (crf, eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fsae.errors import FsaeError

ROWS_FILE = Path(__file__).resolve().parents[1] / "configs" / "paper" / "rows.yaml"
TINY_FILE = ROWS_FILE.with_name("tiny.yaml")

# stage -> what it writes
MAKES = {
    "train": "run", "cam": "seeds", "eval_seeds": "score", "crf": "masks", "irn": "masks", "psa": "masks",
    "eval_masks": "score", "seg_train": "seg_run", "seg_infer": "score",
}
STAGES = tuple(MAKES)
# stage -> what it reads (the kind an earlier stage makes)
READS = {"cam": "run", "eval_seeds": "seeds", "crf": "seeds", "irn": "seeds", "psa": "seeds",
         "eval_masks": "masks", "seg_train": "masks", "seg_infer": "seg_run"}
WITH_RECIPE = ("train", "seg_train", "irn", "psa")  # the stages whose settings come from a recipe file
WITH_SPLIT = ("cam", "eval_seeds", "eval_masks")
METRICS = ("miou", "fpr", "fnr")
DATASETS = ("voc", "coco")
STAGE_KEYS = {"stage", "id", "recipe", "input", "split", "set"}
NUMBER_KEYS = {"stage", "metric", "split", "value", "cite"}
CITE_KEYS = {"table", "row", "after", "column"}
ROW_KEYS = {"title", "dataset", "stages", "paper"}


@dataclass(frozen=True)
class Stage:
    """One step of a row's chain. ``input``: the id of the stage whose output it reads (None for train)."""

    stage: str
    id: str
    recipe: str | None = None
    input: str | None = None
    split: str | None = None
    set: tuple[str, ...] = ()


@dataclass(frozen=True)
class Citation:
    table: int
    row: str
    column: str
    after: str | None = None  # the base row that a '+ FSAE' / '+ Ours' row follows

    def text(self) -> str:
        """E.g. ``Table 1, row '+ FSAE' after 'SIPE [4] CVPR'22', column 'Seed'``."""
        after = f" after '{self.after}'" if self.after else ""
        return f"Table {self.table}, row '{self.row}'{after}, column '{self.column}'"


@dataclass(frozen=True)
class PaperNumber:
    """The paper's value (percent) of ``metric`` measured by stage ``stage`` (on ``split`` for seg_infer)."""

    name: str
    stage: str
    metric: str
    value: float
    cite: Citation
    split: str | None = None


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    dataset: str
    stages: tuple[Stage, ...]
    paper: dict[str, PaperNumber]

    def stage(self, stage_id: str) -> Stage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(f"row {self.name!r} has no stage {stage_id!r}")

    def recipes(self) -> list[str]:
        return [s.recipe for s in self.stages if s.recipe]


def repository_root(path: Path) -> Path:
    """The folder above the ``configs/`` folder holding ``path`` (recipe paths are relative to it), or
    ``path``'s folder when it is not under a ``configs/`` folder."""
    for parent in path.resolve().parents:
        if parent.name == "configs":
            return parent.parent
    return path.resolve().parent


def load_rows(path: str | Path = ROWS_FILE, root: str | Path | None = None) -> dict[str, Row]:
    """Every row of the table at ``path``, checked (module docstring); ``root``: where recipe paths start
    (default: ``repository_root(path)``)."""
    path = Path(path)
    if not path.is_file():
        raise FsaeError(f"{path}: rows file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FsaeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, dict) or not rows:
        raise FsaeError(f"{path}: expected a mapping 'rows' of row name -> row")
    base = Path(root) if root is not None else repository_root(path)
    return {name: _row(name, entry, _Where(path, f"rows.{name}"), base) for name, entry in rows.items()}


@dataclass(frozen=True)
class _Where:
    """The file and the dotted field an error names."""

    path: Path
    field: str

    def at(self, key: str | int) -> _Where:
        return _Where(self.path, f"{self.field}[{key}]" if isinstance(key, int) else f"{self.field}.{key}")

    def error(self, what: str) -> FsaeError:
        return FsaeError(f"{self.path}: {self.field}: {what}")


def _mapping(value: Any, where: _Where, allowed: set[str], required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise where.error(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise where.error(f"missing {missing}")
    return value


def _text(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"expected a non-empty string, got {value!r}")
    return value


def _row(name: str, entry: Any, where: _Where, root: Path) -> Row:
    entry = _mapping(entry, where, ROW_KEYS, ("title", "dataset", "stages", "paper"))
    dataset = _text(entry["dataset"], where.at("dataset"))
    if dataset not in DATASETS:
        raise where.at("dataset").error(f"{dataset!r} is not a data set; expected one of {list(DATASETS)}")
    stages = _stages(entry["stages"], where.at("stages"), root)
    numbers = entry["paper"]
    if not isinstance(numbers, dict) or not numbers:
        raise where.at("paper").error("expected a mapping of number name -> {stage, metric, value, cite}")
    paper = {key: _number(key, value, where.at("paper").at(key), stages) for key, value in numbers.items()}
    return Row(name, _text(entry["title"], where.at("title")), dataset, stages, paper)


def _stages(entries: Any, where: _Where, root: Path) -> tuple[Stage, ...]:
    if not isinstance(entries, list) or not entries:
        raise where.error("expected a list of stages")
    stages: list[Stage] = []
    for index, entry in enumerate(entries):
        stages.append(_stage(entry, where.at(index), stages, root))
    return tuple(stages)


def _stage(entry: Any, where: _Where, earlier: list[Stage], root: Path) -> Stage:
    entry = _mapping(entry, where, STAGE_KEYS, ("stage",))
    kind = entry["stage"]
    if kind not in STAGES:
        raise where.at("stage").error(f"{kind!r} is not a stage; known: {', '.join(STAGES)}")
    stage_id = _text(entry.get("id", kind), where.at("id"))
    if any(s.id == stage_id for s in earlier):
        raise where.at("id").error(f"{stage_id!r} is used twice in this row; give each stage its own id")
    recipe = entry.get("recipe")
    if kind in WITH_RECIPE:
        if recipe is None:
            raise where.at("recipe").error(f"stage {kind} needs a recipe")
        if not (root / _text(recipe, where.at("recipe"))).is_file():
            raise where.at("recipe").error(f"{recipe} not found under {root}")
    elif recipe is not None:
        raise where.at("recipe").error(f"stage {kind} takes no recipe (it reads its input's run)")
    split = entry.get("split")
    if split is not None and kind not in WITH_SPLIT:
        raise where.at("split").error(f"stage {kind} takes no split; only {', '.join(WITH_SPLIT)} do")
    if split is not None:
        _text(split, where.at("split"))
    overrides = entry.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise where.at("set").error(f"expected a list of KEY=VALUE overrides, got {overrides!r}")
    return Stage(kind, stage_id, recipe, _input(kind, entry.get("input"), where.at("input"), earlier), split,
                 tuple(overrides))


def _input(kind: str, given: Any, where: _Where, earlier: list[Stage]) -> str | None:
    """The id of the stage ``kind`` reads: ``given``, checked, or the nearest earlier maker of what it reads."""
    if kind not in READS:
        if given is not None:
            raise where.error(f"stage {kind} reads no other stage")
        return None
    wanted = READS[kind]
    if given is None:
        for stage in reversed(earlier):
            if MAKES[stage.stage] == wanted:
                return stage.id
        raise where.error(f"stage {kind} reads {wanted}, and no earlier stage makes it")
    for stage in earlier:
        if stage.id == given:
            if MAKES[stage.stage] != wanted:
                raise where.error(f"stage {kind} reads {wanted}; {given!r} ({stage.stage}) makes {MAKES[stage.stage]}")
            return given
    raise where.error(f"{given!r} is not an earlier stage of this row; earlier: {[s.id for s in earlier]}")


def _number(name: str, entry: Any, where: _Where, stages: tuple[Stage, ...]) -> PaperNumber:
    entry = _mapping(entry, where, NUMBER_KEYS, ("stage", "metric", "value", "cite"))
    by_id = {s.id: s for s in stages}
    stage_id = entry["stage"]
    if stage_id not in by_id or MAKES[by_id[stage_id].stage] != "score":
        scoring = [s.id for s in stages if MAKES[s.stage] == "score"]
        raise where.at("stage").error(f"{stage_id!r} is not a scoring stage of this row; expected one of {scoring}")
    metric = entry["metric"]
    if metric not in METRICS:
        raise where.at("metric").error(f"{metric!r} is not a metric; expected one of {list(METRICS)}")
    value = entry["value"]
    if not isinstance(value, float) or not 0.0 <= value <= 100.0:
        raise where.at("value").error(f"{value!r} is not allowed; expected a float in [0, 100] (a percentage, "
                                      f"written with its decimal point)")
    split = entry.get("split")
    if by_id[stage_id].stage == "seg_infer":
        if split not in ("val", "test"):
            raise where.at("split").error(f"{split!r}: a seg_infer number needs split val or test")
    elif split is not None:
        raise where.at("split").error(f"stage {stage_id!r} scores its own split ({by_id[stage_id].split}); "
                                      "leave split out")
    return PaperNumber(name, stage_id, metric, value, _citation(entry["cite"], where.at("cite")), split)


def _citation(entry: Any, where: _Where) -> Citation:
    entry = _mapping(entry, where, CITE_KEYS, ("table", "row", "column"))
    table = entry["table"]
    if not isinstance(table, int) or isinstance(table, bool) or table < 1:
        raise where.at("table").error(f"{table!r} is not a table number")
    after = entry.get("after")
    return Citation(table, _text(entry["row"], where.at("row")), _text(str(entry["column"]), where.at("column")),
                    None if after is None else _text(after, where.at("after")))


# ------------------------------------------------------------------------------------- the tiny overrides

TINY_VARIANT = {"train": ("model", "method", "cam"), "cam": ("model", "method", "cam"),
                "seg_train": ("model", "backbone", "resnet101"), "seg_infer": ("model", "backbone", "resnet101")}
WITH_SET = ("train", "cam", "irn", "psa", "seg_train", "seg_infer")


def load_tiny(path: str | Path = TINY_FILE) -> dict[str, Any]:
    """``{"stages": {stage: {variant: [KEY=VALUE, ...]}}, "flags": {stage: [flag, ...]}}``, checked."""
    path = Path(path)
    if not path.is_file():
        raise FsaeError(f"{path}: tiny overrides file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FsaeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    where = _Where(path, "stages")
    data = _mapping(data, _Where(path, "(top)"), {"stages", "flags"}, ("stages", "flags"))
    stages = _mapping(data["stages"], where, set(WITH_SET), ())
    for stage, variants in stages.items():
        for variant, overrides in _mapping(variants, where.at(stage), set(variants or {}), ("all",)).items():
            if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise where.at(stage).at(variant).error(f"expected a list of KEY=VALUE overrides, got {overrides!r}")
    flags = _mapping(data["flags"], _Where(path, "flags"), set(STAGES) - set(WITH_SET), ())
    for stage, given in flags.items():
        if not isinstance(given, list) or not all(isinstance(f, str) for f in given):
            raise _Where(path, f"flags.{stage}").error(f"expected a list of strings, got {given!r}")
    return data


def _recipe_of(row: Row, stage: Stage) -> Stage | None:
    """The stage whose recipe ``stage`` runs with: itself, or (cam, seg_infer) the stage it reads."""
    while stage.recipe is None and stage.input is not None:
        stage = row.stage(stage.input)
    return stage if stage.recipe else None


def tiny_overrides(row: Row, stage_id: str, tiny: dict[str, Any] | None = None,
                   root: str | Path | None = None) -> list[str]:
    """The tiny ``--set`` overrides of stage ``stage_id`` of ``row``: ``stages.<stage>.all``, then the list of
    its recipe's variant (train / cam: ``model.method``; seg_train / seg_infer: ``model.backbone``)."""
    tiny = load_tiny() if tiny is None else tiny
    stage = row.stage(stage_id)
    table = tiny["stages"].get(stage.stage)
    if table is None:
        return []
    out = list(table["all"])
    if stage.stage in TINY_VARIANT:
        section, key, default = TINY_VARIANT[stage.stage]
        source = _recipe_of(row, stage)
        recipe = Path(root or repository_root(ROWS_FILE)) / source.recipe
        settings = (yaml.safe_load(recipe.read_text()) or {}).get(section) or {}
        out += table.get(settings.get(key, default), [])
    return out


def tiny_flags(stage: str, tiny: dict[str, Any] | None = None) -> list[str]:
    """Command-line flags that shrink a stage without ``--set`` (crf: one worker process)."""
    tiny = load_tiny() if tiny is None else tiny
    return list(tiny["flags"].get(stage, []))
