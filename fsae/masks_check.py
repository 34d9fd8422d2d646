"""Degenerate pseudo-masks, named before DeepLab trains on them.

``mask_warnings(mask_dir, ids, labels)`` reads the masks ``mask_dir/<id>.png`` (evenly spaced ids, at most
``limit``) and returns one line per oddity, counts included (a warning, not a refusal):

- one label covers >= 95 % of the labelled pixels (not 255) of all checked masks: e.g. CRF masks that are
  all background, on which DeepLab trains to loss 0;
- a class of the image-level labels is missing from the masks of more than half of the checked images
  labelled with it.

``seed_labels(seed_dir, ids)``: the image labels a seed folder carries (each seed's ``keys``), for the
refinement stages, which read no label file. Masks that are missing or do not read are skipped here:
the stages name them themselves. This module does not import torch (CRF workers import its caller).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fsae.errors import FsaeError
from fsae.io import read_mask

DOMINANT = 0.95  # one label's share of the labelled pixels at or above which the masks are degenerate
MISSING = 0.5  # a class missing from more than this share of its images' masks
IGNORE = 255


def _spaced(ids: Sequence[str], limit: int) -> list[str]:
    if len(ids) <= limit:
        return list(ids)
    return [ids[round(k * (len(ids) - 1) / (limit - 1))] for k in range(limit)]


def mask_warnings(mask_dir: str | os.PathLike, ids: Sequence[str], labels: Mapping[str, Iterable[int]],
                  limit: int = 1000) -> list[str]:
    """Warning lines about the masks of ``ids`` (module docstring); ``labels``: id -> classes in 1..C."""
    mask_dir = Path(mask_dir)
    counts = np.zeros(256, dtype=np.int64)
    labelled: dict[int, int] = {}  # class -> checked images labelled with it
    missing: dict[int, int] = {}  # class -> of those, the ones whose mask lacks it
    checked = 0
    for image_id in _spaced(list(ids), limit):
        try:
            mask = read_mask(mask_dir / f"{image_id}.png")
        except FsaeError:
            continue
        checked += 1
        per = np.bincount(mask.ravel(), minlength=256)
        counts += per
        for c in set(int(c) for c in labels.get(image_id, ())):
            labelled[c] = labelled.get(c, 0) + 1
            missing[c] = missing.get(c, 0) + int(per[c] == 0)
    lines = []
    total = int(counts.sum() - counts[IGNORE])
    if total:
        top = int(np.argmax(counts[:IGNORE]))
        share = counts[top] / total
        if share >= DOMINANT:
            lines.append(f"{mask_dir}: label {top}{' (background)' if top == 0 else ''} covers {100 * share:.1f} % "
                         f"of the labelled pixels of {checked} checked masks (>= {100 * DOMINANT:.0f} %): the "
                         f"pseudo-masks are degenerate")
    for c in sorted(labelled):
        if missing[c] > MISSING * labelled[c]:
            lines.append(f"{mask_dir}: class {c} is in the image labels of {labelled[c]} checked images but missing "
                         f"from {missing[c]} of their masks")
    return lines


def seed_labels(seed_dir: str | os.PathLike, ids: Iterable[str]) -> dict[str, list[int]]:
    """``{id: the seed's keys}`` for the seed files of ``ids`` that read (only the ``keys`` array is read)."""
    out = {}
    for image_id in ids:
        try:
            with np.load(Path(seed_dir) / f"{image_id}.npz") as data:
                out[image_id] = [int(k) for k in data["keys"]]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            continue
    return out


def say_warnings(lines: Sequence[str], show: bool = True) -> list[str]:
    """Print each line on stderr as ``fsae: warning: <line>`` (with ``show``); returns ``lines``."""
    if show:
        import sys

        for line in lines:
            print(f"fsae: warning: {line}", file=sys.stderr)
    return list(lines)
