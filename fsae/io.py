"""Reading and writing images, masks and arrays: atomic writes, errors that name the file."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from fsae.errors import DataError
from fsae.labels import voc_palette


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: a killed run leaves no half-written file.
    DataError when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file name; give the file to write (e.g. {path / 'out'}"
                        f"{path.suffix or '.json'})")
    ensure_output_dir(path.parent)
    tmp = _new_temp_file(path)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _new_temp_file(path: Path) -> str:
    """An empty hidden ``.<name>.<random>.tmp<suffix>`` beside ``path``, created with mode 0666 minus the
    umask (as ``open()`` would create ``path`` itself; ``mkstemp``'s 0600 would hide outputs from a group)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file for {path.name}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB image as (H, W, 3) uint8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); the file is corrupt or not an image") from exc


def read_mask(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Label-space mask (palette or grey PNG) as (H, W) uint8; values checked against 0..C and 255."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: mask must be a palette or greyscale PNG, got mode {im.mode}")
            mask = np.asarray(im, dtype=np.uint8).copy()
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc}); the file is corrupt or truncated") from exc
    if num_classes is not None:
        bad = np.unique(mask[(mask > num_classes) & (mask != 255)])
        if bad.size:
            raise DataError(
                f"{path}: mask values {bad.tolist()[:8]} are outside 0..{num_classes} and 255 (ignore): out of range "
                f"for {num_classes} classes"
            )
    return mask


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a label-space mask as a VOC-palette PNG, atomically."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def write_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> Path:
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    return atomic_write(path, lambda tmp: im.save(tmp, format=fmt, **kwargs))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


def ids_in(folder: str | os.PathLike, suffix: str) -> list[str]:
    """Ids of the ``folder/<id><suffix>`` files, sorted. Hidden files (a killed run's partial
    ``.<name>.<random>.tmp`` writes, a forced run's ``.<name>.forcing/``) are not outputs."""
    return sorted(p.stem for p in Path(folder).glob(f"*{suffix}") if not p.name.startswith("."))


def read_id_list(path: str | os.PathLike) -> list[str]:
    """An ImageSets-style list: one id per line (extra columns, as in train_aug.txt paths, ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image list not found")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        first = line.split()[0]
        ids.append(Path(first).stem if "/" in first else first)
    if not ids:
        raise DataError(f"{path}: image list is empty")
    return ids


def write_grey_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a (H, W) uint8 array as a greyscale PNG (e.g. a saliency map), atomically."""
    im = Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L")
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_replaceable(path: str | os.PathLike, ours: Callable[[str], bool], what: str) -> Path:
    """``path`` as the file a command writes (``--out``): DataError when it is a folder, or when it exists
    and is not what the command wrote before (``ours(text)`` false, or not text: a file fsae did not write
    is never overwritten). ``what`` names the kind, e.g. "an fsae evaluation (JSON)". Returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; --out takes the file to write ({what}), e.g. {path / 'out'}"
                        f"{path.suffix}")
    if path.exists():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or not ours(text):
            raise DataError(f"{path}: exists and is not {what} written by fsae; not overwritten (move it away or "
                            f"choose another --out)")
    return path


def json_object_with(keys) -> Callable[[str], bool]:
    """``ours`` for ``check_replaceable``: JSON text of an object holding any of ``keys`` (or a list of such)."""

    def ours(text: str) -> bool:
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        items = obj if isinstance(obj, list) and obj else [obj]
        return all(isinstance(o, dict) and any(k in o for k in keys) for o in items)

    return ours


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (with parents) and check it is writable; DataError naming it if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only file system
        raise DataError(f"{path}: cannot create the output folder ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK):
        raise DataError(f"{path}: output folder is not writable")
    return path
