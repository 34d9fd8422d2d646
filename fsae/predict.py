"""``fsae predict``: what a trained checkpoint does on images of your own (any size, JPEG or PNG).

For each image: the classes (given by name, or the classifier's own: sigmoid of the image-level logits
at the image's size, those >= ``min_prob`` or the ``top_k`` most probable), their multi-scale + flip
CAMs computed by ``fsae.infer.infer_seeds`` itself (so the seed is exactly what ``fsae cam`` writes for
the same pixels and labels), the seed at the run's threshold (``fsae.stages.seed_threshold``, as ``fsae crf``:
the protocol's threshold unless one is given), and with ``crf`` the
dense-CRF mask at that threshold with the protocol's background form (``fsae.stages.seed_masks``, as
``fsae crf``). Written below ``out``::

    <id>.png           figure: image, one CAM heat map per class, seed overlay (+ CRF) with a class legend
    seed/<id>.png      the seed as a label-space VOC-palette mask; crf/<id>.png with ``crf``
    predictions.json   per image: size, classes with probabilities, threshold, files

``<id>`` is the image file's stem. Class names come from the run's data set (the generated set's
``meta.json``, VOC's or COCO's names; ``fsae.report.class_names``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsae.config import Config
from fsae.errors import ConfigError, DataError
from fsae.io import read_image, write_json, write_mask
from fsae.seeds import load_seed
from fsae.stages import dataset_seeds, image_probabilities, seed_masks, seed_threshold


@dataclass
class Predictor:
    model: torch.nn.Module
    cfg: Config
    threshold: float
    threshold_source: str  # where the threshold came from, for the user
    names: list[str]  # background + the C class names
    device: str


def load_predictor(target: str | os.PathLike, device: str = "cpu", threshold: float | str | None = None) -> Predictor:
    """A run directory (its ``checkpoints/last.pt``) or a checkpoint file -> model, config, threshold, names."""
    from fsae.report import class_names
    from fsae.train import model_from_checkpoint

    target = Path(target)
    checkpoint = target / "checkpoints" / "last.pt" if target.is_dir() else target
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: checkpoint not found; pass a run directory of `fsae train` or a .pt file")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    model, cfg = model_from_checkpoint(checkpoint, device=device)
    threshold, source = seed_threshold(run_dir, cfg, threshold)  # as `fsae crf RUN` and the grid pick it
    if threshold is None:
        raise ConfigError(f"{checkpoint}: the method's protocol gives no threshold; pass --threshold T")
    return Predictor(model, cfg, float(threshold), source, class_names(cfg), device)


def class_probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """Sigmoid of the image-level logits (the multi-label classifier). Shape: (H, W, 3) uint8 -> (C,)."""
    return image_probabilities(predictor.model, image, predictor.device)


def parse_labels(text: str, names: Sequence[str]) -> list[int]:
    """``"cat,dog"`` -> labels in 1..C by name (case-insensitive); ConfigError listing the known names."""
    lookup = {n.lower(): c for c, n in enumerate(names) if c > 0}
    labels = []
    for name in (t.strip() for t in text.split(",")):
        if name.lower() not in lookup:
            raise ConfigError(f"--labels: unknown class {name!r}; the run's classes are {', '.join(names[1:])}")
        labels.append(lookup[name.lower()])
    return sorted(set(labels))


def choose_classes(probs: np.ndarray, top_k: int | None = None, min_prob: float = 0.5) -> list[int]:
    """The classifier's classes: the ``top_k`` most probable, else those with probability >= ``min_prob``.
    Shape: probs (C,) -> labels in 1..C, sorted."""
    if top_k is not None:
        if top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {top_k}")
        return sorted(int(c) + 1 for c in np.argsort(-probs, kind="stable")[:top_k])
    return [int(c) + 1 for c in np.flatnonzero(probs >= min_prob)]


class ImageFiles:
    """Images as ``infer_seeds`` reads a data set: ``ids`` and samples ``{"id", "image", "label"}``."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[list[int]], num_classes: int):
        self.paths, self.ids = list(paths), [Path(p).stem for p in paths]
        self.labels = []
        for present in labels:
            vec = np.zeros(num_classes, dtype=np.float32)
            vec[[c - 1 for c in present]] = 1.0
            self.labels.append(vec)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"id": self.ids[index], "image": read_image(self.paths[index]), "label": self.labels[index]}


