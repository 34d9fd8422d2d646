"""``fsae grid``: ablation grids over config fields x training seeds (the paper's Tables 7-10).

Every combination of the ``--vary`` values is trained once per ``--seeds`` seed, each into a normal run
directory, by one ``python -m fsae grid --only`` job per run calling the stage functions the CLI calls
(``fsae.stages``; the same files and stamps as ``fsae train``, ``cam``, ``eval --seeds`` by the run's
protocol, and with ``masks="crf"`` ``crf`` at the protocol's threshold (``seed_threshold``), or with ``masks="irn"``
``irn``, then ``eval --masks``). Each setting's row gives, over the
seeds, the median and the mean +- std (sample std, n - 1) of seed mIoU / FPR / FNR and pseudo-mask
mIoU / FPR / FNR, and the median of the runs' best thresholds (``fsae.compare.seed_spread``; single
runs of the same setting vary by about 2 mIoU, and PPC reports the median of three runs).

Layout below ``out``::

    <field>=<value>[,<field>=<value>]/seed=<s>/   a run directory; grid.log: the commands and their output
    base/seed=<s>/                                with ``base``: the recipe with fsae.enabled=false
    grid.md, grid.json, grid.html, grid_files/<field>.png   (mIoU vs value, error bars = std over seeds)

A rerun skips finished runs (``run_finished``: the same config, all epochs, evaluations written) and
resumes the others (training from its checkpoint, ``cam`` from the seeds already written). ``devices`` runs
one job per device side by side; one device (the default: the recipe's ``train.device``) runs them one at a
time. ``nproc`` trains each job with ``fsae train --nproc N`` (torchrun), one job at a time.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fsae.compare import run_summary, seed_spread, spread_cell
from fsae.config import Config, config_from_dict, load_config
from fsae.errors import ConfigError, FsaeError
from fsae.io import ensure_output_dir, write_json, write_text

MASK_KINDS = {"crf": ("crf", "crf"), "irn": ("irn_masks", "irn")}  # --masks -> (mask folder, eval/<name>.json)
METRICS = [("seed_miou", "Seed mIoU"), ("seed_fpr", "FPR"), ("seed_fnr", "FNR"), ("threshold", "best threshold"),
           ("mask_miou", "Pseudo-mask mIoU"), ("mask_fpr", "mask FPR"), ("mask_fnr", "mask FNR")]


class GridError(FsaeError):
    """A grid job failed; the message names the run and its log."""


@dataclass
class Vary:
    """One ``--vary key=v1,v2`` option: the texts as typed (used in ``--set`` and folder names) and their
    YAML values (used in the plots)."""

    key: str
    texts: list[str]
    values: list


@dataclass
class GridRun:
    """One training run of the grid."""

    setting: str  # folder name of the setting: "tau_fae=0.9", "tau_fae=0.9,kernel_size=5" or "base"
    values: dict  # the setting's values as typed, {"fsae.tau_fae": "0.9"}; {} for the base run
    seed: int
    run_dir: Path
    overrides: list[str]  # `fsae train --set` list: the grid's --set, then the setting's values, then train.seed
    cfg: Config


@dataclass
class GridSpec:
    config: str
    varies: list[Vary]
    seeds: list[int]
    out: Path
    base: bool = False
    masks: str | None = None  # None | "crf" | "irn"
    overrides: list[str] = field(default_factory=list)
    irn_config: str | None = None
    devices: list[str] | None = None
    nproc: int = 1


def _split_values(text: str) -> list[str]:
    """``"0.9,[1,2],x"`` -> ``["0.9", "[1,2]", "x"]``: commas inside brackets belong to the value."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def parse_vary(text: str) -> Vary:
    """``"fsae.tau_fae=0.85,0.9"`` -> Vary; ConfigError on a malformed option."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    texts = _split_values(raw) if sep else []
    if not key or not texts or any(t == "" for t in texts):
        raise ConfigError(f"--vary {text!r}: expected FIELD=V1,V2,..., e.g. fsae.tau_fae=0.9,0.95")
    if key == "train.seed":
        raise ConfigError(f"--vary {text!r}: training seeds are given with --seeds")
    if len(set(texts)) < len(texts):
        raise ConfigError(f"--vary {text!r}: a value is repeated")
    return Vary(key, texts, [yaml.safe_load(t) for t in texts])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def _short_keys(varies: Sequence[Vary]) -> dict[str, str]:
    """Folder-name label of each field: its last part (``tau_fae``), the whole key where two would clash."""
    last = [v.key.rsplit(".", 1)[-1] for v in varies]
    return {v.key: (s if last.count(s) == 1 else v.key) for v, s in zip(varies, last)}


def setting_name(texts: dict[str, str], short: dict[str, str]) -> str:
    """``{"fsae.tau_fae": "0.9", "fsae.kernel_size": "5"}`` -> ``"tau_fae=0.9,kernel_size=5"``."""
    return ",".join(f"{short[k]}={t.replace('/', '_')}" for k, t in texts.items())


def plan_grid(spec: GridSpec) -> list[GridRun]:
    """The grid's runs, base first (when asked), then the settings in ``--vary`` order, each for every seed.

    Every run's config is resolved here, so a wrong field or value stops the grid before anything runs.
    """
    keys = [v.key for v in spec.varies]
    if not keys:
        raise ConfigError("fsae grid: give at least one --vary FIELD=V1,V2")
    if len(set(keys)) < len(keys):
        raise ConfigError(f"fsae grid: a field is given twice in --vary ({', '.join(keys)})")
    if not spec.seeds:
        raise ConfigError("fsae grid: give at least one seed (--seeds 0,1,2)")
    short = _short_keys(spec.varies)
    settings: list[tuple[str, dict, list[str]]] = []
    if spec.base:
        settings.append(("base", {}, ["fsae.enabled=false"]))
    for combo in itertools.product(*(range(len(v.texts)) for v in spec.varies)):
        texts = {v.key: v.texts[i] for v, i in zip(spec.varies, combo)}
        settings.append((setting_name(texts, short), texts, [f"{k}={t}" for k, t in texts.items()]))
    runs = []
    for name, values, sets in settings:
        for seed in spec.seeds:
            overrides = [*spec.overrides, *sets, f"train.seed={seed}"]
            cfg = load_config(spec.config, overrides)
            runs.append(GridRun(name, values, seed, Path(spec.out) / name / f"seed={seed}", overrides, cfg))
    return runs


# ----------------------------------------------------------------------------------------- one run


def _eval_path(run_dir: Path, masks: str | None) -> list[Path]:
    """The evaluation files a finished run has: eval/seeds.json (+ eval/crf.json or eval/irn.json)."""
    paths = [run_dir / "eval" / "seeds.json"]
    if masks:
        paths.append(run_dir / "eval" / f"{MASK_KINDS[masks][1]}.json")
    return paths


def run_finished(run: GridRun, masks: str | None) -> bool:
    """Whether a rerun skips this run: its checkpoint was trained by this run's config (the hash a resume
    compares) for all ``train.epochs`` epochs and its evaluations exist. Another config is not finished: its
    job runs, and training refuses it naming the changed fields."""
    ckpt = run.run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file() or not all(p.is_file() for p in _eval_path(run.run_dir, masks)):
        return False
    from fsae.train import load_checkpoint

    state = load_checkpoint(ckpt)
    same = config_from_dict(state["config"], str(ckpt)).hash() == run.cfg.hash()
    return same and state.get("epoch") == run.cfg.train.epochs


def run_job(run: GridRun, spec: GridSpec, device: str | None = None) -> None:
    """Train, infer seeds, evaluate them (and make and evaluate pseudo-masks) for one run, in this process:
    the stage functions of ``fsae train / cam / eval / crf --threshold best / irn / eval --masks``
    (``fsae.stages``)."""
    import dataclasses

    from fsae.distributed import launch
    from fsae.stages import (cam_stage, crf_stage, eval_masks_stage, eval_seeds_stage, irn_recipe, irn_stage,
                             train_stage)

    cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, device=device or run.cfg.train.device))
    run_dir = ensure_output_dir(run.run_dir)
    if spec.nproc > 1:  # torchrun, as `fsae train --nproc N`
        launch(spec.nproc, ["train", spec.config, "--out", str(run_dir), "--device", cfg.train.device,
                            *(f"--set={o}" for o in run.overrides)])
    else:
        train_stage(cfg, run_dir, progress=False)
    cam_stage(run_dir, cfg, progress=False)
    seeds = eval_seeds_stage(run_dir / "seeds", cfg=cfg, out=run_dir / "eval" / "seeds.json", progress=False)
    print(f"{run_dir}: seed mIoU {100 * seeds['best']['miou']:.1f} at threshold {seeds['best']['threshold']:.2f}")
    if spec.masks == "crf":
        made = crf_stage(run_dir, cfg, progress=False)
        folders = [Path(g["out_dir"]) for g in made["groups"]]
    elif spec.masks == "irn":
        made = irn_stage(run_dir, irn_recipe(spec.irn_config), device=cfg.train.device, progress=False)
        folders = [Path(made["masks"]["out_dir"])]
    if spec.masks:
        if len(folders) != 1:
            raise GridError(f"{run_dir}: the pseudo-masks went to {len(folders)} folders; the grid scores one split")
        name = MASK_KINDS[spec.masks][1]
        masks = eval_masks_stage(folders[0], cfg=cfg, out=run_dir / "eval" / f"{name}.json", progress=False)
        print(f"{run_dir}: pseudo-mask ({spec.masks}) mIoU {100 * masks['miou']:.1f}")


def _die_with_parent() -> None:
    """In the child (Linux): SIGKILL when the grid process dies, so a killed grid leaves no job writing
    into a run directory that its rerun resumes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_fsae(argv: Sequence[str], log: Path) -> None:
    """``python -m fsae ARGV``, its output appended to ``log``; GridError naming the log when it fails."""
    ensure_output_dir(log.parent)
    with open(log, "a") as f:
        f.write(f"$ fsae {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "fsae", *argv], stdout=f, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise GridError(f"{log.parent}: the grid job failed (exit code {proc.returncode}): "
                        f"{lines[-1] if lines else ''} (full output: {log})")


