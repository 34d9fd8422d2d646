"""Benchmark 6: seeds at data-set scale: bytes per seed file, eval and CRF time per image, projected.

VOC-sized (375 x 500, 20 classes, 1-3 present) and COCO-sized (480 x 640, 80 classes, 2.9 present on
average) generated seeds and images (``bench_crf.make_crf_set``), stored as float16 and as uint8
(``fsae.seeds``). Per image: the file size, the 61-threshold sweep (``evaluate_seeds``) and the dense CRF
(``refine_dir``) with 1 and all-core workers, each timed in a fresh ``benchmarks.timed`` process as the CLI
runs it. Projected to VOC train_aug (10,582 images) and COCO train (82,081): the per-image numbers times the
set size (the pool's start-up once). The CRF masks of 1 and N workers must be identical, and the uint8
sweep must equal the float32 CAMs' (else ``MismatchError``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_crf import THRESHOLD, make_crf_set, read_masks, timed_refine
from benchmarks.bench_seed_sweep import make_seed_set, mean_file_bytes
from benchmarks.common import BenchResult, Row, available_cores, check_equal, time_call, timed_call
from fsae.evaluate import default_thresholds, evaluate_seeds
from fsae.seeds import load_seed

SETS = {  # name: (height, width, classes, mean classes per image or None for 1-3, images in the full set)
    "VOC train_aug": (375, 500, 20, None, 10_582),
    "COCO train": (480, 640, 80, 2.9, 82_081),
}


def measure(root: Path, name: str, num_images: int, workers: int, size_scale: float = 1.0) -> dict:
    """One set's per-image numbers: bytes (float16, uint8), eval s (1 and ``workers``), CRF s (1 and ``workers``);
    ``size_scale`` shrinks the images (tests)."""
    height, width, classes, mean, _ = SETS[name]
    height, width = round(height * size_scale), round(width * size_scale)
    seed_set = {"num_classes": classes, "classes_mean": mean}
    seed_dir, image_dir, ids = make_crf_set(root, num_images, height, width, **seed_set)
    gt_dir = root / "gt"
    u8_dir = make_seed_set(root / "uint8", num_images, height, width, seed_dtype="uint8", **seed_set)[0]
    f32_dir = make_seed_set(root / "float32", num_images, height, width, seed_dtype="float32", **seed_set)[0]
    for folder in (seed_dir, u8_dir, image_dir):  # every way reads from the page cache
        for path in folder.iterdir():
            path.read_bytes()
    thresholds = default_thresholds()
    evals = {}
    for key, folder in (("float16", seed_dir), ("uint8", u8_dir), ("float32", f32_dir)):  # in this process
        seconds, result = time_call(lambda f=folder: evaluate_seeds(f, gt_dir, ids, classes, thresholds, progress=False))
        evals[key] = {"seconds": seconds, "result": result, "startup_s": None}
    evals["float16_workers"] = timed_call("evaluate_seeds", [str(seed_dir), str(gt_dir), ids, classes, thresholds],
                                          {"workers": workers}, root / "eval_workers.json", startup=True)
    crf = {n: timed_refine(seed_dir, image_dir, root / f"crf_{n}", ids, THRESHOLD, n, startup=n > 1)
           for n in (1, workers)}
    masks = [read_masks(root / f"crf_{n}", ids) for n in (1, workers)]
    differ = [i for i in ids if not np.array_equal(masks[0][i], masks[1][i])]
    check_equal(f"{name} dense CRF", not differ, f"{len(differ)} masks differ")
    same_u8 = evals["uint8"]["result"]["miou"] == evals["float32"]["result"]["miou"]
    check_equal(f"{name} uint8 sweep", same_u8, "uint8 mIoU differs from the float32 CAMs'")
    check_equal(f"{name} eval workers", evals["float16_workers"]["result"]["miou"] == evals["float16"]["result"]["miou"],
                "the workers' mIoU differs")

    def per_image(run: dict) -> float:  # the pool's start-up counted once per run, not per image
        return max(run["seconds"] - (run["startup_s"] or 0.0), 0.0) / num_images

    return {
        "bytes": {"float16": mean_file_bytes(seed_dir, ids), "uint8": mean_file_bytes(u8_dir, ids)},
        "eval_s": {"float16": per_image(evals["float16"]), "uint8": per_image(evals["uint8"]),
                   "workers": per_image(evals["float16_workers"])},
        "crf_s": {1: per_image(crf[1]), workers: per_image(crf[workers])},
        "startup_s": {"eval": evals["float16_workers"]["startup_s"], "crf": crf[workers]["startup_s"]},
        "call_s": {"eval": evals["float16_workers"]["seconds"], "crf": crf[workers]["seconds"]},
        "classes": float(np.mean([len(load_seed(seed_dir / f"{i}.npz")[0]) for i in ids])),
        "torch_in_workers": bool(crf[workers]["torch"] or evals["float16_workers"]["workers_torch"]),
    }


LARGE = ", a large share of a normal disk (the 82,081 train2014 images themselves are 13 GB)"


def _gb(v: float) -> str:
    return f"{v / 1e9:.1f} GB"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def run(num_images: int = 24, workers: int | None = None, workdir: str | Path | None = None,
        sets: tuple[str, ...] = tuple(SETS), size_scale: float = 1.0) -> BenchResult:
    """``num_images`` per set; ``size_scale`` < 1 shrinks the images (tests: the rows then are not the sets')."""
    workers = workers or available_cores()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        measured = {name: measure(Path(tmp) / f"set{j}", name, num_images, workers, size_scale)
                    for j, name in enumerate(sets)}
    load_after = os.getloadavg()
    rows = []
    for name, m in measured.items():
        total = SETS[name][4]
        height, width = (round(v * size_scale) for v in SETS[name][:2])
        b, e, c = m["bytes"], m["eval_s"], m["crf_s"]
        rows += [
            Row(f"{name} ({total:,} seeds, {height}x{width}, {m['classes']:.1f} classes/image here): bytes per seed "
                f"file, float16 (reference column) vs uint8", f"{b['float16'] / 1e3:.0f} kB", f"{b['uint8'] / 1e3:.0f} kB",
                b["float16"] / b["uint8"], "", f"full set: {_gb(b['float16'] * total)} vs {_gb(b['uint8'] * total)}"),
            Row(f"{name}: eval (61-threshold sweep) per image, float16 vs uint8, 1 process",
                f"{1e3 * e['float16']:.1f} ms", f"{1e3 * e['uint8']:.1f} ms", e["float16"] / e["uint8"], "",
                f"passed (uint8 mIoU = float32 CAMs'); full set: {_duration(e['float16'] * total)} vs "
                f"{_duration(e['uint8'] * total)}"),
            Row(f"{name}: eval per image, float16, 1 vs {workers} workers", f"{1e3 * e['float16']:.1f} ms",
                f"{1e3 * e['workers']:.1f} ms", e["float16"] / e["workers"], "",
                f"passed (same mIoU); full set: {_duration(e['float16'] * total)} vs "
                f"{_duration(e['workers'] * total + m['startup_s']['eval'])} (the call {m['call_s']['eval']:.2f} s "
                f"with the pool's start-up {m['startup_s']['eval']:.2f} s)"),
            Row(f"{name}: dense CRF per image, 1 vs {workers} workers", f"{c[1]:.3f} s", f"{c[workers]:.3f} s",
                c[1] / c[workers], "", f"passed (identical masks); full set: {_duration(c[1] * total)} vs "
                f"{_duration(c[workers] * total + m['startup_s']['crf'])} (the call {m['call_s']['crf']:.2f} s "
                f"with the pool's start-up {m['startup_s']['crf']:.2f} s)"),
        ]
    coco = measured.get("COCO train")
    notes = [("Per image = (the call's time - the pool's start-up, measured on its own) / images; a full set's time "
              "= per image x set size (+ one start-up). Seeds, images and GT are generated (benchmarks 1 and 4): "
              "smooth blob CAMs, painted photos. Real CAMs have larger exact-zero areas and compress better, so "
              "the disk sizes are an upper estimate; the times scale with pixels and classes."),
             (f"Torch imported in the workers: {'YES' if any(m['torch_in_workers'] for m in measured.values()) else 'no'}."
              f" Load average (1, 5, 15 min) before {' '.join(f'{v:.2f}' for v in load_before)}, after "
              f"{' '.join(f'{v:.2f}' for v in load_after)}; on a shared machine the worker rows are lower bounds.")]
    if coco:
        f16, u8 = (coco["bytes"][k] * SETS["COCO train"][4] for k in ("float16", "uint8"))
        notes.append(f"COCO train as float16 seeds: {_gb(f16)}{LARGE if f16 > 30e9 else ''}; "
                     f"`fsae cam --seed-dtype uint8`: {_gb(u8)}, with the masks of the float32 CAMs at every "
                     f"two-decimal threshold.")
    setup = (f"{num_images} generated images per set; VOC-like 1-3 of 20 classes, COCO-like 1 + Poisson(1.9) of 80 "
             f"(2.9 on average); CRF: PSA parameters, threshold {THRESHOLD}; every timing one run, inputs read once "
             f"before; 1-process evaluations in this process, the worker evaluations and all CRF runs in a fresh "
             f"`benchmarks.timed` process as the CLI runs them.")
    return BenchResult("6. Seeds at data-set scale: VOC train_aug and COCO train, projected", setup, rows, notes,
                       {"measured": measured, "workers": workers, "load_before": load_before,
                        "load_after": load_after})
