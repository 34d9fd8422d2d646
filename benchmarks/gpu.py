"""``make bench-gpu`` / ``python -m benchmarks.gpu``: the training step and CAM inference on a GPU.

Training: ``fsae.train.train_step`` of each paper recipe at its own crop and batch (random weights, random
images), fp32 against bf16 + channels_last, base against +FSAE (its cost against the 2.0x floor of one more
forward + backward). CAM inference: 4 scales + flip, one image at a time against a batch. Every row is
checked against the reference way: fp32 equal, bf16 within ``BF16_TOLERANCE``. ``--tiny`` runs the same
code with small crops, batch 2 and reduced widths on CPU (tests/test_benchmarks.py) and says that no GPU
was measured. Writes ``benchmarks/results_gpu.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import BenchResult, Row, check_equal, machine_info, max_relative_difference, render_section
from fsae.config import load_config
from fsae.infer import multiscale_cam
from fsae.io import write_text
from fsae.methods import build_method
from fsae.train import NonFiniteGuard, build_optimizer, train_step
from fsae.two_view import TwoViewFSAE

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "voc"
RECIPES = {"PPC w/ EPS, ResNet-38": "ppc_eps", "SIPE, ResNet-50": "sipe", "MCTformer, DeiT-S": "mctformer"}
# Reduced sizes of --tiny (CPU): small crops, batch 2, narrow networks.
TINY = {"ppc_eps": ["data.crop_size=32", "model.resnet38.width=0.0625", "model.ppc.view_size=16",
                    "model.ppc.proj_dim=8"],
        "sipe": ["data.crop_size=32", "model.backbone=resnet18", "model.sipe.channels=[8, 16, 16, 32]", "model.sipe.side_channels=[4, 4, 8, 8]"],
        "mctformer": ["data.crop_size=32", "model.mct.img_size=32", "model.mct.embed_dim=32", "model.mct.depth=3",
                      "model.mct.num_heads=2"]}
# bf16 keeps 8 mantissa bits: the first step's loss within 5 % of fp32 (tests/test_precision.py measures 1.4e-3
# on the demo network); the CAM maps within 5 % of their maximum.
BF16_TOLERANCE = 5e-2
NUM_CLASSES = 20
RESULTS = Path(__file__).resolve().parent / "results_gpu.md"


def recipe_config(name: str, fsae: bool, tiny: bool, device: str, precision: str = "fp32",
                  channels_last: bool = False):
    """A paper recipe's +FSAE recipe (configs/voc/<name>_fsae.yaml) with random weights on ``device``; without
    ``fsae`` the same recipe with fsae.enabled=false, so the two steps differ by FSAE alone (a base recipe
    may also drop the weak view's colour jitter, docs/recipes.md)."""
    overrides = ["model.weights=null", f"train.device={device}", f"train.precision={precision}",
                 f"train.channels_last={str(channels_last).lower()}", "fsae.start_epoch=0",
                 f"fsae.enabled={str(fsae).lower()}"]
    if tiny:
        overrides += TINY[name] + ["train.batch_size=2"]
    return load_config(CONFIGS / f"{name}_fsae.yaml", overrides)


def random_batch(cfg, device: str, seed: int = 0) -> dict:
    """Random crops of the recipe's size, one or two present classes per image, saliency for EPS/PPC."""
    gen = torch.Generator().manual_seed(seed)
    b, size = cfg.train.batch_size, cfg.data.crop_size
    labels = torch.zeros(b, NUM_CLASSES)
    labels[torch.arange(b), torch.randint(NUM_CLASSES, (b,), generator=gen)] = 1
    labels[torch.arange(b), torch.randint(NUM_CLASSES, (b,), generator=gen)] = 1
    return {"image": torch.rand(b, 3, size, size, generator=gen).to(device), "label": labels,
            "valid": torch.ones(b, size, size, dtype=torch.bool), "index": torch.arange(b),
            "id": [f"random_{i}" for i in range(b)], "saliency": torch.rand(b, size, size, generator=gen)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(cfg, initial, batch, device: str, steps: int) -> dict:
    """One warm-up step (its losses returned for the check), then ``steps`` timed steps."""
    model = copy.deepcopy(initial).to(device).train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    two_view = TwoViewFSAE(cfg.fsae, model, cfg.train.seed, cfg.data.jitter, cfg.train.precision,
                           cfg.train.channels_last)
    guard = NonFiniteGuard(skip=False, device=device)
    torch.manual_seed(cfg.train.seed)  # the same dropout / drop-path / view draws in every way
    first = {k: v.item() for k, v in train_step(model, optimizer, batch, cfg, two_view, guard, 0, 0, device).items()}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        train_step(model, optimizer, batch, cfg, two_view, guard, 0, step + 1, device)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    guard.check()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"first": first, "seconds": seconds, "peak_gib": peak}


def training_rows(label: str, name: str, tiny: bool, device: str, steps: int) -> tuple[list[Row], dict]:
    """fp32 / bf16 + channels_last, base / +FSAE of one recipe."""
    torch.manual_seed(0)
    base_cfg = recipe_config(name, False, tiny, device)
    initial = build_method(base_cfg.model, NUM_CLASSES)
    batch = random_batch(base_cfg, device)
    runs = {}
    for fsae in (False, True):
        for precision, cl in (("fp32", False), ("bf16", True)):
            cfg = recipe_config(name, fsae, tiny, device, precision, cl)
            runs[(fsae, precision)] = time_steps(cfg, initial, batch, device, steps)
    rows = []
    b, size = base_cfg.train.batch_size, base_cfg.data.crop_size
    show = lambda r: (f"{b / r['seconds']:.1f} img/s" + (f", {r['peak_gib']:.1f} GiB" if r["peak_gib"] else ""))
    for fsae in (False, True):
        ref, mixed = runs[(fsae, "fp32")], runs[(fsae, "bf16")]
        diff = abs(mixed["first"]["loss"] - ref["first"]["loss"]) / max(abs(ref["first"]["loss"]), 1e-12)
        check = check_equal(f"{label} bf16", diff <= BF16_TOLERANCE,
                            f"first-step loss bf16 vs fp32 within {diff:.1e} (tolerance {BF16_TOLERANCE:.0e})")
        rows.append(Row(f"{label} {'+ FSAE' if fsae else 'base'} step, {size}x{size} x {b}: fp32 -> bf16 + "
                        f"channels_last", show(ref), show(mixed), ref["seconds"] / mixed["seconds"], "> 1", check))
    for precision in ("fp32", "bf16"):
        base, with_fsae = runs[(False, precision)], runs[(True, precision)]
        same = base["first"]["cls"] == with_fsae["first"]["cls"] if precision == "fp32" else True
        check = check_equal(f"{label} FSAE", same, "first step from equal weights: base terms equal"
                            if precision == "fp32" else "see the fp32 row")
        ratio = with_fsae["seconds"] / base["seconds"]
        rows.append(Row(f"{label} + FSAE step / base step ({precision})", show(base), show(with_fsae), ratio,
                        f"floor 2.00x (measured {ratio / 2:.2f}x the floor)", check))
    return rows, {f"{'fsae' if k[0] else 'base'}_{k[1]}": v for k, v in runs.items()}


def cam_rows(tiny: bool, device: str, repeats: int) -> tuple[list[Row], dict]:
    """4 scales + flip on VOC-sized images (tiny: 32 x 48), one at a time against one batch (fp32 and bf16)."""
    cfg = recipe_config("ppc_eps", False, tiny, device)
    torch.manual_seed(0)
    model = build_method(cfg.model, NUM_CLASSES).to(device).eval()
    images = torch.rand(2 if tiny else 8, 3, *((32, 48) if tiny else (336, 496)), generator=torch.Generator().manual_seed(1))
    images = images.to(device)
    scales = (0.5, 1.0, 1.5, 2.0)

    def timed(fn):
        fn()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        synchronize(device)
        return (time.perf_counter() - started) / repeats, out

    one, alone = timed(lambda: torch.cat([multiscale_cam(model, images[i:i + 1], scales, True)
                                          for i in range(len(images))]))
    batched, together = timed(lambda: multiscale_cam(model, images, scales, True))
    mixed_s, mixed = timed(lambda: multiscale_cam(model, images, scales, True, precision="bf16"))
    n = len(images)
    diff = max_relative_difference(together, alone)
    bf16_diff = max_relative_difference(mixed, alone)
    rate = lambda s: f"{n / s:.1f} img/s"
    rows = [Row(f"CAM inference (PPC w/ EPS net), {tuple(images.shape[-2:])}, 4 scales + flip: one image at a time "
                f"-> batch of {n}", rate(one), rate(batched), one / batched, "> 1",
                check_equal("CAM batched", diff <= 1e-5, f"max rel. diff {diff:.0e}")),
            Row(f"CAM inference, batch of {n}: fp32 one at a time -> bf16 batched", rate(one), rate(mixed_s),
                one / mixed_s, "> 1", check_equal("CAM bf16", bf16_diff <= BF16_TOLERANCE,
                                                  f"max rel. diff {bf16_diff:.1e} (tolerance {BF16_TOLERANCE:.0e})"))]
    return rows, {"one": one, "batched": batched, "bf16": mixed_s, "diff": diff, "bf16_diff": bf16_diff}


def run(tiny: bool = False, device: str | None = None, steps: int = 5, repeats: int = 3) -> BenchResult:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows, numbers = [], {}
    for label, name in RECIPES.items():
        recipe_rows, numbers[name] = training_rows(label, name, tiny, device, steps)
        rows += recipe_rows
    cam, numbers["cam"] = cam_rows(tiny, device, repeats)
    rows += cam
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    setup = (f"{'GPU ' + gpu if gpu else 'CPU dry run (--tiny): NO GPU WAS MEASURED; the numbers only show the code runs'}"
             f"; random weights, random images; {steps} timed steps after one warm-up; ratio = fp32 time / bf16 time, "
             f"or (FSAE rows) the cost: FSAE step time / base step time.")
    notes = ["Recipe sizes: PPC w/ EPS 448x448 x 8, SIPE 512x512 x 16, MCTformer 224x224 x 64"
             + (" (--tiny: 32x32 x 2, reduced widths, ResNet-18 in place of SIPE's ResNet-50)." if tiny else "."),
             "Peak memory: torch.cuda.max_memory_allocated over the timed steps (GPU only)."]
    return BenchResult("GPU: training step and CAM inference", setup, rows, notes, numbers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small crops, batch 2, reduced widths (CPU dry run)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    started = time.time()
    result = run(tiny=args.tiny, device=args.device, steps=1 if args.tiny else 5, repeats=1 if args.tiny else 3)
    machine = machine_info()
    command = "python -m benchmarks.gpu" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = "\n".join(["# fsae GPU benchmark", "", f"Produced by `{command}` in {time.time() - started:.0f} s on "
                      f"{', '.join(f'{k} {v}' for k, v in machine.items())}.", "", render_section(result), ""])
    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
