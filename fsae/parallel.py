"""Per-image jobs over a process pool: one progress bar, the same results for any number of workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm


def map_jobs(fn: Callable, jobs: Sequence, workers: int | None = None, desc: str = "", progress: bool = True) -> None:
    """Run ``fn(job)`` for every job (``imap_jobs``), with a progress bar over the jobs."""
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        for _ in imap_jobs(fn, jobs, workers):
            bar.update()


def imap_jobs(fn: Callable, jobs: Sequence, workers: int | None = None) -> Iterator:
    """``fn(job)`` for every job, yielded in job order: in this process with one worker, else in a pool
    of ``workers`` spawned processes (default: all cores), in chunks. ``fn`` must be a module-level
    function.

    Spawned workers start clean (no forked torch / OpenMP state), the same on every platform; they
    import ``fn``'s module (and the parent's ``__main__``, unless it is a package's ``__main__``), so keep
    such modules free of heavy imports (``fsae.refine.crf`` and ``fsae.sweep`` do not import torch).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = min(workers, max(1, len(jobs)))
    if workers == 1:
        for job in jobs:
            yield fn(job)
        return
    chunksize = max(1, min(16, len(jobs) // (4 * workers)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(fn, jobs, chunksize=chunksize)


def exit_with_parent(parent_pid: int, interval: float = 0.2) -> None:
    """Pool-worker initializer: end this process when ``parent_pid`` dies (a SIGKILLed parent runs no
    clean-up, and a worker would otherwise finish its chunk of jobs for nobody).

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``); everywhere a
    daemon thread also checks every ``interval`` seconds whether the parent is gone (re-parented)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    if os.getppid() != parent_pid:  # died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
