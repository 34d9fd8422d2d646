"""Per-image jobs over a process pool: one progress bar, the same results for any number of workers."""

from __future__ import annotations

import multiprocessing
import os
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
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(fn, jobs, chunksize=chunksize):
                bar.update()
    bar.close()
