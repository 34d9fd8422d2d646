"""What people look at: CAM overlays, training curves (the paper's Fig. 6), result tables."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fsae.io import atomic_write  # noqa: E402
from fsae.labels import voc_palette  # noqa: E402


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


def save_overlay_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]],
                      titles: Sequence[str]) -> Path:
    """A grid of images: one row per example, one column per title (all (H, W, 3) uint8)."""
    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            axes[r][c].imshow(img)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_curves(path: str | os.PathLike, runs: dict[str, Path]) -> Path:
    """Held-out seed mIoU per epoch, pseudo-label ratio and accuracy per step (paper Fig. 6)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run_dir in runs.items():
        epochs = read_csv(Path(run_dir) / "epochs.csv")
        axes[0].plot([r["epoch"] for r in epochs], [100 * r["val_miou"] for r in epochs], marker="o", label=name)
        steps = [r for r in read_csv(Path(run_dir) / "metrics.csv") if not np.isnan(r.get("mask_ratio", np.nan))]
        if steps:
            axes[1].plot([r["step"] for r in steps], [100 * r["mask_ratio"] for r in steps], label=name)
            axes[2].plot([r["step"] for r in steps], [100 * r["pl_accuracy"] for r in steps], label=name)
    axes[0].set(title="seed mIoU on held-out split (%)", xlabel="epoch")
    axes[1].set(title="pseudo-labelled pixels (%)", xlabel="step")
    axes[2].set(title="pseudo-label accuracy (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
