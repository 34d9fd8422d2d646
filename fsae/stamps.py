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

Stages call it through ``stage_output`` (a context manager), which adds what a guard of days of work needs:

- one writer: it holds the folder's lock (``fsae.lock.output_lock``) while the stage writes;
- ``force`` never destroys first: when the folder already holds outputs (or a stamp), the new output is
  built in the hidden staging folder ``<parent>/.<name>.forcing/`` (stamped like any folder, so a killed
  forced run resumes there when rerun with ``--force``) and swapped in only when the stage's ``with``
  block ends without an error; a failure leaves the old outputs and their stamp as they were;
- no empty stamped folder: a stage that stops (bad input, an error, Ctrl-C) before its first output
  removes the stamp it wrote and the folder it created.

A new stage needs three calls (``fsae.refine.crf.refine_dir`` is one)::

    stamp = make_stamp("psa", {"seeds": folder_digest(seed_dir)}, {"beta": beta, "exp_times": exp_times})
    with stage_output(out_dir, stamp, force, ("*.png",), read=fsae.io.read_mask) as target:
        todo = [i for i in ids if not (target / f"{i}.png").is_file()]   # then write each atomically

and its CLI command a ``--force`` flag. An evaluation records ``folder_digest`` of the folder it scored (``fsae.evaluate.save_eval``), so
``fsae report`` / ``fsae compare`` see when it is stale (``fsae.rundir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fsae import __version__
from fsae.errors import FsaeError
from fsae.io import ensure_output_dir, write_json
from fsae.lock import alone, output_lock

STAMP_SUFFIX = ".stamp.json"
STAGING_SUFFIX = ".forcing"  # <parent>/.<name>.forcing/: a forced run's new output until it is swapped in
OLD_SUFFIX = ".replaced"  # <parent>/.<name>.replaced/: the old output during the swap
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


def ids_part(ids: Sequence[str]) -> str:
    """The lock ``part`` of a job that writes the files of ``ids``: ``ids-<digest>`` (two jobs on the same ids
    exclude each other, shards of one list do not)."""
    return "ids-" + _digest(_canonical(sorted(map(str, ids))))[:12]


def staging_path(folder: str | os.PathLike) -> Path:
    """Where a forced run builds ``folder``'s new output: ``<parent>/.<name>.forcing``."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}{STAGING_SUFFIX}"


def _old_path(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}{OLD_SUFFIX}"


def _remove_folder(folder: Path) -> None:
    """``folder`` and its stamp, gone."""
    shutil.rmtree(folder, ignore_errors=True)
    stamp_path(folder).unlink(missing_ok=True)


def _finish_swap(folder: Path) -> None:
    """A swap that a kill interrupted: the old output back where it was (none in place) or gone (the new one
    is in place)."""
    old = _old_path(folder)
    if not old.is_dir():
        return
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, folder)


def _swap_in(staging: Path, folder: Path, stamp: dict, patterns: Sequence[str]) -> None:
    """The staging folder becomes ``folder``: what the old folder held besides its outputs (and partial
    writes) moves over, the old folder is renamed aside, the staging folder renamed in, the stamp written,
    the old folder deleted."""
    if not folder.is_dir():  # removed meanwhile
        os.replace(staging, folder)
        write_json(stamp_path(folder), stamp)
        stamp_path(staging).unlink(missing_ok=True)
        return
    outputs = set(output_files(folder, patterns))
    for entry in folder.iterdir():
        keep = entry not in outputs and not (entry.name.startswith(".") and ".tmp" in entry.name)
        if keep and not (staging / entry.name).exists():
            os.replace(entry, staging / entry.name)
    old = _old_path(folder)
    os.replace(folder, old)
    os.replace(staging, folder)
    write_json(stamp_path(folder), stamp)
    stamp_path(staging).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def stage_output(folder: str | os.PathLike, stamp: dict, force: bool = False, patterns: Sequence[str] = ("*",),
                 read: Callable[[Path], Any] | None = None, part: str = "") -> Iterator[Path]:
    """``prepare_output`` for a stage that writes ``folder`` in the ``with`` block, under the folder's lock;
    yields the folder to write into: ``folder`` itself, or with ``force`` over existing outputs its staging
    folder, swapped in when the block ends without an error (module docstring). ``FolderLockedError`` when
    another process writes ``folder``; ``StaleOutputError`` as ``prepare_output``. ``part``: this job writes a
    share of the folder's files, beside other jobs (``fsae.lock.output_lock``; ``ids_part``)."""
    folder = Path(folder)
    with output_lock(folder, part):
        _finish_swap(folder)
        existing = output_files(folder, patterns) if folder.is_dir() else []
        if force and (existing or read_stamp(folder) is not None):
            staging = staging_path(folder)
            if read_stamp(staging) != stamp:  # a staging folder of another forced run: start again
                _remove_folder(staging)
            prepare_output(staging, stamp, False, patterns, read)
            with _cleaned_if_empty(staging, patterns, True):
                yield staging
            _swap_in(staging, folder, stamp, patterns)
            return
        created = not folder.exists()
        prepare_output(folder, stamp, force, patterns, read)
        with _cleaned_if_empty(folder, patterns, created):
            yield folder


@contextlib.contextmanager
def _cleaned_if_empty(folder: Path, patterns: Sequence[str], created: bool) -> Iterator[None]:
    """On an error in the block: when ``folder`` holds no output and no other job writes it (``alone``), its
    stamp is removed, and the folder too when ``created`` (by this run) and empty."""
    try:
        yield
    except BaseException:
        if folder.is_dir() and not output_files(folder, patterns) and alone(folder):
            stamp_path(folder).unlink(missing_ok=True)
            if created and not any(folder.iterdir()):
                folder.rmdir()
        raise
