"""Seed files of the base methods' own repositories, read as fsae seeds (keys, cams, background).

``fsae`` is fsae's own ``<id>.npz`` (``fsae.seeds``). Each base repository writes one ``<id>.npy`` per
image, an ``np.save`` of a Python dict:

``irn``        ``{"keys": (K,) 0-based foreground class indices (a torch tensor), "cam": (K, h, w)
               stride-4 torch tensor, "high_res": (K, H, W) float32}``, max-normalised
               (jiwoon-ahn/irn step/make_cam.py:46-56). Scored from ``high_res``: a constant
               background plane = threshold in front, argmax, label = key + 1 (step/eval_cam.py:13-18).
``sipe``       ``{"keys": (K+1,) int64 in the label space, 0 = background first, "IS_CAM": (K+1, H, W)
               float32}``, max-normalised, row 0 the background (chenqi1126/SIPE make_cam.py:51-70).
               Scored by the plain argmax, label = keys[argmax] (eval_cam.py:17-21).
``psa``        ``{c: (H, W) float32}`` for the present classes, c the 0-based foreground index,
               max-normalised (jiwoon-ahn/psa infer_cls.py:74-83); SEAM / PPC (usr922/wseg esp
               contrast_infer.py:202-225; the FSAE authors' obeychoi0120/wseg ssl
               contrast_infer.py:207-238) and EPS (halbielee/EPS infer.py:187-204) write the same dict.
``mctformer``  the same dict, min-max normalised, float16 under autocast (xulianuwa/MCTformer@9606597
               engine.py:188-208). Scored as ``psa``: background plane = threshold, maps at key + 1,
               argmax (evaluation.py:28-36).

The readers return fsae's seed representation (``fsae.seeds``): keys (K,) int64 in 1..C, cams
(K, H, W) float32, and SIPE's background plane (H, W) or None. The dict formats list the classes in
index order, as the reference evaluations stack them; IRN and SIPE keep the file's order (their
argmax breaks ties in it). The ``.npy`` files are pickles: they are read by an unpickler that builds
only numpy arrays, dicts and CPU torch tensors, so a file cannot run code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fsae.errors import DataError
from fsae.seeds import load_seed, save_seed
from fsae.stamps import folder_digest, make_stamp, stage_output

FORMATS = ("fsae", "irn", "sipe", "psa", "mctformer")
FOREIGN_FORMATS = FORMATS[1:]
_DICT_KEYS = {"irn": ("keys", "high_res"), "sipe": ("keys", "IS_CAM")}


def seed_suffix(seed_format: str) -> str:
    """File suffix of one image's seed in ``seed_format``."""
    if seed_format not in FORMATS:
        raise ValueError(f"unknown seed format {seed_format!r}; one of {', '.join(FORMATS)}")
    return ".npz" if seed_format == "fsae" else ".npy"


# ----------------------------------------------------------------------------------------- pickles


