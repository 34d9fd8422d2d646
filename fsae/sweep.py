"""The threshold sweep's per-image confusion counts, in numpy only (no torch).

``fsae.evaluate`` scores them (``sweep_confusions``, ``SeedEvaluator``, ``evaluate_seeds``); they live
here, torch-free like ``fsae.seeds``, so that ``evaluate_seeds(..., workers=N)``'s spawned processes start
without importing torch. Label space and seed files as in ``fsae.evaluate``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fsae.errors import DataError
from fsae.formats import read_seed
from fsae.io import read_mask
from fsae.labels import IGNORE_INDEX
from fsae.seeds import check_seed


def sweep_counts(keys: np.ndarray, cams: np.ndarray, gt: np.ndarray, thresholds: Sequence[float],
                 num_classes: int, background: np.ndarray | None = None,
                 ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Confusion counts of the seed's mask at every threshold (``fsae.evaluate.sweep_confusions``).

    Shape: keys (K,), cams (K, H, W), gt (H, W), optional background (H, W) -> (T, C+1, C+1) int64.

    A pixel's foreground argmax (label ``f``, value ``m``) does not depend on the threshold ``t``; the pixel
    is background iff ``t >= m`` (float32, ties to background). With the thresholds sorted,
    ``j0 = searchsorted(t, m)`` is the first threshold index at which it turns background; one bincount
    over (j0, gt, f) gives every threshold's matrix by a suffix sum (still foreground) plus a prefix sum
    into column 0 (already background). A ``background`` plane replaces the threshold: the pixel is
    background iff ``background >= m`` (``seed_to_mask``'s argmax with background first), at every
    threshold alike.
    """
    keys, cams = check_seed(keys, cams)
    gt = np.asarray(gt)
    if gt.shape != cams.shape[1:]:
        raise ValueError(f"gt shape {gt.shape} does not match cams size {cams.shape[1:]}")
    if keys.size and keys.max() > num_classes:
        raise ValueError(f"seed keys {keys.tolist()} have classes above num_classes = {num_classes}")
    t = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all():
        raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {thresholds}")
    k, n_t = num_classes + 1, t.size

    g = gt.reshape(-1).astype(np.int64)
    keep = g != ignore_index
    g = g[keep]
    bad = g[(g < 0) | (g >= k)]
    if bad.size:
        raise ValueError(
            f"gt values {np.unique(bad).tolist()[:8]} are outside 0..{num_classes} and {ignore_index}"
        )
    if keys.size:
        flat = cams.reshape(keys.size, -1)
        peak = flat.max(0)
        label = np.full(peak.shape, keys[-1])
        for j in range(keys.size - 2, -1, -1):  # the first key attaining the max (np.argmax's tie rule)
            label[flat[j] == peak] = keys[j]
        f, m = label[keep], peak[keep]
    else:
        f = np.zeros(g.size, dtype=np.int64)
        m = np.full(g.size, -np.inf, dtype=np.float32)

    order = np.argsort(t, kind="stable")
    if background is None:
        j0 = np.searchsorted(t[order], m, side="left")  # first sorted threshold index with t >= m
    else:
        bg = np.asarray(background, dtype=np.float32).reshape(-1)[keep]
        j0 = np.where(bg >= m, 0, n_t)
    hist = np.bincount((j0 * k + g) * k + f, minlength=(n_t + 1) * k * k).reshape(n_t + 1, k, k)
    conf_sorted = np.cumsum(hist[::-1], 0)[::-1][1:]  # (T, K, K): pixels with j0 > j, still foreground
    conf_sorted[:, :, 0] += np.cumsum(hist.sum(2), 0)[:n_t]  # (T, K): pixels with j0 <= j, by gt
    conf = np.empty_like(conf_sorted)
    conf[order] = conf_sorted
    return conf.astype(np.int64)


def read_seed_and_gt(seed_path: str | os.PathLike, gt_path: str | os.PathLike, num_classes: int,
                     seed_format: str = "fsae", mode: str = "sweep"):
    """One image's seed (``seed_format``: ``fsae.formats.FORMATS``) and GT PNG, checked against each other.

    Returns keys (K,), cams (K, H, W), background (H, W) or None, gt (H, W) uint8; DataError naming the
    files when they do not fit (size, classes, the ``argmax`` mode without a background plane).
    """
    keys, cams, background = read_seed(seed_path, seed_format, num_classes)
    if mode == "argmax" and background is None:
        raise DataError(f"{seed_path}: the argmax protocol (SIPE) needs seeds with a 'background' plane; "
                        f"rerun `fsae cam` with the method's model, or pass --mode sweep")
    gt = read_mask(gt_path, num_classes)
    if gt.shape != cams.shape[1:]:
        raise DataError(
            f"{seed_path}: CAM size {cams.shape[1:]} does not match ground truth {gt_path} size "
            f"{gt.shape}; seeds must be at full image resolution"
        )
    if keys.size and keys.max() > num_classes:
        raise DataError(
            f"{seed_path}: seed classes {keys.tolist()} exceed num_classes = {num_classes}; "
            f"wrong data set or num_classes"
        )
    return keys, cams, background, gt


def count_files(job: tuple) -> tuple[np.ndarray, int]:
    """Pool worker of ``evaluate_seeds``: the summed ``sweep_counts`` of a list of (seed, GT) file pairs.

    ``job = (pairs, num_classes, thresholds, seed_format, mode)`` -> ((T, C+1, C+1) int64, images read).
    """
    pairs, num_classes, thresholds, seed_format, mode = job
    k = num_classes + 1
    total = np.zeros((len(thresholds), k, k), dtype=np.int64)
    for seed_path, gt_path in pairs:
        keys, cams, background, gt = read_seed_and_gt(seed_path, gt_path, num_classes, seed_format, mode)
        total += sweep_counts(keys, cams, gt, thresholds, num_classes, background)
    return total, len(pairs)
