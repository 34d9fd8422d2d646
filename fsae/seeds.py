"""Seed files (``seeds/<id>.npz``, written by ``fsae.infer.save_seed``): reading and checking them.

numpy only, no torch, so the dense-CRF worker processes (``fsae.refine.crf``) start quickly. The format
is described in ``fsae.evaluate``: ``keys`` (K,) int in 1..C, ``cams`` (K, H, W) float16 in [0, 1], and an
optional ``background`` (H, W) plane.

Quantised storage (``save_seed(..., dtype="uint8")``, ``fsae cam --seed-dtype uint8``): ``cams`` (and
``background``) uint8 on a grid aligned with the background thresholds. A value ``x`` in [0, 1] is stored as
``q`` = the number of grid points ``j / 200`` (float32) below it, 0..200, and read back as the middle of its
cell, ``(q - 0.5) / 200`` (0 for ``q = 0``); for every threshold ``t = j / 200`` (every multiple of 0.005 in
[0, 1], so every sweep of two-decimal thresholds) ``t >= x`` then holds for the stored value exactly when it
holds for ``x``. Where several planes share a cell, the order between them is kept by ``argmax`` (H, W)
uint8, the index of the winning plane of ``[background, cams...]`` (``np.argmax``, as ``seed_to_mask``): the
winner is read back ``QUANT_NUDGE`` above its cell's middle (still inside the cell). So a uint8 seed gives
exactly the masks of the float32 CAMs it was made from at every grid threshold, and every value is within
``QUANT_MAX_ERROR`` = 1/400 + 1e-4 = 0.0026 of it. The file also holds ``levels = 200``. ``load_seed`` reads
both storages alike; ``strided`` (1/16 of the pixels) stays float16.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from fsae.errors import DataError
from fsae.io import atomic_write

SEED_DTYPES = ("float16", "uint8")
QUANT_LEVELS = 200  # grid step 1/200 = 0.005: every two-decimal background threshold is a grid point
QUANT_NUDGE = 1e-4  # the winning plane above its cell's middle; far below the half cell, 0.0025
QUANT_MAX_ERROR = 0.5 / QUANT_LEVELS + QUANT_NUDGE
_GRID = (np.arange(QUANT_LEVELS + 1) / QUANT_LEVELS).astype(np.float32)  # the thresholds j / 200, as compared
_CELL_MIDDLE = np.concatenate([[0.0], (np.arange(1, QUANT_LEVELS + 1) - 0.5) / QUANT_LEVELS]).astype(np.float32)


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
            keys = data["keys"]
            cams, background = _read_planes(path, data)
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
    if not np.isfinite(cams).all():
        raise DataError(f"{path}: 'cams' contains NaN or inf; rerun inference")
    if not with_background:
        return keys.astype(np.int64), cams
    if background is not None:
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


def _read_planes(path: Path, data) -> tuple[np.ndarray, np.ndarray | None]:
    """``cams`` and the optional ``background`` of an open seed file as float32: as stored, or read back
    from the uint8 grid (module docstring)."""
    cams = data["cams"]
    background = data["background"] if "background" in data.files else None
    if cams.dtype != np.uint8:
        return cams.astype(np.float32), None if background is None else background.astype(np.float32)
    levels = int(data["levels"]) if "levels" in data.files and data["levels"].size == 1 else None
    if levels != QUANT_LEVELS:
        raise DataError(f"{path}: 'cams' is uint8 (quantised) but 'levels' is {levels}, not {QUANT_LEVELS}; "
                        f"rerun `fsae cam`")
    planes = [cams] if background is None else [background[None], cams]
    if cams.ndim != 3 or any(a.dtype != np.uint8 or a.shape[1:] != cams.shape[1:] for a in planes):
        raise DataError(f"{path}: quantised 'cams' {cams.shape} and 'background' must be uint8 (K, H, W) and "
                        f"(H, W); rerun `fsae cam`")
    q = np.concatenate(planes, 0)
    if q.size and q.max() > QUANT_LEVELS:
        raise DataError(f"{path}: quantised 'cams' has values above {QUANT_LEVELS}; rerun `fsae cam`")
    values = _CELL_MIDDLE[q]
    if "argmax" in data.files:
        winner = data["argmax"]
        if winner.shape != cams.shape[1:] or winner.dtype != np.uint8 or (winner.size and winner.max() >= len(q)):
            raise DataError(f"{path}: 'argmax' must be a (H, W) uint8 index into the {len(q)} quantised planes, "
                            f"got {winner.dtype} {winner.shape}; rerun `fsae cam`")
        flat, at = values.reshape(-1), winner.reshape(-1).astype(np.intp) * winner.size + np.arange(winner.size)
        flat[at] += np.where(flat[at] > 0, np.float32(QUANT_NUDGE), np.float32(0))  # cell 0 (x = 0) stays 0
    return (values, None) if background is None else (values[1:], values[0])


def quantise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 grid cells 0..200 (module docstring), any shape.

    ``_CELL_MIDDLE[q]`` is within 1/400 of the input, and ``t >= x`` iff ``t >= _CELL_MIDDLE[q]`` for every
    float32 grid point ``t = j / 200``.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise ValueError("uint8 seed storage needs CAM values in [0, 1] (normalised CAMs)")
    return np.searchsorted(_GRID, values, side="left").astype(np.uint8)


def save_seed(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray,
              background: np.ndarray | None = None, strided: np.ndarray | None = None,
              dtype: str = "float16") -> Path:
    """Write one seed file atomically: keys int64, cams and background ``dtype`` (``SEED_DTYPES``:
    float16, or uint8 on the threshold grid, module docstring), strided float16."""
    if dtype not in SEED_DTYPES:
        raise ValueError(f"seed dtype must be one of {SEED_DTYPES}, got {dtype!r}")
    planes = {name: a for name, a in (("cams", cams), ("background", background)) if a is not None}
    arrays: dict[str, np.ndarray] = {"keys": np.asarray(keys).astype(np.int64)}
    for name, a in planes.items():
        arrays[name] = quantise(a) if dtype == "uint8" else np.asarray(a).astype(np.float16)
    if dtype == "uint8":
        arrays["levels"] = np.array(QUANT_LEVELS, dtype=np.int64)
        stacked = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1, *np.shape(cams)[1:])
                                  for a in (background, cams) if a is not None], 0)
        if len(stacked) > 1:  # which plane wins where several share a cell
            arrays["argmax"] = np.argmax(stacked, 0).astype(np.uint8)
    if strided is not None:
        arrays["strided"] = np.asarray(strided).astype(np.float16)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)
