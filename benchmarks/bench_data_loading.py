"""Benchmark 5: does the training loader keep up with the training step?

The loader is ``fsae.train``'s: ``TrainViews`` (JPEG + PNG read, ``random_geometry``: resize, flip,
crop) over the generated VOC-layout set, in a ``DataLoader`` of the demo's batch size. Its images/s
is compared with the images/s of the base + FSAE (reuse) training step from benchmark 3. With
``num_workers=0`` the loader runs in the training process, so its time adds to every step; with
workers it overlaps, and keeps up when its rate is above the step's. The worker loader must give the
same batches as the in-process one (crops are seeded by seed, epoch and index, not by the process).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import BenchResult, Row, check_equal, generated_set, interleaved
from fsae.data.voc import VOCDataset
from fsae.demo import demo_config
from fsae.train import TrainViews


def epoch_batches(views: TrainViews, batch_size: int, workers: int, seed: int = 0) -> list[dict]:
    """One epoch of the training loader (as ``fsae.train.train`` builds it), batches kept."""
    loader = DataLoader(views, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["id"] == y["id"] and all(torch.equal(x[k], y[k]) for k in ("image", "valid", "label", "mask"))
        for x, y in zip(a, b))


def run(num_images: int = 256, batch_size: int = 32, workers: int = 2, repeats: int = 3,
        step_images_per_s: float | None = None, workdir: str | Path | None = None) -> BenchResult:
    """Loader images/s with 0 and ``workers`` processes; compared with ``step_images_per_s`` when given."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = generated_set(tmp, num_train=num_images)
        cfg = demo_config("fsae", root)
        views = TrainViews(VOCDataset(root, "train", num_classes=cfg.data.num_classes), cfg.data, cfg.train.seed)
        epoch_batches(views, batch_size, 0)  # warm the page cache
        ways = {0: lambda: epoch_batches(views, batch_size, 0)}
        if workers:
            ways[workers] = lambda: epoch_batches(views, batch_size, workers)
        seconds, out = interleaved(ways, repeats)
    n = (num_images // batch_size) * batch_size
    detail = f"same batches (ids, crops, masks) with 0 and {workers} workers" if workers else "one way only"
    check = check_equal("training loader", not workers or _same_batches(out[0], out[workers]), detail)
    rate = {w: n / s for w, s in seconds.items()}
    rows = []
    for w, r in rate.items():
        if step_images_per_s:
            ratio = r / step_images_per_s
            share = (1 / r) / (1 / r + 1 / step_images_per_s)
            goal = ">= 1x: keeps up" + (f" (in-process: {100 * share:.0f} % of step+load time)" if w == 0 else
                                        " (overlapped)")
            rows.append(Row(f"loader, num_workers={w} / training step (reuse)", f"{step_images_per_s:.0f} img/s",
                            f"{r:.0f} img/s", ratio, goal,
                            check + ("; keeps up" if ratio >= 1 else "; does NOT keep up")))
        else:
            rows.append(Row(f"loader, num_workers={w}", "", f"{r:.0f} img/s", None, "", check))
    setup = (f"{num_images} generated 128x128 images (JPEG + palette PNG), demo recipe geometry "
             f"(long side 112-144, crop 128, flip), batch {batch_size}, one epoch per timing (worker start-up "
             f"included), median of {repeats} round-robin repeats. Reference column: images/s of the base + "
             f"FSAE (teacher=reuse) step of benchmark 3; ratio = loader rate / step rate.")
    return BenchResult("5. Data loading vs the training step", setup, rows, [],
                       {"seconds": seconds, "images_per_s": rate, "images": n})
