"""What people look at: CAM overlays, training curves (the paper's Fig. 6), result tables, the HTML report.

``write_report(RUN_DIR)`` (``fsae report``) writes ``RUN_DIR/report.html`` with its figures as PNG files
in ``RUN_DIR/report_files/``, referenced by relative links (keep the two together when moving the
report); ``embed=True`` (``--embed``) puts the PNGs inside the HTML as base64 data URIs instead, one
file to send around. The report shows what the run directory holds:

- the resolved ``config.yaml``;
- training curves from ``metrics.csv`` / ``epochs.csv``: loss terms and learning rate per step, and the
  paper's Fig. 6 (held-out seed mIoU per epoch, pseudo-labelled pixel ratio and accuracy per step), epochs
  numbered from 1 as in epochs.csv and the progress bar; a plot with nothing to show (one point, or a run
  without FSAE for the pseudo-label plots) is left out;
- metric tables and a per-class IoU bar chart from ``RUN_DIR/eval/*.json`` (``fsae eval ... --out``
  results). Stale evaluations (their folder was made again since) are recomputed, and when ``eval/``
  lacks a seed (or pseudo-mask) evaluation but ``seeds/`` (or ``crf/``) and the data set's GT exist, the
  report runs it and saves it as ``eval/seeds.json`` (``eval/crf.json``): ``fsae.rundir.update_evals``;
- a grid of image / CAM overlay / seed / pseudo-mask / GT for a few images, with the columns present.

A folder of run directories (such as ``fsae demo``'s output) gets one page: the ``fsae compare`` table,
the runs' Fig. 6 curves overlaid, then a section per run.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from fsae.compare import compare_runs, compare_table  # noqa: E402
from fsae.data.coco import COCO_CLASSES  # noqa: E402
from fsae.data.synthetic import META_FILE  # noqa: E402
from fsae.errors import ConfigError  # noqa: E402
from fsae.evaluate import load_seed, output_ids, seed_to_mask  # noqa: E402
from fsae.io import atomic_write, check_replaceable, read_image, read_json, read_mask, write_text  # noqa: E402
from fsae.labels import VOC_CLASSES, voc_palette  # noqa: E402
from fsae.protocol import resolve_protocol  # noqa: E402
from fsae.rundir import (EVAL_DIR, crf_folder, current_evals, eval_scores, load_run_config, pick_eval,  # noqa: E402
                         run_dataset, update_evals)


def read_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """A metrics CSV as rows of floats (empty cells are NaN)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()})
    return rows


def cam_heatmap(cams: np.ndarray) -> np.ndarray:
    """(K, H, W) CAMs in [0, 1] -> (H, W, 3) uint8 jet colour map of their per-pixel max."""
    strength = cams.max(axis=0) if cams.shape[0] else np.zeros(cams.shape[1:], np.float32)
    return (plt.get_cmap("jet")(strength)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)


def colour_mask(mask: np.ndarray) -> np.ndarray:
    return voc_palette()[mask]


def save_figure(fig, path: str | os.PathLike) -> Path:
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return out


IGNORE = 255  # the VOC label of unlabelled (boundary) pixels


