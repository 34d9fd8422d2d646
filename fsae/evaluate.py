"""Confusion matrix, mIoU, FPR/FNR, and the CAM-seed threshold sweep.

Everything is in the segmentation label space (``fsae.labels``): 0 = background, 1..C = classes,
255 = ignore. With ``C = num_classes`` foreground classes a confusion matrix is ``(K, K)`` with
``K = C + 1``, background first; rows are ground truth, columns are predictions (as in torchvision
``references/segmentation``).

Scores (``segmentation_scores``), per class ``c``, as WSSS papers define FPR / FNR::

    TP_c = conf[c, c]    FP_c = column sum - TP_c    FN_c = row sum - TP_c
    union_c = TP_c + FP_c + FN_c
    IoU_c = TP_c / union_c    FPR_c = FP_c / union_c    FNR_c = FN_c / union_c

so ``IoU_c + FPR_c + FNR_c = 1`` and ``mIoU + FPR + FNR = 1`` when all three are averaged over the
same classes. A class with ``union_c == 0`` (never in the ground truth, never predicted) has NaN
scores and is left out of every mean. Scores are fractions in 0..1; only ``format_scores_table``
prints percent.

Seed files (written by ``fsae.infer``): ``seeds/<id>.npz`` with ``keys`` (K,) int, the present
classes in 1..C, and ``cams`` (K, H, W) float16 in [0, 1], per-class max-normalised CAMs at full
image resolution. A seed becomes a mask by padding a constant background plane of value ``threshold``
in front of the CAMs and taking the argmax (IRN / SIPE / PPC); ties go to background. A seed file with
a third array ``background`` (H, W) (methods that score the background themselves, e.g. SIPE's IS-CAM)
uses that plane instead of the threshold: the mask is the plain argmax, and every threshold of a
sweep gives the same confusion for it.

Confusions are plain integer sums, so evaluation shards: each worker fills a ``SeedEvaluator`` (or
sums ``confusion_matrix`` outputs) over its ids, and the partial ``confusions`` are added
(``SeedEvaluator.merge`` or ``torch.distributed.all_reduce``) before ``result()``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fsae.distributed import all_reduce_sum, rank, shard_indices, world_size
from fsae.errors import DataError
from fsae.formats import seed_suffix
from fsae.io import check_replaceable, ids_in, json_object_with, read_mask, write_json
from fsae.labels import IGNORE_INDEX, VOC_CLASSES
from fsae.parallel import imap_jobs
from fsae.seeds import check_seed, load_seed  # noqa: F401 - re-exported: the seed format's reader
from fsae.stamps import folder_digest
from fsae.sweep import count_files, read_seed_and_gt, sweep_counts


def _as_long(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long()
    return torch.from_numpy(np.asarray(x).astype(np.int64))


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel confusion matrix, rows = ground truth, columns = prediction, background first.

    Shape: pred and gt any same shape (flattened) -> (C+1, C+1) int64, ``C = num_classes``.
    Pixels whose gt is ``ignore_index`` are skipped; any other value outside 0..C in gt or pred is a
    ValueError naming the value.
    """
    pred, gt = _as_long(pred), _as_long(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match gt shape {tuple(gt.shape)}")
    k = num_classes + 1
    keep = gt != ignore_index
    p, g = pred[keep], gt[keep]
    for name, v in (("pred", p), ("gt", g)):
        bad = v[(v < 0) | (v >= k)]
        if bad.numel():
            raise ValueError(
                f"{name} values {torch.unique(bad).tolist()[:8]} are outside 0..{num_classes}"
                + (f" and {ignore_index} (ignore)" if name == "gt" else " (where gt is not ignored)")
            )
    return torch.bincount(g * k + p, minlength=k * k).reshape(k, k)


def segmentation_scores(conf: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """mIoU, FPR, FNR (means) and per-class lists from one ``(K, K)`` confusion matrix.

    Returns a dict of Python floats (fractions in 0..1): ``miou``, ``fpr``, ``fnr``,
    ``pixel_accuracy``, and the per-class lists ``iou``, ``fpr_per_class``, ``fnr_per_class``
    (background first). Classes with an empty union are NaN in the lists and excluded from the means;
    all means are NaN when every union is empty.
    """
    if isinstance(conf, torch.Tensor):
        conf = conf.detach().cpu().double()
    else:
        conf = torch.from_numpy(np.asarray(conf, dtype=np.float64))
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {tuple(conf.shape)}")
    tp = conf.diag()
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    union = tp + fp + fn
    valid = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(valid, tp / union.clamp(min=1), nan)
    fpr = torch.where(valid, fp / union.clamp(min=1), nan)
    fnr = torch.where(valid, fn / union.clamp(min=1), nan)

    def mean(v: torch.Tensor) -> float:
        return v[valid].mean().item() if bool(valid.any()) else float("nan")

    total = conf.sum().item()
    return {
        "miou": mean(iou),
        "fpr": mean(fpr),
        "fnr": mean(fnr),
        "pixel_accuracy": tp.sum().item() / total if total > 0 else float("nan"),
        "iou": iou.tolist(),
        "fpr_per_class": fpr.tolist(),
        "fnr_per_class": fnr.tolist(),
    }


# ----------------------------------------------------------------------------------------- seeds


def seed_to_mask(keys: np.ndarray, cams: np.ndarray, threshold: float,
                 background: np.ndarray | None = None) -> np.ndarray:
    """Seed -> label-space mask: argmax over [background plane = threshold, cams...].

    Shape: keys (K,), cams (K, H, W) -> (H, W) uint8 with values in {0} U keys. Ties go to
    background (it comes first); among foreground classes to the first key. With K = 0 the mask is
    all background. A ``background`` (H, W) plane replaces the constant ``threshold`` plane.
    """
    keys, cams = check_seed(keys, cams)
    if background is not None:
        bg = np.asarray(background, dtype=np.float32).reshape(1, *cams.shape[1:])
    else:
        bg = np.full((1, *cams.shape[1:]), threshold, dtype=np.float32)
    index = np.argmax(np.concatenate([bg, cams], 0), axis=0)
    labels = np.concatenate([[0], keys]).astype(np.uint8)
    return labels[index]


def sweep_confusions(
    keys: np.ndarray,
    cams: np.ndarray,
    gt: torch.Tensor | np.ndarray,
    thresholds: Sequence[float],
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Confusion matrices of ``seed_to_mask(keys, cams, t)`` against ``gt`` for every threshold ``t``.

    Shape: keys (K,), cams (K, H, W), gt (H, W) -> (T, C+1, C+1) int64.

    Exactly equal to looping ``confusion_matrix(seed_to_mask(keys, cams, t), gt, num_classes)``, in
    one pass (``fsae.sweep.sweep_counts``, numpy: the seeds are numpy, and its per-pixel work is several
    times faster there on CPU).
    """
    gt = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
    return torch.from_numpy(sweep_counts(keys, cams, gt, thresholds, num_classes, ignore_index=ignore_index))


def default_thresholds(start: float = 0.0, stop: float = 0.60, step: float = 0.01) -> list[float]:
    """``start, start + step, ..., stop`` (stop included), each rounded to 2 decimals."""
    if step <= 0 or stop < start:
        raise ValueError(f"need step > 0 and stop >= start, got start={start} stop={stop} step={step}")
    n = int(math.floor((stop - start) / step + 1e-6))
    return [round(start + i * step, 2) for i in range(n + 1)]


EVAL_MODES = ("fixed", "sweep", "first_drop", "argmax")  # fsae.protocol


def pick_best(miou: Sequence[float], mode: str = "sweep") -> int:
    """Index of the threshold a protocol reports, from the mIoU of each threshold in sweep order.

    ``"sweep"`` (and ``fixed`` / ``argmax``, one threshold): the first maximum (NaN skipped).
    ``"first_drop"``: MCTformer's curve (``evaluation.py:137-148``): walk in order, keep the best so far,
    stop at the first threshold whose mIoU is not strictly above it.
    """
    values = np.asarray(miou, dtype=np.float64)
    if mode == "first_drop":
        best, top = 0, 0.0
        for i, v in enumerate(values):
            if v > top:
                best, top = i, v
            else:
                break
        return best
    return int(np.nanargmax(values)) if not np.isnan(values).all() else 0


class SeedEvaluator:
    """Accumulates ``(T, C+1, C+1)`` seed confusions image by image; partial sums add up.

    ``update`` takes arrays, ``add_files`` reads one seed / GT pair; ``merge`` adds another
    evaluator's sums (sharded evaluation), ``reduce_from_all_processes`` those of every torchrun
    process; ``result``
    scores the sum for every threshold and picks the best.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] | None = None, mode: str = "sweep"):
        if mode not in EVAL_MODES:
            raise ValueError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
        self.num_classes = num_classes
        self.mode = mode
        thresholds = default_thresholds() if thresholds is None else thresholds
        self.thresholds = [float(t) for t in thresholds]
        k = num_classes + 1
        self.confusions = torch.zeros(len(self.thresholds), k, k, dtype=torch.long)
        self.count = 0

    def update(self, keys: np.ndarray, cams: np.ndarray, gt: torch.Tensor | np.ndarray,
               background: np.ndarray | None = None) -> None:
        """Add one image. Shape: keys (K,), cams (K, H, W), gt (H, W); optional ``background`` (H, W):
        the seed's own background plane, the same argmax mask for every threshold."""
        self.confusions += torch.from_numpy(
            sweep_counts(keys, cams, np.asarray(gt), self.thresholds, self.num_classes, background))
        self.count += 1

    def add_files(self, seed_path: str | os.PathLike, gt_path: str | os.PathLike,
                  seed_format: str = "fsae") -> None:
        """Add one image from its seed file (``seed_format``: ``fsae.formats.FORMATS``) and GT PNG;
        errors name the files."""
        keys, cams, background, gt = read_seed_and_gt(seed_path, gt_path, self.num_classes, seed_format, self.mode)
        self.update(keys, cams, gt, background)

    def merge(self, other: "SeedEvaluator") -> "SeedEvaluator":
        """Add another evaluator's sums into this one (same classes and thresholds)."""
        if (other.thresholds, other.num_classes, other.mode) != (self.thresholds, self.num_classes, self.mode):
            raise ValueError("can only merge evaluators with the same num_classes and thresholds")
        self.confusions += other.confusions
        self.count += other.count
        return self

    def reduce_from_all_processes(self) -> "SeedEvaluator":
        """Sum the confusions and image counts over every torchrun process (identity in one process)."""
        all_reduce_sum(self.confusions)
        count = torch.tensor([self.count], dtype=torch.long)
        self.count = int(all_reduce_sum(count)[0])
        return self

    def result(self) -> dict[str, Any]:
        """``{"thresholds", "miou" (per threshold), "best": {...}, "mode", "count"}``; the best threshold
        is picked by ``pick_best(miou, mode)``."""
        if self.count == 0:
            raise ValueError("no images were evaluated")
        scores = [segmentation_scores(c) for c in self.confusions]
        miou = [s["miou"] for s in scores]
        best = pick_best(miou, self.mode)
        b = scores[best]
        fg = self.confusions[best][1:]
        coverage = float(fg[:, 1:].diagonal().sum() / fg.sum().clamp(min=1))
        return {
            "thresholds": list(self.thresholds),
            "miou": miou,
            "best": {
                "threshold": self.thresholds[best],
                "miou": b["miou"],
                "fpr": b["fpr"],
                "fnr": b["fnr"],
                "iou": b["iou"],
                # Object coverage: share of GT foreground pixels labelled with their own class.
                "coverage": coverage,
            },
            "mode": self.mode,
            "count": self.count,
        }


def _check_ids(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    if not ids:
        raise DataError("no image ids to evaluate; check the image list")
    return ids


def _my_share(ids: list[str], shard: tuple[int, int] | None) -> list[str]:
    """This process's ids; a shard must be (rank, world size) of the process group that sums the results."""
    if shard is None:
        return ids
    if shard != (rank(), world_size()):
        raise ValueError(f"shard {shard} is not (rank, world size) = {(rank(), world_size())} of a "
                         f"torch.distributed process group; the partial confusions could not be summed")
    return shard_indices(ids, shard)


EVAL_CHUNK = 32  # most images per job of evaluate_seeds: one (T, K, K) sum comes back per job


def evaluate_seeds(
    seed_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    ids: Iterable[str],
    num_classes: int,
    thresholds: Sequence[float] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    seed_format: str = "fsae",
    mode: str = "sweep",
    workers: int = 1,
) -> dict[str, Any]:
    """Threshold sweep of ``seed_dir/<id>.npz`` against ``gt_dir/<id>.png``, each file read once.
    ``seed_format`` reads a base repository's ``<id>.npy`` files instead (``fsae.formats``).

    ``mode``: how the reported threshold is picked (``pick_best``; ``fsae.protocol``).

    ``thresholds`` defaults to ``default_thresholds()``. Returns ``SeedEvaluator.result()``:
    ``{"thresholds": [...], "miou": [...], "best": {"threshold", "miou", "fpr", "fnr", "iou"},
    "count": n}``. ``shard = (rank, world size)`` in a torch.distributed process group: each process
    reads ids ``rank, rank + world, ...`` and the confusions are summed over the processes, so every
    process returns the result of all ``ids``. ``workers`` > 1: that many spawned processes read the files,
    at most ``EVAL_CHUNK`` images per job, and their integer confusions are summed, so the result is exactly that
    of one process (the workers import ``fsae.sweep``, not torch).
    """
    ids = _check_ids(ids)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    seed_dir, gt_dir = Path(seed_dir), Path(gt_dir)
    ev = SeedEvaluator(num_classes, thresholds, mode)
    pairs = [(str(seed_dir / f"{i}{seed_suffix(seed_format)}"), str(gt_dir / f"{i}.png")) for i in _my_share(ids, shard)]
    size = min(EVAL_CHUNK, max(1, math.ceil(len(pairs) / (4 * workers))))  # >= 4 jobs per worker when it can
    chunks = [pairs[j:j + size] for j in range(0, len(pairs), size)]
    jobs = [(chunk, num_classes, ev.thresholds, seed_format, mode) for chunk in chunks]
    with tqdm(total=len(pairs), desc="eval seeds", disable=not progress) as bar:
        for counts, n in imap_jobs(count_files, jobs, workers):
            ev.confusions += torch.from_numpy(counts)
            ev.count += n
            bar.update(n)
    if shard is not None:
        all_reduce_sum(ev.confusions)
        ev.count = len(ids)
    return ev.result()


def evaluate_masks(
    mask_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    ids: Iterable[str],
    num_classes: int,
    progress: bool = True,
    ignore_as: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``segmentation_scores`` of label-space PNGs ``mask_dir/<id>.png`` against ``gt_dir/<id>.png``.

    A pseudo-mask pixel of 255 (left unlabelled) is a DataError unless ``ignore_as`` gives the label
    to score it as (e.g. 0, background). The result also has ``count``. ``shard``: as in
    ``evaluate_seeds``.
    """
    ids = _check_ids(ids)
    mask_dir, gt_dir = Path(mask_dir), Path(gt_dir)
    k = num_classes + 1
    conf = torch.zeros(k, k, dtype=torch.long)
    for image_id in tqdm(_my_share(ids, shard), desc="eval masks", disable=not progress):
        mask_path, gt_path = mask_dir / f"{image_id}.png", gt_dir / f"{image_id}.png"
        pred = read_mask(mask_path, num_classes)
        gt = read_mask(gt_path, num_classes)
        if pred.shape != gt.shape:
            raise DataError(
                f"{mask_path}: size {pred.shape} does not match ground truth {gt_path} size {gt.shape}"
            )
        if (pred == IGNORE_INDEX).any():
            if ignore_as is None:
                raise DataError(
                    f"{mask_path}: has unlabelled pixels ({IGNORE_INDEX}); pass ignore_as=0 to score "
                    f"them as background"
                )
            pred = np.where(pred == IGNORE_INDEX, np.uint8(ignore_as), pred)
        conf += confusion_matrix(pred, gt, num_classes)
    if shard is not None:
        all_reduce_sum(conf)
    out = segmentation_scores(conf)
    out["count"] = len(ids)
    return out


# ----------------------------------------------------------------------------------------- output


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


output_ids = ids_in  # the ids a folder holds: one rule, fsae.io.ids_in


EVAL_KEYS = ("miou", "best")  # an evaluation JSON's own keys: masks' scores / seeds' threshold sweep


def save_eval(path: str | os.PathLike, result: dict[str, Any], scored: str | os.PathLike | None = None,
              gt_dir: str | os.PathLike | None = None, ids: Sequence[str] | None = None,
              ignore_as: int | None = None) -> Path:
    """Write a result dict as JSON, atomically; NaN (class with empty union) becomes null. ``path`` may be
    new or an evaluation fsae wrote before (``EVAL_KEYS``); a folder or another file is refused (DataError).

    With ``scored`` (the seed or mask folder evaluated, against ``gt_dir``, over ``ids``) the JSON also
    records what it scored, so ``fsae report`` / ``fsae compare`` can tell when it is stale and redo it::

        "scored": {"dir": path from the JSON's folder, "stamp": fsae.stamps.folder_digest(dir),
                   "gt": absolute GT folder, "ids": null (every output file of dir) or [ids...],
                   "ignore_as": ...}
    """
    path = check_replaceable(path, json_object_with(EVAL_KEYS), "an fsae evaluation (JSON)")
    result = dict(result)
    if scored is not None:
        suffix = ".npz" if "best" in result else ".png"
        ids = None if ids is None or sorted(ids) == output_ids(scored, suffix) else list(ids)
        result["scored"] = {"dir": os.path.relpath(Path(scored).absolute(), path.parent.absolute()),
                            "stamp": folder_digest(scored), "gt": str(Path(gt_dir).absolute()),
                            "ids": ids, "ignore_as": ignore_as}
    return write_json(path, _json_safe(result))


def _class_names(num_labels: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        if num_labels == len(VOC_CLASSES) + 1:
            return ["background", *VOC_CLASSES]
        return ["background", *(f"class{c}" for c in range(1, num_labels))]
    names = list(class_names)
    return names if len(names) == num_labels else ["background", *names]


def format_scores_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Text table, percent with one decimal, of an ``evaluate_seeds`` or ``evaluate_masks`` result.

    ``class_names`` are the C foreground names (or C + 1 with background); VOC names by default
    when C = 20.
    """

    def pct(v: float | None) -> str:
        return "  n/a" if v is None or math.isnan(v) else f"{100 * v:5.1f}"

    lines = []
    if "best" in result:
        best = result["best"]
        lines.append(
            f"seeds: {result['count']} images, best threshold {best['threshold']:.2f}: "
            f"mIoU {pct(best['miou']).strip()}  FPR {pct(best['fpr']).strip()}  "
            f"FNR {pct(best['fnr']).strip()}"
        )
        lines.append("threshold  mIoU")
        lines += [f"{t:9.2f}  {pct(v)}" for t, v in zip(result["thresholds"], result["miou"])]
        iou = best["iou"]
    else:
        lines.append(
            f"masks: {result.get('count', '?')} images: mIoU {pct(result['miou']).strip()}  "
            f"FPR {pct(result['fpr']).strip()}  FNR {pct(result['fnr']).strip()}  "
            f"pixel acc {pct(result['pixel_accuracy']).strip()}"
        )
        iou = result["iou"]
    names = _class_names(len(iou), class_names)
    width = max(len(n) for n in names)
    lines.append(f"{'class':<{width}}  IoU")
    lines += [f"{n:<{width}}  {pct(v)}" for n, v in zip(names, iou)]
    return "\n".join(lines)
