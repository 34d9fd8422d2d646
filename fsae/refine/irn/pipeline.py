"""The IRN stage from seeds to pseudo-masks: IR labels -> boundary network -> random walk.

``run_irn(run_dir, cfg)`` reads ``run_dir/seeds/<id>.npz`` and the images, and writes::

    run_dir/ir_labels/<id>.png     IR labels (0 bg, 1..C, 255 ignore)
    run_dir/irn/irn.pt             boundary network checkpoint; irn/config.yaml the resolved IRN config
    run_dir/irn_masks/<id>.png     pseudo-masks (0 bg, 1..C; COCO: irn_masks/<split>/<id>.png)

Each of the three outputs is stamped (``fsae.stamps``): ``ir_labels/`` with the seed folder's stamp and the
IR-label settings, ``irn/`` with ``ir_labels/``'s stamp and the network and training settings,
``irn_masks/`` with the seeds', ``irn/``'s stamps and the walk settings. A rerun resumes each step (finished
files that still read are skipped) when its stamp matches, and stops naming the change otherwise;
``force`` redoes all three, each built beside the old one and swapped in when that step is done
(``fsae.stamps.stage_output``: a failure keeps the old outputs). Every file is written atomically; each
folder has one writer (``fsae.lock``).
"""

from __future__ import annotations

import dataclasses

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from fsae.augment import normalize
from fsae.errors import DataError
from fsae.evaluate import load_seed
from fsae.infer import to_tensor_image
from fsae.io import ids_in, read_image, read_mask, write_mask
from fsae.refine.irn.config import IRNConfig
from fsae.refine.irn.ir_labels import make_ir_labels
from fsae.refine.irn.network import FEATURE_STRIDE, BoundaryNet, boundary_map
from fsae.refine.irn.train import load_boundary_net, train_irn
from fsae.refine.irn.walk import irn_start_cams, load_strided, propagate, sipe_start_cams, walk_to_mask
from fsae.masks_check import mask_warnings, say_warnings, seed_labels
from fsae.stamps import folder_digest, make_stamp, section_settings, stage_output


def pseudo_mask(model: BoundaryNet, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, cfg: IRNConfig,
                device: str | torch.device = "cpu", background: np.ndarray | None = None,
                strided: np.ndarray | None = None) -> np.ndarray:
    """One image's IRN pseudo-mask. Shape: image (H, W, 3) uint8, keys (K,), cams (K, H, W) -> (H, W) uint8.
    ``strided``: the seed's stride-4 CAM (IRN's walk start); ``background``: SIPE's plane (its variant)."""
    height, width = image.shape[:2]
    if cams.shape[1:] != (height, width):
        raise ValueError(f"CAM size {cams.shape[1:]} does not match image size {(height, width)}")
    if len(keys) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    boundary = boundary_map(model, normalize(to_tensor_image(image)).to(device), pad_to=cfg.train.crop_size,
                            precision=cfg.walk.precision)
    full = torch.from_numpy(cams).float().to(device)
    if background is not None:  # SIPE make_seg_labels.py
        small = sipe_start_cams(full, torch.from_numpy(background).float().to(device), tuple(boundary.shape))
    else:
        start = None if strided is None else torch.from_numpy(np.asarray(strided, np.float32)).to(device)
        small = irn_start_cams(full, start, tuple(boundary.shape))
    walked = propagate(small, boundary, cfg.walk.radius, cfg.walk.beta, cfg.walk.exp_times)
    return walk_to_mask(walked, keys, (height, width), cfg.walk.bg_threshold, FEATURE_STRIDE,
                        own_background=background is not None)


