"""Multi-scale + flip CAM inference, dumping the initial seeds.

For an image, at each scale s the network sees the image resized by s and its horizontal flip (one
batch of 2B); each ReLU'd CAM is resized bilinearly to the image size, flipped back, and all are
summed. Only the classes present in the image-level label are kept, each divided by its maximum
(+ 1e-5) so it lies in [0, 1]. Images of the same size are batched at every scale.

Seed file ``seeds/<id>.npz`` (``np.savez_compressed``): ``keys`` int64 (K,) present classes in the label
space 1..C; ``cams`` float16 (K, H, W) in [0, 1]. The background is usually not stored: it comes from a
threshold at evaluation (``fsae.evaluate``). A method with ``seed_background = True`` (SIPE) scores the
background itself: its ``cam(images, labels)`` returns C + 1 channels, background LAST, and the seed file
gets a third array ``background`` float16 (H, W) in [0, 1] (max-normalised like the classes), which
evaluation uses in place of the threshold plane (argmax, no threshold).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fsae.augment import normalize
from fsae.io import atomic_write
from fsae.seeds import load_seed
from fsae.stamps import make_stamp, prepare_output, weights_digest

SEED_EPS = 1e-5


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


@torch.no_grad()
def multiscale_cam(model, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Summed ReLU'd CAMs over scales (and flips) at the input resolution.

    Shape: images (B, 3, H, W) normalised -> (B, C, H, W), non-negative, not normalised. With
    ``labels`` (B, C) they are passed on, ``model.cam(x, labels)`` (methods with ``seed_background``),
    and the result has the channels that call returns (C + 1 for SIPE).
    """
    size = images.shape[-2:]
    total = None
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, recompute_scale_factor=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        if labels is None:
            cams = F.relu(model.cam(x))
        else:
            cams = F.relu(model.cam(x, torch.cat([labels, labels]) if flip else labels))
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
        if flip:
            b = images.shape[0]
            cams = cams[:b] + cams[b:].flip(-1)
        total = cams if total is None else total + cams
    return total


def normalise_seed(cam: torch.Tensor, label: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Keep present classes and max-normalise: (C, H, W), (C,) -> keys (K,) in 1..C, cams (K, H, W)."""
    present = torch.nonzero(label > 0.5).flatten()
    kept = cam[present]
    kept = kept / (kept.flatten(1).max(dim=1).values[:, None, None] + SEED_EPS)
    return (present + 1).cpu().numpy().astype(np.int64), kept.cpu().numpy()


def save_seed(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray,
              background: np.ndarray | None = None) -> Path:
    extra = {} if background is None else {"background": np.asarray(background).astype(np.float16)}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=keys.astype(np.int64), cams=cams.astype(np.float16), **extra)

    return atomic_write(path, write)


def batches_by_size(dataset, indices: Sequence[int], batch_size: int):
    """Yield lists of samples with equal image size, at most ``batch_size`` each, in index order."""
    pending: dict[tuple[int, int], list[dict]] = {}
    for i in indices:
        sample = dataset[i]
        key = sample["image"].shape[:2]
        group = pending.setdefault(key, [])
        group.append(sample)
        if len(group) == batch_size:
            yield pending.pop(key)
    yield from pending.values()


def seed_stamp(model, scales: Sequence[float], flip: bool, source: dict | None = None) -> dict:
    """The stamp of a seed folder: ``source`` (what the model came from; default the digest of its weights)
    and the inference settings that decide a seed file."""
    source = {"weights": weights_digest(model)} if source is None else source
    return make_stamp("cam", source, {"scales": [float(s) for s in scales], "flip": bool(flip)})


@torch.no_grad()
def infer_seeds(model, dataset, out_dir: str | os.PathLike, scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
                flip: bool = True, batch_size: int = 16, device: str | torch.device = "cpu",
                progress: bool = True, indices: Sequence[int] | None = None, source: dict | None = None,
                force: bool = False) -> dict:
    """Write ``out_dir/<id>.npz`` for every image (or the given ``indices``); skip finished ones.

    The folder is stamped (``fsae.stamps``) with ``seed_stamp(model, scales, flip, source)``; the CLI passes
    ``source = {"checkpoint": file_digest(checkpoint)}``. A folder made otherwise is refused
    (``StaleOutputError``) unless ``force``, which deletes its seeds first; a seed file that no longer reads
    is written again. Returns {"written": n, "skipped": n, "out": path}.
    """
    out_dir = Path(out_dir)
    prepare_output(out_dir, seed_stamp(model, scales, flip, source), force, ("*.npz",), load_seed)
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    todo = [i for i in indices if not (out_dir / f"{dataset.ids[i]}.npz").exists()]
    written = 0
    bar = tqdm(total=len(todo), desc="cam", disable=not progress, unit="img")
    with_background = getattr(model, "seed_background", False)
    for group in batches_by_size(dataset, todo, batch_size):
        images = torch.stack([to_tensor_image(s["image"]) for s in group]).to(device)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in group]).float().to(device)
        cams = multiscale_cam(model, normalize(images), scales, flip, labels if with_background else None)
        for sample, cam in zip(group, cams):
            background = None
            if with_background:  # channel C: the method's own background score, max-normalised
                cam, background = cam[:-1], cam[-1] / (cam[-1].max() + SEED_EPS)
                background = background.cpu().numpy()
            keys, kept = normalise_seed(cam, torch.as_tensor(sample["label"]))
            save_seed(out_dir / f"{sample['id']}.npz", keys, kept, background)
            written += 1
        bar.update(len(group))
    bar.close()
    return {"written": written, "skipped": len(indices) - len(todo), "out": str(out_dir)}
