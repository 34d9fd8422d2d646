"""One timed ``fsae.refine.crf.refine_dir`` in a process of its own, started as ``fsae crf`` starts.

``python -m benchmarks.crf_timed JOB.json`` prints ``{"seconds", "startup_s", "torch"}`` as JSON. This
module imports neither torch nor ``benchmarks.common``: the spawned pool workers re-import the parent's
``__main__`` (this module), so they start as the CLI's do (whose ``fsae.cli`` does not import torch either),
and the timed call starts after this process's own imports. ``JOB.json``: ``{"seeds", "images", "out",
"ids", "threshold", "workers", "startup"}``; ``startup``: also time a pool of ``workers`` workers doing
nothing (``fsae.parallel.imap_jobs``, the pool ``refine_dir`` uses).
"""

from __future__ import annotations

import json
import sys
import time

from fsae.parallel import imap_jobs
from fsae.refine.crf import refine_dir


def torch_loaded(_job=None) -> bool:
    """Pool job: whether torch is imported in this process."""
    return "torch" in sys.modules


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    startup_s, workers_torch = None, []
    if job["startup"] and job["workers"] > 1:
        started = time.perf_counter()
        workers_torch = list(imap_jobs(torch_loaded, [None] * job["workers"], job["workers"]))
        startup_s = time.perf_counter() - started
    started = time.perf_counter()
    refine_dir(job["seeds"], job["images"], job["out"], job["ids"], job["threshold"], workers=job["workers"],
               progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "startup_s": startup_s,
                      "torch": torch_loaded() or any(workers_torch)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