def legend_entries(masks: Sequence[np.ndarray], names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(class name, (3,) uint8 palette colour) of every label present in ``masks``, in label order;
    255 is ``ignore``, a label past ``names`` is ``class<label>``."""
    present = sorted(set().union(*(np.unique(m).tolist() for m in masks))) if masks else []
    palette = voc_palette()
    return [("ignore" if c == IGNORE else names[c] if c < len(names) else f"class{c}", palette[c]) for c in present]


def save_overlay_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]],
                      titles: Sequence[str], legend: Sequence[tuple[str, np.ndarray]] = ()) -> Path:
    """A grid of images: one row per example, one column per title (all (H, W, 3) uint8); ``legend``:
    (name, colour) pairs drawn as a class-colour key under the grid."""
    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            axes[r][c].imshow(img)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
    fig.tight_layout()
    if legend:
        handles = [Patch(facecolor=np.asarray(colour) / 255, edgecolor="#444", label=name) for name, colour in legend]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6),
                   fontsize=9, frameon=False)
    return save_figure(fig, path)


def training_curves(runs: dict[str, Path]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The paper's Fig. 6 as data: ``{panel: {run: (x, y %)}}`` for panels ``miou`` (epochs.csv, epochs from
    1, as the progress bar), ``ratio`` and ``accuracy`` (metrics.csv, per step). A curve needs two points:
    a run without FSAE (no pseudo-labels) or with one logged step has none, and a panel without curves is
    left out."""
    panels: dict[str, dict] = {"miou": {}, "ratio": {}, "accuracy": {}}
    for name, run_dir in runs.items():
        epochs = [r for r in read_csv(Path(run_dir) / "epochs.csv") if not math.isnan(r.get("val_miou", math.nan))]
        steps = [r for r in read_csv(Path(run_dir) / "metrics.csv") if not math.isnan(r.get("mask_ratio", math.nan))]
        for panel, rows, x, y in (("miou", epochs, "epoch", "val_miou"), ("ratio", steps, "step", "mask_ratio"),
                                  ("accuracy", steps, "step", "pl_accuracy")):
            if len(rows) >= 2:
                panels[panel][name] = ([r[x] for r in rows], [100 * r[y] for r in rows])
    return {panel: curves for panel, curves in panels.items() if curves}


_PANELS = {"miou": ("seed mIoU on held-out split (%)", "epoch"), "ratio": ("pseudo-labelled pixels (%)", "step"),
           "accuracy": ("pseudo-label accuracy (%)", "step")}


def plot_training_curves(path: str | os.PathLike, runs: dict[str, Path]) -> Path | None:
    """Held-out seed mIoU per epoch, pseudo-label ratio and accuracy per step (paper Fig. 6), the panels with
    something to show (``training_curves``); None when none has."""
    panels = training_curves(runs)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for name, (x, y) in curves.items():
            ax.plot(x, y, marker="o" if panel == "miou" else None, label=name)
        title, xlabel = _PANELS[panel]
        ax.set(title=title, xlabel=xlabel)
        if panel == "miou":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_heldout_curves(path: str | os.PathLike, curves: dict[str, dict]) -> Path:
    """One panel: each run's held-out seed mIoU (``curves[name]["val_miou"]``, %) against its
    ``curves[name]["epoch"]``, the runs together, so a reader sees where the base stops improving."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(curve["epoch"], curve["val_miou"], marker="o", markersize=3, label=name)
    ax.set(title="held-out seed mIoU per epoch", xlabel="epoch", ylabel="seed mIoU (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def class_names(cfg) -> list[str]:
    """Background + the C class names: the synthetic set's meta.json, COCO's or VOC's names, else class<c>."""
    c = cfg.data.num_classes
    meta = Path(cfg.data.root) / META_FILE
    if meta.is_file():
        names = list(read_json(meta).get("classes", []))
        if len(names) == c:
            return ["background", *names]
    for known in (VOC_CLASSES, COCO_CLASSES):
        if len(known) == c:
            return ["background", *known]
    return ["background", *(f"class{i}" for i in range(1, c + 1))]


# ------------------------------------------------------------------------------------------ figures


def _finite(values) -> bool:
    return any(v is not None and not math.isnan(v) for v in values)


def plot_loss_curves(path: str | os.PathLike, run_dir: str | os.PathLike) -> Path | None:
    """Loss terms and learning rate per step from ``metrics.csv``; None with fewer than two rows."""
    metrics = Path(run_dir) / "metrics.csv"
    rows = read_csv(metrics) if metrics.is_file() else []
    if len(rows) < 2:  # one logged step is a dot, not a curve
        return None
    steps = [r["step"] for r in rows]
    not_losses = {"step", "epoch", "lr", "pl_accuracy", "skipped"}
    terms = [k for k in rows[0] if k not in not_losses and not k.endswith("_ratio") and _finite([r[k] for r in rows])]
    marker = "o" if len(rows) < 20 else None  # a few logged steps: show the points
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k in terms:
        axes[0].plot(steps, [r[k] for r in rows], label=k, marker=marker)
    axes[0].set(title="loss terms", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in rows], marker=marker)
    axes[1].set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_class_iou(path: str | os.PathLike, series: dict[str, Sequence[float | None]], names: Sequence[str]) -> Path:
    """Grouped bars: per-class IoU (%) of each evaluation in ``series`` (background first, None = no pixels)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) * max(1, len(series))), 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for j, (label, iou) in enumerate(series.items()):
        values = [100 * v if v is not None and not math.isnan(v) else 0.0 for v in iou]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def example_grid(path: str | os.PathLike, run_dir: str | os.PathLike, dataset, threshold: float,
                 num_images: int = 4, names: Sequence[str] = (),
                 crf_dir: str = "crf") -> tuple[Path, list[str], list[str]] | None:
    """Rows of image / CAM overlay / seed / pseudo-mask (``run_dir/crf_dir``) / GT for the first ``num_images``
    seed (or pseudo-mask) ids; a column is shown when every chosen image has it; under the grid a colour key
    of the classes in its masks (``names``: background + class names). Returns (path, ids, columns)."""
    run_dir = Path(run_dir)
    seeds, crf = run_dir / "seeds", run_dir / crf_dir
    ids = output_ids(seeds, ".npz") or output_ids(crf, ".png")
    ids = [i for i in ids if dataset is not None and dataset.image_path(i).is_file()][:num_images]
    if not ids:
        return None
    has_seeds = all((seeds / f"{i}.npz").is_file() for i in ids)
    has_crf = all((crf / f"{i}.png").is_file() for i in ids)
    has_gt = all(dataset.mask_path(i) is not None and dataset.mask_path(i).is_file() for i in ids)
    columns = ["image"] + (["CAM", f"seed (t={threshold:.2f})"] if has_seeds else []) + \
        (["pseudo-mask (CRF)"] if has_crf else []) + (["GT"] if has_gt else [])
    rows, masks = [], []
    for i in ids:
        image = read_image(dataset.image_path(i))
        row, shown = [image], []
        if has_seeds:
            keys, cams = load_seed(seeds / f"{i}.npz")
            row.append(overlay(image, cam_heatmap(cams)))
            shown.append(seed_to_mask(keys, cams, threshold))
        if has_crf:
            shown.append(read_mask(crf / f"{i}.png"))
        if has_gt:
            shown.append(read_mask(dataset.mask_path(i)))
        rows.append(row + [overlay(image, colour_mask(m)) for m in shown])
        masks += shown
    return save_overlay_grid(path, rows, columns, legend_entries(masks, names)), ids, columns


# ---------------------------------------------------------------------------------------- HTML report

_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}
.note{color:#a50}"""