def _load_from_bytes(data: bytes):
    """A pickled torch storage, read back without running code (``torch.storage._load_from_bytes``
    would call ``torch.load(weights_only=False)``)."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor_v2(*args):
    from torch._utils import _rebuild_tensor_v2

    return _rebuild_tensor_v2(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # numpy's own unpickling helpers, found from what numpy pickles itself with (numpy 1 and 2 name
    # their module differently: numpy.core / numpy._core).
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "_reconstruct")] = reconstruct
        allowed[(core, "scalar")] = scalar
    return allowed


class _Refused(pickle.UnpicklingError):
    pass


class _SeedUnpickler(pickle.Unpickler):
    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_npy_dict(path: str | os.PathLike) -> dict:
    """The dict an ``np.save(path, {...})`` wrote, unpickled without running code.

    Raises DataError naming the file when it is missing, not a ``.npy`` file, holds an array instead of a
    dict, or pickles anything but numpy arrays, dicts and torch tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: seed file not found")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            if dtype != object or shape != ():
                raise DataError(f"{path}: holds a {dtype} array of shape {shape}, not a dict; expected "
                                f"np.save of a dict of class maps")
            array = _SeedUnpickler(f).load()
    except DataError:
        raise
    except _Refused as exc:
        raise DataError(f"{path}: pickles {exc}, not read: seed files are read as numpy arrays, dicts and "
                        f"torch tensors only (a pickle can run code)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file is the file's fault
        raise DataError(f"{path}: cannot read it as an np.save of a dict ({exc})") from exc
    value = array.item() if isinstance(array, np.ndarray) and array.shape == () else array
    if not isinstance(value, dict):
        raise DataError(f"{path}: holds a {type(value).__name__}, not a dict; expected np.save of a dict "
                        f"of class maps")
    return value


# ----------------------------------------------------------------------------------------- checks


def _numbers(path: Path, field: str, value, ndim: int) -> np.ndarray:
    """``value`` (numpy array or torch tensor) as a finite float32 array of ``ndim`` dimensions."""
    array = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: {field} must be a real-valued array, got {array.dtype}")
    if array.ndim != ndim:
        raise DataError(f"{path}: {field} must have {ndim} dimensions, got shape {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: {field} contains NaN or inf")
    return array


def _indices(path: Path, field: str, value) -> np.ndarray:
    array = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: {field} must be a 1-D integer array, got {array.dtype} {array.shape}")
    if len(np.unique(array)) != len(array):
        raise DataError(f"{path}: {field} {array.tolist()} repeats a class")
    return array.astype(np.int64)


def _check_range(path: Path, field: str, indices: np.ndarray, low: int, num_classes: int | None,
                 meaning: str) -> None:
    """Indices must lie in ``low .. low + C - 1`` (``C = num_classes``, else at most 254 labels)."""
    high = low + (num_classes if num_classes is not None else 254) - 1
    bad = indices[(indices < low) | (indices > high)]
    if bad.size:
        raise DataError(f"{path}: {field} has class index {bad.tolist()} out of range {low}..{high} "
                        f"({meaning})")


def _require(path: Path, data: dict, fields: Sequence[str], seed_format: str) -> None:
    missing = [k for k in fields if k not in data]
    if missing:
        raise DataError(f"{path}: a {seed_format} seed file is a dict with {list(fields)}; it lacks "
                        f"{missing} (has {list(data)[:8]})")


# ----------------------------------------------------------------------------------------- readers


def _read_irn(path: Path, data: dict, num_classes: int | None):
    # step/make_cam.py:56 saves keys = nonzero(label) (0-based), eval_cam.py:14-18 scores high_res.
    _require(path, data, _DICT_KEYS["irn"], "irn")
    keys = _indices(path, "'keys'", data["keys"])
    _check_range(path, "'keys'", keys, 0, num_classes, "irn stores 0-based foreground indices")
    cams = _numbers(path, "'high_res'", data["high_res"], 3)
    if cams.shape[0] != keys.size:
        raise DataError(f"{path}: 'high_res' has {cams.shape[0]} maps for {keys.size} 'keys'")
    return keys + 1, cams, None


def _read_sipe(path: Path, data: dict, num_classes: int | None):
    # make_cam.py:51 pads the label with background in front; eval_cam.py:20 takes the plain argmax.
    _require(path, data, _DICT_KEYS["sipe"], "sipe")
    keys = _indices(path, "'keys'", data["keys"])
    if keys.size == 0 or keys[0] != 0:
        raise DataError(f"{path}: sipe 'keys' {keys.tolist()} must start with 0, the background row of "
                        f"'IS_CAM'")
    _check_range(path, "'keys'", keys[1:], 1, num_classes, "sipe stores labels, 0 = background")
    maps = _numbers(path, "'IS_CAM'", data["IS_CAM"], 3)
    if maps.shape[0] != keys.size:
        raise DataError(f"{path}: 'IS_CAM' has {maps.shape[0]} maps for {keys.size} 'keys'")
    return keys[1:], maps[1:], maps[0]


def _read_class_dict(path: Path, data: dict, num_classes: int | None, seed_format: str):
    # psa infer_cls.py:80 / MCTformer engine.py:201: cam_dict[c] = map, c the 0-based foreground index.
    if not data or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in data):
        raise DataError(f"{path}: a {seed_format} seed file is a dict {{class index: (H, W) map}}; got "
                        f"keys {list(data)[:8]}")
    classes = np.array(sorted(int(k) for k in data), dtype=np.int64)
    _check_range(path, "the dict", classes, 0, num_classes, f"{seed_format} stores 0-based foreground indices")
    maps = [_numbers(path, f"map [{c}]", data[c], 2) for c in classes]
    if len({m.shape for m in maps}) > 1:
        raise DataError(f"{path}: class maps differ in size: "
                        f"{ {int(c): m.shape for c, m in zip(classes, maps)} }")
    maps = np.stack(maps)
    if len(classes) > 1 and classes[0] == 0 and np.allclose(maps.sum(0), 1.0, atol=1e-3):
        # psa infer_cls.py:98-100 / MCTformer engine.py:233-235 save CRF scores as {0: background, c + 1: ...}
        raise DataError(f"{path}: its maps sum to 1 at every pixel: a dense-CRF output dict (0 = background), "
                        f"not a CAM dict; evaluate the CAM folder (psa --out_cam, MCTformer --cam-npy-dir)")
    return classes + 1, maps, None


def read_foreign_seed(path: str | os.PathLike, seed_format: str, num_classes: int | None = None):
    """One image's seed file of a base repository -> keys (K,) int64 in 1..C, cams (K, H, W) float32,
    background (H, W) float32 or None (SIPE's IS-CAM background row).

    ``num_classes``, when given, bounds the class indices. Raises DataError naming the file.
    """
    if seed_format not in FOREIGN_FORMATS:
        raise ValueError(f"unknown foreign seed format {seed_format!r}; one of {', '.join(FOREIGN_FORMATS)}")
    path = Path(path)
    data = load_npy_dict(path)
    if seed_format == "irn":
        return _read_irn(path, data, num_classes)
    if seed_format == "sipe":
        return _read_sipe(path, data, num_classes)
    return _read_class_dict(path, data, num_classes, seed_format)


