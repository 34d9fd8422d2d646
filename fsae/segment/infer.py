"""DeepLab inference: multi-scale + flip, optional dense CRF, label PNGs, VOC test-server layout, val mIoU.

For an image, at each scale s in (0.5, 0.75, 1.0, 1.25, 1.5) the network sees the image resized by s and
its horizontal flip; each output's logits are resized bilinearly to the image size, turned into class
probabilities (softmax), flipped back, and all 2 x len(scales) probability maps are averaged
(``multiscale_probs``; ``infer.fuse`` selects the PPC authors' mean of logits or MCTformer's maximum).
The mask is their argmax, or, with the CRF on, the argmax of
``fsae.refine.crf.crf_inference(image, probs)`` (DeepLab's CRF parameters in ``SegInferConfig.crf``).

Outputs below the run directory (every PNG a VOC-palette label-space mask written atomically; each
folder stamped (``fsae.stamps``) with the checkpoint's content hash, the scales, the flip and the CRF
parameters: a rerun with the same stamp skips the images whose outputs exist and read, another stamp is
refused unless ``force``)::

    segment/<val split>/<id>.png        multi-scale + flip argmax
    segment/<val split>_crf/<id>.png    ... then dense CRF (when infer.crf.enabled)
    eval/seg_<val split>[_crf].json     fsae.evaluate.evaluate_masks against data.gt_dir
    results/VOC2012/Segmentation/comp6_test_cls/<id>.png   the test split, final masks (VOC kind), the
                                        layout the PASCAL VOC evaluation server expects (comp6: trained
                                        with data beyond VOC's own, here the train_aug pseudo-masks)
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
import contextlib
import sys

from fsae.errors import DataError, FsaeError
from fsae.evaluate import evaluate_masks, save_eval
from fsae.infer import to_tensor_image
from fsae.io import read_id_list, read_image, read_mask, write_mask
from fsae.memory import named_out_of_memory
from fsae.refine.crf import crf_inference
from fsae.speed import mixed_forward
from fsae.stamps import make_stamp, stage_output, weights_digest

TEST_SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


@torch.no_grad()
def multiscale_probs(model, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                     fuse: str = "mean_probs", precision: str = "fp32") -> torch.Tensor:
    """Class probabilities fused over scales (and horizontal flips) at the input resolution.

    ``precision`` (``infer.precision``): the autocast dtype of the network passes; the resizing, softmaxes and
    fusion run in fp32 on the cast-back logits.
    ``fuse``: ``mean_probs`` (the mean of the softmaxes), ``mean_logits`` (softmax of the mean logit map:
    the PPC authors' test.py:84-92) or ``max_probs`` (the per-class maximum of the softmaxes: MCTformer's
    seg/infer_seg.py:91-98; then the pixels need not sum to 1).
    Shape: images (B, 3, H, W) normalised -> (B, C+1, H, W).
    """
    size = images.shape[-2:]
    b = images.shape[0]
    outputs = []
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, recompute_scale_factor=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        logits = F.interpolate(mixed_forward(model, x, precision=precision), size=size, mode="bilinear",
                               align_corners=False)
        out = logits if fuse == "mean_logits" else logits.softmax(dim=1)
        outputs += [out[:b], out[b:].flip(-1)] if flip else [out]
    if fuse == "max_probs":
        return torch.stack(outputs).amax(dim=0)
    mean = torch.stack(outputs).mean(dim=0)
    return mean.softmax(dim=1) if fuse == "mean_logits" else mean


def image_list(data_cfg, split: str) -> list[tuple[str, Path]]:
    """``(id, image path)`` for every image of ``split`` (no labels needed: the test split has none)."""
    root = Path(data_cfg.root)
    if data_cfg.kind == "coco":
        from fsae.data.coco import split_paths

        paths = split_paths(root, split)
        return [(i, paths["images"] / f"{i}.jpg") for i in read_id_list(paths["list"])]
    if data_cfg.kind != "voc":
        raise DataError(f"unknown data kind {data_cfg.kind!r}; expected voc or coco")
    return [(i, root / "JPEGImages" / f"{i}.jpg") for i in read_id_list(root / "ImageSets/Segmentation" / f"{split}.txt")]


@torch.no_grad()
def predict_masks(model, image: np.ndarray, scales: Sequence[float], flip: bool, crf_params: dict | None,
                  device="cpu", fuse: str = "mean_probs",
                  precision: str = "fp32") -> tuple[np.ndarray, np.ndarray | None]:
    """One image -> (multi-scale + flip argmax mask, CRF mask or None). Shape: (H, W, 3) uint8 -> (H, W) uint8."""
    x = normalize(to_tensor_image(image)[None]).to(device)
    probs = multiscale_probs(model, x, scales, flip, fuse, precision)[0].cpu().numpy()
    mask = probs.argmax(0).astype(np.uint8)
    if crf_params is None:
        return mask, None
    return mask, crf_inference(image, probs, **crf_params).argmax(0).astype(np.uint8)


def predict_split(model, items: Sequence[tuple[str, Path]], out_dir: Path | None, crf_dir: Path | None,
                  scales: Sequence[float], flip: bool, crf_params: dict | None, device="cpu",
                  progress: bool = True, desc: str = "seg infer", source: dict | None = None,
                  force: bool = False, fuse: str = "mean_probs", precision: str = "fp32") -> dict:
    """Write ``out_dir/<id>.png`` (argmax) and/or ``crf_dir/<id>.png`` (CRF) for every item; skip finished ids.

    ``source``: what the model came from, recorded in the folders' stamps (default: its weights' digest), with
    the settings (``precision`` only when not fp32). Each folder has one writer (``fsae.lock``); ``force``
    builds beside the old PNGs and swaps in at the end (``fsae.stamps.stage_output``). Out of memory on an
    image: ``fsae.memory.OutOfMemory`` naming it, its size and what to lower.
    """
    source = {"weights": weights_digest(model)} if source is None else source
    settings = {"scales": [float(s) for s in scales], "flip": bool(flip), "fuse": fuse,
                **({"precision": precision} if precision != "fp32" else {})}
    dirs = [d for d in (out_dir, crf_dir) if d is not None]
    with contextlib.ExitStack() as stack:
        targets = [stack.enter_context(stage_output(d, make_stamp("seg infer", source, {
            **settings, "crf": crf_params if d is crf_dir else None}), force, ("*.png",), read_mask)) for d in dirs]
        plain = targets[0] if out_dir is not None else None
        refined = targets[-1] if crf_dir is not None else None
        todo = [(i, p) for i, p in items if not all((d / f"{i}.png").is_file() for d in targets)]
        model.eval()
        lower = f"infer.scales (now {list(scales)})" + (" or turn the CRF off (--no-crf)" if crf_dir is not None else "")
        for image_id, path in tqdm(todo, desc=desc, disable=not progress, unit="img"):
            image = read_image(path)
            with named_out_of_memory("DeepLab inference", [path], image.shape[:2], lower):
                mask, crf_mask = predict_masks(model, image, scales, flip, crf_params if refined is not None else None,
                                               device, fuse, precision)
            if plain is not None:
                write_mask(plain / f"{image_id}.png", mask)
            if refined is not None:
                write_mask(refined / f"{image_id}.png", crf_mask)
    return {"written": len(todo), "skipped": len(items) - len(todo)}


def run_seg_inference(model, cfg, run_dir: str | os.PathLike, splits: Sequence[str] | None = None,
                      crf: bool | None = None, device="cpu", progress: bool = True, source: dict | None = None,
                      force: bool = False) -> dict:
    """Predict the val split (evaluated) and the test split (test-server layout) of ``cfg.data``.

    ``splits`` defaults to ``[data.val_split, data.test_split]`` (empty names skipped); ``crf`` to
    ``infer.crf.enabled``; ``source`` and ``force`` as in ``predict_split`` (the CLI passes the
    checkpoint's ``file_digest``). Returns ``{split: {"dirs": [...], "written", "skipped", "eval": {name: result}}}``.

    Every split's list and images are checked first (``checked_splits``): with the default splits a missing
    test list is skipped, its entry ``{"dirs": [], "written": 0, "skipped": 0, "eval": {}, "note": why}``
    (the note also printed on stderr with ``progress``). A split that fails after the val split was scored
    raises its error with the val mIoU appended.
    """
    run_dir = Path(run_dir)
    crf = cfg.infer.crf.enabled if crf is None else crf
    crf_params = cfg.infer.crf.kwargs() if crf else None
    default = not splits
    splits = [s for s in (splits or [cfg.data.val_split, cfg.data.test_split]) if s]
    lists, notes = checked_splits(cfg.data, splits, skip_missing_test=default)
    out = {split: {"dirs": [], "written": 0, "skipped": 0, "eval": {}, "note": note} for split, note in notes.items()}
    for note in notes.values():
        if progress:
            print(f"fsae: note: {note}", file=sys.stderr)
    for split in [s for s in splits if s in lists]:
        try:
            out[split] = _infer_split(model, cfg, run_dir, split, lists[split], crf, crf_params, device, progress,
                                      source, force)
        except FsaeError as exc:
            done = _scores_line(out)
            if not done:
                raise
            raise type(exc)(f"{exc} ({done}, saved in {run_dir / 'eval'} before this split failed)") from exc
    return out


def _scores_line(results: dict) -> str:
    """``val mIoU 61.20, val_crf mIoU 62.03`` of the splits evaluated so far; empty when none was."""
    return ", ".join(f"{name} mIoU {100 * scores['miou']:.2f}" for r in results.values()
                     for name, scores in r.get("eval", {}).items() if "miou" in scores)


def checked_splits(data_cfg, splits: Sequence[str], skip_missing_test: bool = False) -> tuple[dict, dict]:
    """Every split's image list and images, checked before any prediction: ``({split: items}, {split: note})``.

    A missing list of the test split (``data.test_split``, not the val split) is skipped with a note when
    ``skip_missing_test`` (the default splits: a VOC trainval download has no test list); any other missing
    list or image is a DataError naming it."""
    lists, notes = {}, {}
    for split in splits:
        try:
            items = image_list(data_cfg, split)
        except DataError as exc:
            test = split == data_cfg.test_split and split != data_cfg.val_split
            if not (skip_missing_test and test and "image list not found" in str(exc)):
                raise
            notes[split] = (f"{exc}: the test split is skipped (set data.test_split= to predict none, or add the "
                            f"list to predict it)")
            continue
        absent = [p for _, p in items if not p.is_file()]
        if absent:
            raise DataError(f"{absent[0]}: image file not found ({len(absent)} of {len(items)} images of split "
                            f"{split!r} missing); nothing was predicted")
        lists[split] = items
    return lists, notes


def _infer_split(model, cfg, run_dir: Path, split: str, items, crf: bool, crf_params, device, progress, source,
                 force) -> dict:
    """One split of ``run_seg_inference``: predict, and for the val split evaluate."""
    if split == cfg.data.test_split and split != cfg.data.val_split:
        final = run_dir / TEST_SERVER_DIR if cfg.data.kind == "voc" else run_dir / "segment" / split
        plain, refined = (None, final) if crf else (final, None)
    else:
        plain = run_dir / "segment" / split
        refined = run_dir / "segment" / f"{split}_crf" if crf else None
    result = predict_split(model, items, plain, refined, cfg.infer.scales, cfg.infer.flip, crf_params,
                           device, progress, desc=f"seg {split}", source=source, force=force,
                           fuse=cfg.infer.fuse, precision=cfg.infer.precision)
    result["dirs"] = [str(d) for d in (plain, refined) if d is not None]
    result["eval"] = {}
    if split == cfg.data.val_split:
        gt_dir = Path(cfg.data.root) / cfg.data.gt_dir
        ids = [i for i, _ in items]
        for name, folder in ((split, plain), (f"{split}_crf", refined)):
            if folder is None:
                continue
            scores = evaluate_masks(folder, gt_dir, ids, cfg.data.num_classes, progress=progress)
            scores["split"] = split
            scores["crf"] = folder is refined
            save_eval(run_dir / "eval" / f"seg_{name}.json", scores, scored=folder, gt_dir=gt_dir, ids=ids)
            result["eval"][name] = scores
    return result

__all__ = ["multiscale_probs", "predict_masks", "predict_split", "run_seg_inference", "image_list",
           "TEST_SERVER_DIR"]
