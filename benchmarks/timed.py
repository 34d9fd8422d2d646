"""One timed fsae call in a process of its own, started as the ``fsae`` CLI starts.

``python -m benchmarks.timed JOB.json`` prints ``{"seconds", "result", "startup_s", "torch",
"workers_torch"}`` as JSON. This module's own imports are torch-free (the call's module is imported inside
``main``): the spawned pool workers re-import the parent's ``__main__`` (this module), so they start as the
CLI's do (``fsae/__main__.py`` is not re-imported; ``fsae.cli`` does not import torch), and the time is that
of the call alone, after this process's imports.

``JOB.json``: ``{"call": "refine_dir" | "evaluate_seeds", "args": [...], "kwargs": {...}, "startup": bool}``;
``kwargs["workers"]`` the call's processes. ``startup``: also time a pool of that many workers doing
nothing (``fsae.parallel.imap_jobs``, the pool both calls use) and report whether they imported torch.
"""

from __future__ import annotations

import json
import sys
import time

from fsae.parallel import imap_jobs


def torch_loaded(_job=None) -> bool:
    """Pool job: whether torch is imported in this process."""
    return "torch" in sys.modules


def _call(name: str):
    if name == "refine_dir":
        from fsae.refine.crf import refine_dir

        return refine_dir
    if name == "evaluate_seeds":
        from fsae.evaluate import evaluate_seeds

        return evaluate_seeds
    raise ValueError(f"unknown call {name!r}")


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    fn, workers = _call(job["call"]), job["kwargs"].get("workers", 1)
    startup_s, workers_torch = None, []
    if job.get("startup") and workers > 1:
        started = time.perf_counter()
        workers_torch = list(imap_jobs(torch_loaded, [None] * workers, workers))
        startup_s = time.perf_counter() - started
    started = time.perf_counter()
    result = fn(*job["args"], **job["kwargs"], progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "result": result, "startup_s": startup_s, "torch": torch_loaded(),
                      "workers_torch": any(workers_torch)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
