"""Stamps: what made a stage's output folder, so a rerun never mixes old and new outputs.

Every stage writes the stamp of its output folder ``<folder>`` beside it, as ``<folder>.stamp.json``
(``runs/x/seeds.stamp.json`` for ``runs/x/seeds/``; outside the folder, so the folder holds only outputs,
as the VOC evaluation server wants of its results folder), before its first output::

    {"stage": "crf", "inputs": {"seeds": "3f9c..."}, "settings": {"threshold": 0.3, ...}, "fsae": "0.1.0"}

``inputs`` are content digests of what the stage read (``file_digest`` of a checkpoint, ``folder_digest``
of an input folder, which is the digest of that folder's own stamp, so a change anywhere upstream
reaches every folder below it); ``settings`` are the config fields and flags that decide the output.
The data set's images are not hashed: a run directory belongs to one data set.

A stage calls ``prepare_output(folder, stamp, force, patterns)`` once before writing:

- no stamp and no outputs: the stamp is written, the stage starts;
- the same stamp: resume; outputs that no longer read (a corrupt or truncated file) are deleted so the
  stage's skip-finished-files logic writes them again;
- another stamp, or outputs without a stamp (an older fsae, or files put there by hand):
  ``StaleOutputError`` naming what changed, e.g. ``crf: made with threshold 0.1, now 0.5; rerun with
  --force to redo`` (exit 2 through the CLI);
- ``force``: the folder's outputs (the files matching ``patterns``) and partial writes are deleted and the
  new stamp is written.

A new stage needs three calls (``fsae.refine.crf.refine_dir`` is one)::

    stamp = make_stamp("psa", {"seeds": folder_digest(seed_dir)}, {"beta": beta, "exp_times": exp_times})
    prepare_output(out_dir, stamp, force, ("*.png",), read=fsae.io.read_mask)
    todo = [i for i in ids if not (out_dir / f"{i}.png").is_file()]   # then write each atomically

and its CLI command a ``--force`` flag. An evaluation records ``folder_digest`` of the folder it scored (``fsae.evaluate.save_eval``), so
``fsae report`` / ``fsae compare`` see when it is stale (``fsae.rundir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fsae import __version__
from fsae.errors import FsaeError
from fsae.io import ensure_output_dir, write_json

STAMP_SUFFIX = ".stamp.json"
_SHOWN = 4  # changed fields named in a refusal


class StaleOutputError(FsaeError):
    """An output folder was made from other inputs or settings than this run's."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of one file (e.g. a checkpoint): 16 hex digits of its SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def weights_digest(model) -> str:
    """Content hash of a model's ``state_dict`` (names, dtypes, shapes, bytes); for a model not read from a file."""
    import torch  # only here: the rest of this module is read by torch-free worker processes too

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def output_files(folder: str | os.PathLike, patterns: Sequence[str]) -> list[Path]:
    """Files of ``folder`` matching any of ``patterns`` (globs), hidden ones (partial writes) left out."""
    folder = Path(folder)
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    return sorted(found)


def stamp_path(folder: str | os.PathLike) -> Path:
    """Where ``folder``'s stamp is: ``<folder>.stamp.json`` beside it."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / (folder.name + STAMP_SUFFIX)


def read_stamp(folder: str | os.PathLike) -> dict | None:
    """``folder``'s stamp, or None when it has none (an unreadable stamp counts as none)."""
    path = stamp_path(folder)
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def folder_digest(folder: str | os.PathLike) -> str:
    """What a consumer of ``folder`` records as its input: the digest of the folder's stamp; for a folder
    without one (outputs made by hand), the digest of its file listing (names, sizes, modification times)."""
    stamp = read_stamp(folder)
    if stamp is not None:
        return _digest(_canonical(stamp))
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in output_files(folder, ["*"])]
    return "files-" + _digest(_canonical(listing))


def section_settings(section) -> dict[str, Any]:
    """A config section's fields for a stamp, without worker processes, prefetch and memory format (they change
    the speed or the float rounding only), and the precision only when not fp32 (so fp32 stamps read as before
    it existed)."""
    d = dataclasses.asdict(section)  # nested sections (ir_label.crf) as plain dicts
    for name in ("workers", "prefetch", "channels_last"):
        d.pop(name, None)
    if d.get("precision") == "fp32":
        del d["precision"]
    return d


def make_stamp(stage: str, inputs: dict[str, Any], settings: dict[str, Any]) -> dict:
    """A stamp (module docstring). ``inputs``: name -> digest; ``settings``: JSON-able values."""
    return json.loads(_canonical({"stage": stage, "inputs": inputs, "settings": settings, "fsae": __version__}))


def _fields(stamp: dict) -> dict[str, Any]:
    """A stamp as flat ``name -> value``: inputs and settings by their own names, nested ones joined by dots."""
    merged = {k: v for k, v in stamp.items() if k not in ("inputs", "settings")}
    merged.update(stamp.get("inputs", {}))
    merged.update(stamp.get("settings", {}))
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(merged, "")
    return out


def stamp_changes(old: dict, new: dict) -> str:
    """The fields that differ, e.g. ``made with threshold 0.1, now 0.5; iterations 10, now 5``."""
    a, b = _fields(old), _fields(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def value(d, k):
        if k not in d:
            return "(none)"
        return d[k] if isinstance(d[k], str) else json.dumps(d[k])

    text = "; ".join(f"{k} {value(a, k)}, now {value(b, k)}" for k in keys[:_SHOWN])
    more = f"; and {len(keys) - _SHOWN} more fields" if len(keys) > _SHOWN else ""
    return f"made with {text}{more}"


def _readable(path: Path, read: Callable[[Path], Any]) -> bool:
    try:
        read(path)
    except FsaeError:
        return False
    return True


def prepare_output(folder: str | os.PathLike, stamp: dict, force: bool = False,
                   patterns: Sequence[str] = ("*",), read: Callable[[Path], Any] | None = None) -> int:
    """Make ``folder`` ready for a stage that writes the files ``patterns`` (module docstring).

    ``read(path)`` (e.g. ``fsae.io.read_mask``) raises an ``FsaeError`` for an output that no longer reads;
    such files are deleted on resume. Returns the number of files deleted that way. Raises
    ``StaleOutputError`` (one line: the folder and what changed) when the folder was made otherwise.
    """
    folder = ensure_output_dir(folder)
    outputs = output_files(folder, patterns)
    old = read_stamp(folder)
    if force:
        for path in outputs + [p for p in folder.glob(".*.tmp*") if p.is_file()]:
            path.unlink()
    elif old is None and outputs:
        raise StaleOutputError(f"{folder}: holds {len(outputs)} outputs ({outputs[0].name}, ...) but no stamp "
                               f"saying what made them; rerun with --force to redo")
    elif old is not None and old != stamp:
        raise StaleOutputError(f"{folder}: {stamp_changes(old, stamp)}; rerun with --force to redo")
    if force or old != stamp:
        write_json(stamp_path(folder), stamp)
        return 0
    damaged = [p for p in outputs if read is not None and not _readable(p, read)]
    for path in damaged:
        path.unlink()
    return len(damaged)