def pct(value: float | None) -> str:
    """A fraction as percent with one decimal (``n/a`` for None / NaN), as in the paper's tables."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Figures:
    """Where the report's PNGs go, and how the HTML refers to them (relative link or data URI)."""

    def __init__(self, report_path: Path, embed: bool):
        self.base = report_path.parent
        self.dir = self.base / "report_files"
        self.embed = embed

    def path(self, name: str) -> Path:
        return self.dir / name

    def img(self, png: Path, alt: str) -> str:
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")
        else:
            src = Path(os.path.relpath(png, self.base)).as_posix()
        return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'


def _run_section(run_dir: Path, figures: _Figures, prefix: str, num_images: int, compute: bool,
                 progress: bool, level: int = 2) -> str:
    cfg = load_run_config(run_dir)
    dataset = run_dataset(cfg)
    notes = update_evals(run_dir, cfg, dataset, progress) if compute else []
    evals, hidden = current_evals(run_dir)
    notes += [] if compute else hidden
    if dataset is None:
        notes.append(f"data set {cfg.data.root} not found on this machine: no example images")
    h = f"h{level}"
    # fsae.start_epoch counts from 0 (as metrics.csv); the report numbers epochs from 1, as epochs.csv and the bar
    fsae = (("FAE+SAE" if cfg.fsae.use_sae else "FAE only") + f" from epoch {cfg.fsae.start_epoch + 1}"
            if cfg.fsae.enabled else "off")
    parts = [f"<p><code>{html.escape(str(run_dir))}</code>: method {html.escape(cfg.model.method)}, backbone "
             f"{html.escape(cfg.model.backbone)}, FSAE {fsae}, {cfg.train.epochs} epochs of batch "
             f"{cfg.train.batch_size}, {cfg.data.num_classes} classes, data {html.escape(cfg.data.root)}</p>"]

    # Metrics tables and per-class IoU from eval/*.json (the stale ones left out, see fsae.rundir).
    parts.append(f"<{h}>Metrics</{h}>")
    if evals:
        rows = []
        for name, result in evals.items():
            s = eval_scores(result)
            threshold = "" if s["threshold"] is None else f"{s['threshold']:.2f}"
            rows.append([f"{EVAL_DIR}/{name}.json", s["kind"], s["count"], pct(s["miou"]), pct(s["fpr"]),
                         pct(s["fnr"]), threshold])
        parts.append(html_table(["evaluation", "of", "images", "mIoU", "FPR", "FNR", "best threshold"], rows))
        names = class_names(cfg)
        ious = {name: eval_scores(r)["iou"] for name, r in evals.items()}
        if all(len(v) == len(names) for v in ious.values()):
            rows = [[n, *(pct(v[c]) for v in ious.values())] for c, n in enumerate(names)]
            parts.append(html_table(["class", *(f"IoU {name}" for name in ious)], rows))
            bars = plot_class_iou(figures.path(f"{prefix}class_iou.png"), ious, names)
            parts.append(figures.img(bars, "per-class IoU"))
        else:
            notes.append(f"per-class IoU lists do not have {len(names)} entries (background + "
                         f"{cfg.data.num_classes} classes): table left out")
    else:
        parts.append("<p>No evaluation: run <code>fsae cam</code> (and <code>fsae crf</code>) on this run, or "
                     "<code>fsae eval ... --out RUN_DIR/eval/NAME.json</code>.</p>")

    # Training curves.
    parts.append(f"<{h}>Training</{h}>")
    if (run_dir / "tb").is_dir():
        parts.append(f"<p>Live curves: <code>tensorboard --logdir {html.escape(str(run_dir / 'tb'))}</code></p>")
    losses = plot_loss_curves(figures.path(f"{prefix}losses.png"), run_dir)
    if losses is not None:
        parts.append(figures.img(losses, "loss terms and learning rate"))
    epochs_csv = run_dir / "epochs.csv"
    epochs = read_csv(epochs_csv) if epochs_csv.is_file() else []
    if epochs and (run_dir / "metrics.csv").is_file():
        curves = plot_training_curves(figures.path(f"{prefix}fig6.png"), {run_dir.name: run_dir})
        if curves is not None:
            parts.append(figures.img(curves, "held-out seed mIoU, pseudo-label ratio and accuracy"))
    if epochs:
        rows = [[int(r["epoch"]), int(r["step"]), f"{r['seconds']:.0f}", pct(r.get("val_miou")),
                 pct(r.get("val_fpr")), pct(r.get("val_fnr")),
                 "" if math.isnan(r.get("val_threshold", math.nan)) else f"{r['val_threshold']:.2f}"] for r in epochs]
        parts.append(html_table(["epoch", "step", "seconds", "val seed mIoU", "FPR", "FNR", "threshold"], rows))
    if losses is None and not epochs:
        parts.append("<p>No metrics.csv / epochs.csv in this run directory.</p>")

    # Examples.
    seed_eval = pick_eval(evals, "seeds")
    threshold = seed_eval[1]["best"]["threshold"] if seed_eval else resolve_protocol(cfg).threshold
    grid = example_grid(figures.path(f"{prefix}examples.png"), run_dir, dataset, threshold, num_images,
                        class_names(cfg), crf_folder(cfg))
    if grid is not None:
        parts.append(f"<{h}>Examples</{h}>")
        parts.append(f"<p>{html.escape(', '.join(grid[1]))}; seed at the best threshold of "
                     f"{'eval/' + seed_eval[0] + '.json' if seed_eval else 'eval.threshold (no sweep)'}.</p>")
        parts.append(figures.img(grid[0], " / ".join(grid[2])))  # alt: the columns shown

    parts.append(f"<{h}>Config</{h}>")
    parts.append(f"<pre>{html.escape((run_dir / 'config.yaml').read_text())}</pre>")
    if notes:
        parts.insert(0, "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes))
    return "\n".join(parts)


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """``folder`` itself when it is a run directory (has config.yaml), else its run subdirectories."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file():
        return [folder]
    return sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file()) if folder.is_dir() else []


REPORT_MARK = "<title>fsae report: "  # in every page write_report writes


def is_report(text: str) -> bool:
    """Whether ``text`` is a page ``write_report`` wrote (so ``--out`` may replace it)."""
    return text.startswith("<!DOCTYPE html>") and REPORT_MARK in text[:2000]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, num_images: int = 4,
                 embed: bool = False, compute: bool = True, progress: bool = False, preamble: str = "") -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) for a run directory, or for a folder of runs (one page
    with the ``fsae compare`` table and a section per run). Returns the HTML path.

    ``compute``: recompute stale evaluations and evaluate ``seeds/`` / ``crf/`` into ``eval/`` first when
    they have no evaluation (``fsae.rundir.update_evals``); without it stale ones are left out. ``embed``: PNGs as data URIs instead of files in ``report_files/``.
    ``out`` may be new or a report fsae wrote before (``is_report``); a folder or another file is refused
    (DataError) before any work. ``preamble``: HTML put under the title (the demo's checklist and curves).
    """
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    if not runs:
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml) and no run directories in it")
    path = check_replaceable(Path(out) if out else run_dir / "report.html", is_report, "an fsae report (HTML)")
    figures = _Figures(path, embed)
    title = f"fsae report: {run_dir.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>", *([preamble] if preamble else [])]
    if runs == [run_dir]:
        body.append(_run_section(run_dir, figures, "", num_images, compute, progress))
    else:
        table = compare_table(compare_runs(runs, compute=compute, progress=progress))
        body += ["<h2>Comparison</h2>", html_table(table["header"], table["rows"])]
        with_curves = {r.name: r for r in runs if (r / "epochs.csv").is_file() and (r / "metrics.csv").is_file()}
        curves = plot_training_curves(figures.path("fig6.png"), with_curves) if with_curves else None
        if curves is not None:
            body.append(figures.img(curves, "held-out seed mIoU, pseudo-label ratio and accuracy"))
        for r in runs:
            body += [f"<h2>Run {html.escape(r.name)}</h2>",
                     _run_section(r, figures, f"{r.name}_", num_images, compute=False, progress=progress, level=3)]
    if embed and figures.dir.is_dir():
        for png in figures.dir.glob("*.png"):
            png.unlink()
        if not any(figures.dir.iterdir()):
            figures.dir.rmdir()
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    return write_text(path, page)
