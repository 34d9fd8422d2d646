"""The PSA stage from seeds to pseudo-masks: affinity labels -> AffinityNet -> random walk.

``run_psa(run_dir, cfg, image_dir)`` reads ``run_dir/seeds/<id>.npz`` and the images, and writes::

    run_dir/aff_labels/<id>.npz    la / ha CRF posteriors (``fsae.refine.psa.aff_labels``)
    run_dir/psa/psa.pt             AffinityNet checkpoint; psa/config.yaml the resolved PSA config
    run_dir/psa_masks/<id>.png     pseudo-masks (VOC palette, 0 bg, 1..C; COCO: psa_masks/<split>/)

Each step can run alone (``steps``); the per-image steps (labels, masks) split over jobs with
``shard``, training needs every label. Each output is stamped (``fsae.stamps``), as IRN's are:
``aff_labels/`` with the seed folder's stamp and the label settings, ``psa/`` with ``aff_labels/``'s stamp
and the network and training settings, ``psa_masks/`` with the seeds', ``psa/``'s stamps and the walk
settings. A rerun with the same stamp skips finished work (``pending`` for the per-image outputs, the
checkpoint's epoch for training); another stamp stops naming the change (``force`` redoes that step's
folder, built beside the old one and swapped in when the step is done: ``fsae.stamps.stage_output``; not
with ``shard``, where each job would swap in its own share). Every file is written atomically; each folder
has one writer per shard (``fsae.lock``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from fsae.distributed import shard_indices
from fsae.errors import DataError, FsaeError
from fsae.io import ids_in, read_image, read_mask, write_mask
from fsae.refine.psa.aff_labels import load_aff_label, make_aff_labels
from fsae.refine.psa.config import PSAConfig
from fsae.refine.psa.network import AffinityNet
from fsae.refine.psa.train import load_affinity_net, train_psa
from fsae.refine.psa.walk import psa_mask
from fsae.seeds import load_seed
from fsae.masks_check import mask_warnings, say_warnings, seed_labels
from fsae.stamps import folder_digest, make_stamp, section_settings, stage_output

STEPS = ("labels", "train", "masks")


def pending(out_dir: Path, ids: Iterable[str], suffix: str) -> list[str]:
    """The ids whose per-image output is not written yet: the one place the stage decides what to skip."""
    return [i for i in ids if not (out_dir / f"{i}{suffix}").is_file()]


@torch.no_grad()
def make_psa_masks(model: AffinityNet, seed_dir: str | os.PathLike, image_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, ids: Iterable[str], cfg: PSAConfig, progress: bool = True,
                   image_ext: str = ".jpg") -> None:
    """Random-walk pseudo-masks ``out_dir/<id>.png`` for every id given."""
    seed_dir, image_dir, out_dir = Path(seed_dir), Path(image_dir), Path(out_dir)
    device = next(model.parameters()).device
    model.eval()
    for image_id in tqdm(list(ids), desc="psa masks", disable=not progress):
        keys, cams = load_seed(seed_dir / f"{image_id}.npz")
        image_path = image_dir / f"{image_id}{image_ext}"
        image = read_image(image_path)
        if image.shape[:2] != cams.shape[1:]:
            raise DataError(f"{seed_dir / (image_id + '.npz')}: CAM size {cams.shape[1:]} does not match image "
                            f"{image_path} size {image.shape[:2]}")
        try:
            mask = psa_mask(model, image, keys, cams, cfg.walk, device)
        except ValueError as exc:  # an image too small for the pair window
            raise DataError(f"{image_path}: {exc}") from exc
        write_mask(out_dir / f"{image_id}.png", mask)


def run_psa(run_dir: str | os.PathLike, cfg: PSAConfig, image_dir: str | os.PathLike,
            ids: list[str] | None = None, seed_dir: str | os.PathLike | None = None,
            steps: Iterable[str] = STEPS, shard: tuple[int, int] = (0, 1), progress: bool = True,
            image_ext: str = ".jpg", mask_subdir: str = "", force: bool = False) -> dict[str, Any]:
    """The PSA steps for a run directory (module docstring). ``ids`` default: every seed file;
    ``mask_subdir``: the pseudo-masks go to ``psa_masks/<mask_subdir>/`` (COCO: the split).

    Returns per step ``{"total", "written", "skipped", "out_dir"}`` (labels, masks: this shard's ids) or
    the checkpoint path (train); ``masks["warnings"]``: degenerate pseudo-masks of this shard's ids
    (``fsae.masks_check.mask_warnings``, also printed on stderr with ``progress``).
    """
    run_dir = Path(run_dir)
    steps = list(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise FsaeError(f"unknown PSA step(s) {unknown}; choose from {list(STEPS)}")
    if "train" in steps and shard[1] > 1:
        raise FsaeError("PSA training needs every affinity label: run `--step train` without --shard "
                        "(shard the labels and masks steps)")
    if force and shard[1] > 1:
        raise FsaeError(f"--force with --shard {shard[0]}/{shard[1]}: each job would replace the others' outputs; "
                        f"rerun the step once without --shard, or move the old folder aside and run the shards "
                        f"without --force")
    seed_dir = Path(seed_dir) if seed_dir else run_dir / "seeds"
    if ids is None:
        ids = ids_in(seed_dir, ".npz")
    if not ids:
        raise DataError(f"{seed_dir}: no seed files; run `fsae cam {run_dir}` first")
    label_dir, psa_dir, mask_dir = run_dir / "aff_labels", run_dir / "psa", run_dir / "psa_masks" / mask_subdir
    mine = shard_indices(list(ids), shard)
    part = f"shard-{shard[0]}-of-{shard[1]}" if shard[1] > 1 else ""  # shards share a folder (fsae.lock)
    seeds = folder_digest(seed_dir)
    result: dict[str, Any] = {}
    if "labels" in steps:
        with stage_output(label_dir, make_stamp("aff_labels", {"seeds": seeds}, section_settings(cfg.aff_label)),
                          force, ("*.npz",), load_aff_label, part=part) as target:
            todo = pending(target, mine, ".npz")
            lc = cfg.aff_label
            make_aff_labels(seed_dir, image_dir, target, todo, lc.low_alpha, lc.high_alpha, lc.workers, progress,
                            image_ext, **lc.crf_params())
        result["labels"] = {"total": len(mine), "written": len(todo), "skipped": len(mine) - len(todo),
                            "out_dir": str(label_dir)}
    checkpoint = psa_dir / "psa.pt"
    if "train" in steps:
        missing = pending(label_dir, ids, ".npz")
        if missing:
            raise DataError(f"{label_dir}: {len(missing)} of {len(ids)} affinity labels missing (e.g. {missing[0]}); "
                            f"run the labels step for every shard first")
        with stage_output(psa_dir, make_stamp("psa", {"aff_labels": folder_digest(label_dir)},
                                              {"net": dataclasses.asdict(cfg.net),
                                               "train": section_settings(cfg.train)}),
                          force, ("psa.pt", "config.yaml")) as target:
            train_psa(cfg, image_dir, label_dir, list(ids), target / "psa.pt", progress, image_ext)
            cfg.save(target / "config.yaml")
        result["train"] = str(checkpoint)
    if "masks" in steps:
        with stage_output(mask_dir, make_stamp("psa_masks", {"seeds": seeds, "psa": folder_digest(psa_dir)},
                                               {"walk": section_settings(cfg.walk)}), force, ("*.png",), read_mask,
                          part=part) as target:
            todo = pending(target, mine, ".png")
            if todo:
                model = load_affinity_net(checkpoint, cfg, cfg.device)
                make_psa_masks(model, seed_dir, image_dir, target, todo, cfg, progress, image_ext)
        result["masks"] = {"total": len(mine), "written": len(todo), "skipped": len(mine) - len(todo),
                           "out_dir": str(mask_dir),
                           "warnings": say_warnings(mask_warnings(mask_dir, mine, seed_labels(seed_dir, mine)),
                                                    progress)}
    return result
