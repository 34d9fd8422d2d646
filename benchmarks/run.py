"""``make bench`` / ``python -m benchmarks.run``: every benchmark, then ``benchmarks/results.md``.

Default sizes keep the whole run to a few minutes on a 2-core CPU; ``--full`` uses the issue's sizes
(500 seeds for the sweep, more images for CAM inference). Each benchmark raises ``MismatchError``
(and nothing is written) when the fsae way and the reference way disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import (bench_cam_inference, bench_crf, bench_data_loading, bench_fsae_step, bench_scale,
                        bench_seed_sweep)
from benchmarks.common import machine_info, render_markdown, render_section
from fsae.io import write_text

DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the issue's sizes: 500 seeds, 64 CAM images, 8 for resnet18")
    p.add_argument("--seeds", type=int, help="seed files in the threshold sweep (default 100, --full 500)")
    p.add_argument("--cam-images", type=int, help="tinycnn images for CAM inference (default 32, --full 64)")
    p.add_argument("--timm-images", type=int, help="resnet18 images for CAM inference, 0 = skip (default 4, --full 8)")
    p.add_argument("--crf-images", type=int, help="320x500 images for the dense CRF (default 96)")
    p.add_argument("--scale-images", type=int, default=24,
                   help="generated images per set (VOC-, COCO-sized) for the data-set scale projections (default 24)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = args.seeds or (500 if args.full else 100)
    cam_images = args.cam_images or (64 if args.full else 32)
    crf_images = args.crf_images or 96
    timm_images = args.timm_images if args.timm_images is not None else (8 if args.full else 4)
    started = time.time()
    machine = machine_info()
    results = []

    def report(result):
        results.append(result)
        print(render_section(result) + "\n", flush=True)

    print(f"[1/6] seed threshold sweep, {seeds} seeds", flush=True)
    report(bench_seed_sweep.run(num_images=seeds))
    print(f"[2/6] CAM inference, {cam_images} tinycnn images, {timm_images} resnet18 images", flush=True)
    report(bench_cam_inference.run(num_images=cam_images, timm_images=timm_images))
    print("[3/6] FSAE training overhead", flush=True)
    step = bench_fsae_step.run()
    report(step)
    print(f"[4/6] dense CRF, {crf_images} images, 1 worker vs all cores", flush=True)
    report(bench_crf.run(num_images=crf_images))
    print("[5/6] data loading", flush=True)
    step_rate = step.numbers["batch_size"] / step.numbers["seconds"]["reuse"]
    report(bench_data_loading.run(step_images_per_s=step_rate))
    print(f"[6/6] seeds at data-set scale, {args.scale_images} VOC- and COCO-sized images", flush=True)
    report(bench_scale.run(num_images=args.scale_images))

    seconds = time.time() - started
    command = "python -m benchmarks.run" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    write_text(args.out, render_markdown(results, machine, command, seconds))
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