@torch.no_grad()
def make_pseudo_masks(model: BoundaryNet, seed_dir: str | os.PathLike, image_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, ids: Iterable[str], cfg: IRNConfig, progress: bool = True,
                      image_ext: str = ".jpg") -> dict[str, Any]:
    """Random-walk pseudo-masks ``out_dir/<id>.png`` for the seeds; finished ids are skipped."""
    ids = [str(i) for i in ids]
    seed_dir, image_dir, out_dir = Path(seed_dir), Path(image_dir), Path(out_dir)
    device = next(model.parameters()).device
    model.eval()
    todo = [i for i in ids if not (out_dir / f"{i}.png").is_file()]
    for image_id in tqdm(todo, desc="irn masks", disable=not progress):
        keys, cams, background = load_seed(seed_dir / f"{image_id}.npz", with_background=True)
        strided = load_strided(seed_dir / f"{image_id}.npz")
        image_path = image_dir / f"{image_id}{image_ext}"
        image = read_image(image_path)
        if image.shape[:2] != cams.shape[1:]:
            raise DataError(f"{seed_dir / (image_id + '.npz')}: CAM size {cams.shape[1:]} does not match image "
                            f"{image_path} size {image.shape[:2]}")
        write_mask(out_dir / f"{image_id}.png", pseudo_mask(model, image, keys, cams, cfg, device, background, strided))
    return {"total": len(ids), "written": len(todo), "skipped": len(ids) - len(todo), "out_dir": str(out_dir)}


def run_irn(run_dir: str | os.PathLike, cfg: IRNConfig, image_dir: str | os.PathLike,
            ids: list[str] | None = None, seed_dir: str | os.PathLike | None = None,
            progress: bool = True, image_ext: str = ".jpg", force: bool = False,
            mask_subdir: str = "") -> dict[str, Any]:
    """All three IRN steps for a run directory (module docstring). ``ids`` default: every seed file;
    ``mask_subdir``: the pseudo-masks go to ``irn_masks/<mask_subdir>/`` (COCO: the split).
    Returns ``{"ir_labels", "checkpoint", "masks"}``; ``masks["warnings"]``: degenerate pseudo-masks
    (``fsae.masks_check.mask_warnings``, also printed on stderr with ``progress``)."""
    run_dir = Path(run_dir)
    seed_dir = Path(seed_dir) if seed_dir else run_dir / "seeds"
    if ids is None:
        ids = ids_in(seed_dir, ".npz")
    if not ids:
        raise DataError(f"{seed_dir}: no seed files; run `fsae cam {run_dir}` first")
    label_dir, irn_dir, mask_dir = run_dir / "ir_labels", run_dir / "irn", run_dir / "irn_masks" / mask_subdir
    seeds = folder_digest(seed_dir)
    lc = cfg.ir_label
    with stage_output(label_dir, make_stamp("ir_labels", {"seeds": seeds}, section_settings(cfg.ir_label)), force,
                      ("*.png",), read_mask) as target:
        labels = make_ir_labels(seed_dir, image_dir, target, ids, lc.fg_threshold, lc.bg_threshold, lc.gt_prob,
                                workers=lc.workers, progress=progress, image_ext=image_ext, **lc.crf_params())
    labels["out_dir"] = str(label_dir)
    train_stamp = make_stamp("irn", {"ir_labels": folder_digest(label_dir)},
                             {"net": dataclasses.asdict(cfg.net), "train": section_settings(cfg.train)})
    with stage_output(irn_dir, train_stamp, force, ("irn.pt", "config.yaml")) as target:
        train_irn(cfg, image_dir, label_dir, ids, target / "irn.pt", progress, image_ext)
        cfg.save(target / "config.yaml")
    checkpoint = irn_dir / "irn.pt"
    model = load_boundary_net(checkpoint, cfg, cfg.device)
    with stage_output(mask_dir, make_stamp("irn_masks", {"seeds": seeds, "irn": folder_digest(irn_dir)},
                                           {"walk": section_settings(cfg.walk)}), force, ("*.png",), read_mask) as target:
        masks = make_pseudo_masks(model, seed_dir, image_dir, target, ids, cfg, progress, image_ext)
    masks["out_dir"] = str(mask_dir)
    masks["warnings"] = say_warnings(mask_warnings(mask_dir, ids, seed_labels(seed_dir, ids)), progress)
    return {"ir_labels": labels, "checkpoint": str(checkpoint), "masks": masks}
