"""One writer per output folder: an OS file lock beside the folder.

``output_lock(folder)`` (a context manager) takes an exclusive ``fcntl.flock`` on the hidden file
``<parent>/.<name>.lock`` beside ``folder`` (beside it, as the stamp is: the folder holds only outputs)
for as long as the stage writes it. A second process that wants to write the same folder gets, at once,
``FolderLockedError`` naming the folder and the holder's pid (written into the lock file). The lock
belongs to the open file, so the OS drops it when the holder exits in any way, SIGKILL included: a
lock file left by a killed holder is harmless, the next writer locks it again. A holder that finishes
removes its lock file. Within one process the lock is
re-entrant (a stage that calls another stage on the same folder, tests that run stages one after
another). Readers (``fsae eval``, ``fsae report``) take no lock.

This module imports nothing of fsae but the errors (layer 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fsae.errors import DataError, FsaeError

_HELD: dict[str, list] = {}  # real path of a folder -> [open lock file, depth]


class FolderLockedError(FsaeError):
    """Another process is writing the output folder."""


def lock_path(folder: str | os.PathLike, part: str = "") -> Path:
    """The lock file of ``folder``: ``<parent>/.<name>.lock``; of one share of it (``part``, e.g. ``shard-1-of-4``,
    for jobs that split one folder's files): ``<parent>/.<name>.<part>.lock``."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / (f".{folder.name}.{part}.lock" if part else f".{folder.name}.lock")


def _holder(*paths: Path) -> str:
    """``pid N`` of the process that holds one of the lock files ``paths`` exclusively."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return f"pid {text}"
    return "pid unknown"


def _open_lock(folder: Path, part: str, mode: int):
    """The lock file, opened and locked (``mode``: ``LOCK_EX`` / ``LOCK_SH``), without blocking."""
    path = lock_path(folder, part)
    for _ in range(20):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
        except OSError as exc:  # a file in the way, no permission, a read-only file system
            raise DataError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
        except OSError:
            f.close()
            what = "these files of it" if part else "this folder"
            raise FolderLockedError(f"{folder}: another fsae process ({_holder(path, lock_path(folder))}) is "
                                    f"writing {what}; wait for it to finish or write elsewhere") from None
        if _same_file(f, path):  # not a file its last holder removed after we opened it
            break
        f.close()
    if mode == fcntl.LOCK_EX:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    return f


def _same_file(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _release(f, path: Path) -> None:
    """Remove the lock file (when no other process holds it: a shared lock may have company), then unlock."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(f, path):
            path.unlink()
    except OSError:
        pass
    f.close()  # closing the file releases the lock


@contextlib.contextmanager
def _held(folder: Path, part: str, mode: int) -> Iterator[None]:
    """One lock file, re-entrant within this process."""
    key = str(lock_path(os.path.realpath(folder), part))
    entry = _HELD.get(key)
    if entry is None:
        entry = _HELD[key] = [_open_lock(folder, part, mode), 0]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            _release(entry[0], lock_path(folder, part))


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, part: str = "") -> Iterator[Path]:
    """Hold the writer lock of ``folder`` for the ``with`` block (module docstring); yields the folder.

    Without ``part``: exclusive, the one writer of the folder. With ``part`` (e.g. ``shard-1-of-4`` or a digest
    of the ids a job writes), for jobs that split one folder's files: the folder's lock shared (no whole-folder
    writer meanwhile) and the part's exclusive (no second job on the same files). ``FolderLockedError`` (one
    line, the folder and the holder's pid) when another process holds what is needed."""
    folder = Path(folder)
    if part and not locked(folder):
        with _held(folder, "", fcntl.LOCK_SH), _held(folder, part, fcntl.LOCK_EX):
            yield folder
        return
    with _held(folder, "", fcntl.LOCK_EX):  # (held already by this process: re-entered, whatever its mode)
        yield folder


def locked(folder: str | os.PathLike, part: str = "") -> bool:
    """Whether this process holds ``folder``'s lock (of share ``part``)."""
    return str(lock_path(os.path.realpath(folder), part)) in _HELD


def alone(folder: str | os.PathLike) -> bool:
    """Whether no other process writes ``folder`` now: this process's lock on it made exclusive, if it can be
    (for a job that shares the folder and is about to leave it: the change may drop its shared lock first)."""
    entry = _HELD.get(str(lock_path(os.path.realpath(folder))))
    if entry is None:
        return False
    try:
        fcntl.flock(entry[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