def run_label(run: GridRun) -> str:
    """``"tau_fae=0.9/seed=1"``: the run's folder below the grid folder, as ``--only`` takes it."""
    return f"{run.setting}/seed={run.seed}"


def job_argv(spec: GridSpec, run: GridRun, device: str | None) -> list[str]:
    """The grid's own command restricted to one run (``--only``): what each job subprocess runs."""
    argv = ["grid", spec.config, *(f"--vary={v.key}={','.join(v.texts)}" for v in spec.varies),
            "--seeds", ",".join(map(str, spec.seeds)), "--out", str(spec.out), "--only", run_label(run)]
    argv += ["--base"] if spec.base else []
    argv += ["--masks", spec.masks] if spec.masks else []
    argv += ["--irn-config", spec.irn_config] if spec.irn_config else []
    argv += ["--devices", device] if device else []
    argv += ["--nproc", str(spec.nproc)] if spec.nproc > 1 else []
    argv += [f"--set={o}" for o in spec.overrides]
    return argv


def run_jobs(runs: Sequence[GridRun], spec: GridSpec, say: Callable[[str], None] = print) -> None:
    """Every run not finished, one job per device at a time (threads, each waiting on its subprocesses).
    After a failure no new job starts; the running ones finish, then GridError lists the failures."""
    devices = spec.devices or [None]
    todo: queue.Queue = queue.Queue()
    for i, run in enumerate(runs):
        todo.put((i, run))
    failures: list[str] = []
    lock = threading.Lock()

    def worker(device):
        while not failures:
            try:
                i, run = todo.get_nowait()
            except queue.Empty:
                return
            where = f"[{i + 1}/{len(runs)}] {run.setting}/seed={run.seed}"
            if run_finished(run, spec.masks):
                say(f"{where}: finished, skipped")
                continue
            say(f"{where}: running{f' on {device}' if device else ''} -> {run.run_dir}")
            try:
                run_fsae(job_argv(spec, run, device), run.run_dir / "grid.log")
            except FsaeError as exc:
                with lock:
                    failures.append(str(exc))
                return
            say(f"{where}: done")

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise GridError("fsae grid: " + "; ".join(failures))