def _unique_ids(paths: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DataError(f"{p}: same name as {seen[p.stem]}; outputs are named by the file's stem, rename one")
        seen[p.stem] = p


def prediction_figure(path: Path, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, seed: np.ndarray,
                      crf: np.ndarray | None, names: Sequence[str], probs: np.ndarray, threshold: float,
                      note: str = "") -> Path:
    """One row: the image, a CAM heat map per class (with its probability), the seed overlay (and the CRF
    mask), and a legend of the class colours. Shape: image (H, W, 3), cams (K, H, W), seed / crf (H, W)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from fsae.labels import voc_palette
    from fsae.report import cam_heatmap, colour_mask, overlay, save_figure

    panels = [("image", image)]
    panels += [(f"CAM {names[k]} (p={probs[k - 1]:.2f})", overlay(image, cam_heatmap(cams[i:i + 1])))
               for i, k in enumerate(keys)]
    panels.append((f"seed (t={threshold:.2f})", overlay(image, colour_mask(seed))))
    if crf is not None:
        panels.append(("CRF mask", overlay(image, colour_mask(crf))))
    height = 2.6 * image.shape[0] / image.shape[1] + 1.0  # a panel 2.6 inches wide, room for titles and legend
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), height), squeeze=False)
    for ax, (title, picture) in zip(axes[0], panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    palette = voc_palette()
    shown = [0, *keys.tolist()]
    fig.legend(handles=[Patch(color=palette[c] / 255.0, label=names[c]) for c in shown], loc="lower center",
               ncol=len(shown), fontsize=9, frameon=False)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.3 / height if note else 1))
    return save_figure(fig, path)


def predict_images(target: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike,
                   labels: str | None = None, top_k: int | None = None, min_prob: float = 0.5, crf: bool = False,
                   threshold: float | str | None = None, device: str = "cpu") -> dict:
    """The module docstring's outputs for every image; returns the ``predictions.json`` record."""
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
    _unique_ids(paths)
    pred = load_predictor(target, device, threshold)
    cfg, names, out = pred.cfg, pred.names, Path(out)
    given = parse_labels(labels, names) if labels else None
    probs = [class_probabilities(pred, read_image(p)) for p in paths]
    chosen = [given if given is not None else choose_classes(p, top_k, min_prob) for p in probs]
    record = {"checkpoint": str(target), "threshold": pred.threshold, "threshold_from": pred.threshold_source,
              "classes": "given" if given is not None else (f"top {top_k}" if top_k else f"p >= {min_prob}"),
              "images": []}
    with tempfile.TemporaryDirectory() as tmp:  # fresh seeds every call: infer_seeds skips existing files
        dataset_seeds(pred.model, cfg, ImageFiles(paths, chosen, cfg.data.num_classes), tmp, device, progress=False)
        for path, p, present in zip(paths, probs, chosen):
            keys, cams, background = load_seed(Path(tmp) / f"{path.stem}.npz", with_background=True)
            image = read_image(path)
            seed, crf_mask = seed_masks(image, keys, cams, pred.threshold, background, crf=crf, cfg=cfg)
            note = "" if present else f"no class with p >= {min_prob:.2f} (try --top-k 1 or --labels)"
            entry = {"image": str(path), "id": path.stem, "size": list(image.shape[:2]),
                     "classes": [{"label": c, "name": names[c], "prob": float(p[c - 1])} for c in present],
                     "probs": {names[c + 1]: float(v) for c, v in enumerate(p)},
                     "figure": str(prediction_figure(out / f"{path.stem}.png", image, keys, cams, seed, crf_mask,
                                                     names, p, pred.threshold, note)),
                     "seed": str(write_mask(out / "seed" / f"{path.stem}.png", seed))}
            if crf_mask is not None:
                entry["crf"] = str(write_mask(out / "crf" / f"{path.stem}.png", crf_mask))
            record["images"].append(entry)
    write_json(out / "predictions.json", record)
    return record
