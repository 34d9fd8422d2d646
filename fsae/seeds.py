"""Seed files (``seeds/<id>.npz``, written by ``fsae.infer.save_seed``): reading and checking them.

numpy only, no torch, so the dense-CRF worker processes (``fsae.refine.crf``) start quickly. The format
is described in ``fsae.evaluate``: ``keys`` (K,) int in 1..C, ``cams`` (K, H, W) float16 in [0, 1], and an
optional ``background`` (H, W) plane.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from fsae.errors import DataError
from fsae.io import atomic_write


def load_seed(path: str | os.PathLike, with_background: bool = False):
    """Read a seed file. Returns keys (K,) int64 in 1..255 and cams (K, H, W) float32; with
    ``with_background`` also the optional ``background`` plane (H, W) float32, or None.

    Raises DataError naming the file when it is missing, corrupt, lacks ``keys`` / ``cams``, or the
    arrays do not agree.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: seed file not found; run `fsae cam` for this image first")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("keys", "cams") if k not in data.files]
            if missing:
                raise DataError(
                    f"{path}: seed file lacks {missing} (has {data.files}); expected keys 'keys' (K,) "
                    f"and 'cams' (K, H, W)"
                )
            keys, cams = data["keys"], data["cams"]
            background = data["background"] if "background" in data.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(
            f"{path}: cannot read seed file ({exc}); it is corrupt or truncated, rerun inference"
        ) from exc
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise DataError(f"{path}: 'keys' must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise DataError(
            f"{path}: 'cams' must have shape (K, H, W) with K = len(keys) = {keys.shape[0]}, "
            f"got {cams.shape}"
        )
    if keys.size and (keys.min() < 1 or keys.max() > 254):
        raise DataError(f"{path}: 'keys' {keys.tolist()} must be class labels in 1..C (0 is background)")
    cams = cams.astype(np.float32)
    if not np.isfinite(cams).all():
        raise DataError(f"{path}: 'cams' contains NaN or inf; rerun inference")
    if not with_background:
        return keys.astype(np.int64), cams
    if background is not None:
        background = background.astype(np.float32)
        if background.shape != cams.shape[1:] or not np.isfinite(background).all():
            raise DataError(f"{path}: 'background' must be a finite (H, W) = {cams.shape[1:]} plane, got "
                            f"shape {background.shape}; rerun inference")
    return keys.astype(np.int64), cams, background


def check_seed(keys: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {len(keys)}, got {cams.shape}")
    if keys.size and (keys.min() < 1 or keys.max() > 254):
        raise ValueError(f"keys {keys.tolist()} must be class labels in 1..C (0 is background)")
    return keys, cams


def save_seed(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray,
              background: np.ndarray | None = None, strided: np.ndarray | None = None) -> Path:
    """Write one seed file atomically: keys int64, cams (and the optional planes) float16."""
    extra = {name: np.asarray(a).astype(np.float16) for name, a in (("background", background), ("strided", strided))
             if a is not None}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=keys.astype(np.int64), cams=cams.astype(np.float16), **extra)

    return atomic_write(path, write)