# ----------------------------------------------------------------------------------------- the table


def grid_rows(runs: Sequence[GridRun]) -> list[dict]:
    """One row per setting, in plan order: ``{"setting", "values", "runs": [run_summary + seed], <metric>:
    seed_spread of the runs' values}`` for every metric in METRICS."""
    rows: dict[str, dict] = {}
    for run in runs:
        summary = run_summary(run.run_dir, compute=False)
        summary["seed"] = run.seed
        row = rows.setdefault(run.setting, {"setting": run.setting, "values": run.values, "runs": []})
        row["runs"].append(summary)
    for row in rows.values():
        for key, _ in METRICS:
            row[key] = seed_spread([r[key] for r in row["runs"]])
    return list(rows.values())


def _columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
    return [(k, t) for k, t in METRICS if any(r[k]["n"] for r in rows)]


def table(rows: Sequence[dict]) -> dict:
    """``{"header", "rows"}``: Setting, seeds, then a ``spread_cell`` per metric with values."""
    columns = _columns(rows)
    body = [[r["setting"], r["seed_miou"]["n"] or len(r["runs"]), *(spread_cell(k, r[k]) for k, _ in columns)]
            for r in rows]
    return {"header": ["Setting", "seeds", *(t for _, t in columns)], "rows": body}