# ----------------------------------------------------------------------------------------- detection


def sniff_format(path: str | os.PathLike) -> str:
    """The format of one ``.npy`` seed file, from its dict's keys. ``psa`` stands for the class-index
    dict that MCTformer writes too (both are read and scored alike)."""
    path = Path(path)
    data = load_npy_dict(path)
    matches = [f for f, fields in _DICT_KEYS.items() if all(k in data for k in fields)]
    if len(matches) > 1:
        raise DataError(f"{path}: has both irn {list(_DICT_KEYS['irn'])} and sipe {list(_DICT_KEYS['sipe'])} "
                        f"entries; pass --format")
    if matches:
        return matches[0]
    if data and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in data):
        return "psa"
    raise DataError(f"{path}: cannot tell its format from the dict keys {list(data)[:8]}: irn has 'keys' and "
                    f"'high_res', sipe 'keys' and 'IS_CAM', psa / mctformer class indices; pass --format")


def detect_format(seed_dir: str | os.PathLike, ids: Sequence[str] | None = None) -> str:
    """The seed format of a folder, from its first seed file (of ``ids[0]``, or in name order).

    ``.npz`` files are fsae's; a ``.npy`` file is sniffed (``sniff_format``). A folder (or id) with
    both kinds, or with neither, is a DataError naming it.
    """
    seed_dir = Path(seed_dir)
    if ids:
        found = [seed_dir / f"{ids[0]}{s}" for s in (".npz", ".npy") if (seed_dir / f"{ids[0]}{s}").is_file()]
        where = f"{seed_dir / ids[0]}.npz/.npy"
    else:
        found = sorted(p for p in seed_dir.glob("*.np[yz]") if not p.name.startswith("."))
        where = str(seed_dir)
    suffixes = {p.suffix for p in found}
    if not found:
        raise DataError(f"{where}: no seed files (<id>.npz of fsae, <id>.npy of a base repository)")
    if len(suffixes) > 1:
        raise DataError(f"{where}: has both .npz (fsae) and .npy seed files; pass --format")
    return "fsae" if suffixes == {".npz"} else sniff_format(found[0])


# ----------------------------------------------------------------------------------------- convert


def _unit_range(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """Values into [0, 1]: above 1 is a DataError; below 0 (SEAM's min-max leaves values of about -1e-5,
    obeychoi0120/wseg contrast_infer.py:213) is clipped to 0, the same mask for thresholds >= 0."""
    if array.size and array.max() > 1:
        raise DataError(f"{path}: {name} reaches {float(array.max()):.4g} > 1; fsae seeds hold CAMs in "
                        f"[0, 1], normalise them first")
    return np.clip(array, 0.0, None)


def convert_seeds(seed_dir: str | os.PathLike, seed_format: str, out_dir: str | os.PathLike,
                  ids: Sequence[str], num_classes: int | None = None, force: bool = False) -> dict:
    """Write ``out_dir/<id>.npz`` fsae seeds (``fsae.seeds.save_seed``, atomic) from a base repository's
    ``seed_dir/<id>.npy`` files. Cams and background become float16, so a map value within float16
    rounding (2^-11 relative) of a threshold can fall on the other side of it. ``out_dir`` is stamped with
    the source folder and the format (``fsae.stamps``): seeds converted from elsewhere are not mixed in
    (``force`` builds the new seeds beside them and swaps them in at the end: ``fsae.stamps.stage_output``;
    one writer per folder).

    Returns {"written": n, "out": path}.
    """

    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    if not ids:
        raise DataError(f"{seed_dir}: no seed files (<id>.npy) to convert")
    stamp = make_stamp("convert", {"source": folder_digest(seed_dir)}, {"format": seed_format,
                                                                         "num_classes": num_classes})
    with stage_output(out_dir, stamp, force, ("*.npz",), load_seed) as target:
        for image_id in ids:
            path = seed_dir / f"{image_id}{seed_suffix(seed_format)}"
            keys, cams, background = read_foreign_seed(path, seed_format, num_classes)
            cams = _unit_range(path, "the class maps", cams)
            if background is not None:
                background = _unit_range(path, "the background map", background)
            save_seed(target / f"{image_id}.npz", keys, cams, background)
    return {"written": len(ids), "out": out_dir}


def read_seed(path: str | os.PathLike, seed_format: str = "fsae", num_classes: int | None = None):
    """One image's seed in any format of ``fsae.formats.FORMATS`` -> keys (K,) int64 in 1..C, cams
    (K, H, W) float32, background (H, W) float32 or None. ``fsae`` reads ``load_seed``; the base
    repositories' ``.npy`` files go through ``fsae.formats.read_foreign_seed`` (``num_classes`` bounds
    their class indices)."""
    if seed_format == "fsae":
        return load_seed(path, with_background=True)
    return read_foreign_seed(path, seed_format, num_classes)
