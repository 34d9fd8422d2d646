"""Per-image jobs over a process pool: one progress bar, the same results for any number of workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm


def map_jobs(fn: Callable, jobs: Sequence, workers: int | None = None, desc: str = "", progress: bool = True) -> None:
    """Run ``fn(job)`` for every job: in this process with one worker, else in a pool of ``workers``
    spawned processes (default: all cores), in chunks. ``fn`` must be a module-level function.

    Spawned workers start clean (no forked torch / OpenMP state), the same on every platform; they
    import ``fn``'s module, so keep such modules free of heavy imports (``fsae.refine.crf`` does not import
    torch).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = min(workers, max(1, len(jobs)))
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    if workers == 1:
        for job in jobs:
            fn(job)
            bar.update()
    else:
        chunksize = max(1, min(16, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
            for _ in pool.map(fn, jobs, chunksize=chunksize):
                bar.update()
    bar.close()


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