def runs_table(rows: Sequence[dict]) -> dict:
    """Every run's own numbers (percent), the values the summary rows are computed from."""
    columns = _columns(rows)
    body = []
    for r in rows:
        for s in r["runs"]:
            body.append([r["setting"], s["seed"], *(spread_cell(k, seed_spread([s[k]])) for k, _ in columns),
                         s["run_dir"]])
    return {"header": ["Setting", "seed", *(t for _, t in columns), "run directory"], "rows": body}


NOTE = ("Percent; each cell is the median over the training seeds, then mean ± std (sample std, n - 1); "
        "seeds scored at each run's best background threshold (the column gives the median of those).")


def grid_markdown(rows: Sequence[dict], title: str) -> str:
    from fsae.compare import markdown_table

    main, per_run = table(rows), runs_table(rows)
    return (f"# {title}\n\n{markdown_table(main['header'], main['rows'])}\n\n{NOTE}\n\n## Runs\n\n"
            f"{markdown_table(per_run['header'], per_run['rows'])}\n")


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_field(path: Path, rows: Sequence[dict], vary: Vary) -> Path:
    """Seed (and pseudo-mask) mIoU vs the values of one varied field: mean with std error bars over seeds,
    one line per combination of the other fields' values; the base row as a dashed line."""
    import matplotlib.pyplot as plt

    from fsae.report import save_figure

    numeric = _numeric(vary.values)
    xs = {t: (v if numeric else i) for i, (t, v) in enumerate(zip(vary.texts, vary.values))}  # text -> x
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["setting"] == "base":
            continue
        others = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["values"].items() if k != vary.key)
        lines.setdefault(others, []).append(r)
    series = (("seed_miou", "seed mIoU", "o-", "C0"), ("mask_miou", "pseudo-mask mIoU", "s--", "C1"))
    for metric, label, style, colour in series:
        for others, members in lines.items():
            points = [(xs[m["values"][vary.key]], m[metric]) for m in members if m[metric]["n"]]
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in points], [100 * p[1]["mean"] for p in points],
                        yerr=[100 * (p[1]["std"] or 0.0) for p in points], fmt=style, capsize=4,
                        color=colour if len(lines) == 1 else None, label=label + (f" ({others})" if others else ""))
        base = next((r for r in rows if r["setting"] == "base" and r[metric]["n"]), None)
        if base is not None:
            mean, std = 100 * base[metric]["mean"], 100 * (base[metric]["std"] or 0.0)
            ax.axhline(mean, color=colour, linestyle=":", label=f"base {label}")
            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.1)
    if not numeric:
        ax.set_xticks(list(xs.values()), list(xs))
    ax.set(xlabel=vary.key, ylabel="mIoU (%)", title=f"mIoU vs {vary.key} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def grid_html(rows: Sequence[dict], title: str, plots: dict[str, Path], base: Path) -> str:
    import html

    from fsae.report import _CSS, html_table

    main, per_run = table(rows), runs_table(rows)
    imgs = "".join(f'<h3>{html.escape(key)}</h3><p><img src="{html.escape(Path(os.path.relpath(p, base)).as_posix())}"'
                   f' alt="mIoU vs {html.escape(key)}"></p>' for key, p in plots.items())
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"{html_table(main['header'], main['rows'])}\n<p>{html.escape(NOTE)}</p>\n<h2>Plots</h2>\n{imgs}\n"
            f"<h2>Runs</h2>\n{html_table(per_run['header'], per_run['rows'])}\n</body></html>\n")


def write_grid_outputs(spec: GridSpec, runs: Sequence[GridRun]) -> dict[str, Path]:
    """grid.md, grid.json, grid.html and grid_files/<field>.png below ``spec.out``."""
    out = Path(spec.out)
    rows = grid_rows(runs)
    title = f"fsae grid: {Path(spec.config).name}, {' x '.join(v.key for v in spec.varies)}, seeds " \
            f"{','.join(map(str, spec.seeds))}"
    plots = {v.key: plot_field(out / "grid_files" / f"{v.key}.png", rows, v) for v in spec.varies}
    record = {"config": spec.config, "vary": {v.key: v.values for v in spec.varies}, "seeds": spec.seeds,
              "base": spec.base, "masks": spec.masks, "overrides": spec.overrides, "rows": rows}
    return {"md": write_text(out / "grid.md", grid_markdown(rows, title)),
            "json": write_json(out / "grid.json", json.loads(json.dumps(record, default=str))),
            "html": write_text(out / "grid.html", grid_html(rows, title, plots, out))}


def run_grid(spec: GridSpec, only: str | None = None, say: Callable[[str], None] = print) -> dict[str, Path]:
    """Plan, run the unfinished jobs, write the table; returns the written files. ``only``
    (``"tau_fae=0.9/seed=1"``): run that one job here, whether finished or not, and write no table."""
    if spec.masks is not None and spec.masks not in MASK_KINDS:
        raise ConfigError(f"fsae grid: --masks must be one of {', '.join(MASK_KINDS)}, got {spec.masks!r}")
    if spec.devices and spec.nproc > 1:
        raise ConfigError("fsae grid: give --devices (jobs side by side) or --nproc (processes per job), not both")
    runs = plan_grid(spec)
    if only is not None:
        chosen = [r for r in runs if run_label(r) == only.strip("/")]
        if not chosen:
            raise ConfigError(f"--only {only!r}: not a run of this grid (runs: {', '.join(map(run_label, runs))})")
        run_job(chosen[0], spec, spec.devices[0] if spec.devices else None)
        return {}
    ensure_output_dir(spec.out)
    say(f"grid: {len(runs)} runs ({len(runs) // len(spec.seeds)} settings x {len(spec.seeds)} seeds) -> {spec.out}")
    run_jobs(runs, spec, say)
    return write_grid_outputs(spec, runs)
