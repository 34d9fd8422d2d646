"""Benchmark 3: the cost of the FSAE term in a training step (step time of base + FSAE over base).

The timed step is ``fsae.train.train_step`` itself. Floors: ``teacher="reuse"`` adds one forward +
backward (the strong view), so >= 2.0x; ``"separate"`` adds a no-grad forward on top (a forward is
~1/3 of forward + backward), so ~2.33x. Anything above the floor is the strong view's augmentation
and the pseudo-label masks.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import BenchResult, Row, check_equal, generated_set, interleaved
from fsae.augment import image_generators, per_image, strong_view, weak_view
from fsae.config import load_config
from fsae.data.voc import VOCDataset
from fsae.methods import build_method
from fsae.train import NonFiniteGuard, TrainViews, build_optimizer, train_step
from fsae.two_view import TwoViewFSAE

MODES = ("base", "reuse", "separate")
FLOORS = {"reuse": 2.0, "separate": 7 / 3}
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic"


def step_config(data_root: Path, mode: str, batch_size: int):
    """The demo recipe (configs/synthetic/cam*.yaml) with FSAE from the first step (``mode`` "base" turns FSAE off)."""
    cfg = load_config(RECIPE / ("cam.yaml" if mode == "base" else "cam_fsae.yaml"))
    cfg.data.root = str(data_root)
    cfg.fsae.start_epoch = 0
    if mode != "base":
        cfg.fsae.teacher = mode
    cfg.train.batch_size = batch_size
    cfg.train.val_every = 0
    return cfg


def run(batch_size: int = 32, repeats: int = 5, workdir: str | Path | None = None,
        data_root: Path | None = None) -> BenchResult:
    """Time warm steps of each mode round-robin on one fixed batch of the demo's generated set."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        data_root = data_root or generated_set(tmp, num_train=batch_size)
        cfgs = {mode: step_config(data_root, mode, batch_size) for mode in MODES}
        views = TrainViews(VOCDataset(data_root, "train", num_classes=4), cfgs["base"].data, seed=0)
        batch = next(iter(DataLoader(views, batch_size=batch_size, shuffle=False)))

    torch.manual_seed(0)
    initial = build_method(cfgs["base"].model, 4)
    state = {}
    for mode in MODES:
        model = copy.deepcopy(initial).train()
        state[mode] = (model, build_optimizer(model, cfgs[mode].optim), TwoViewFSAE(cfgs[mode].fsae, model, cfgs[mode].train.seed, cfgs[mode].data.jitter))
    guard = NonFiniteGuard(skip=False, device="cpu")

    def step(mode):
        model, optimizer, two_view = state[mode]
        out = train_step(model, optimizer, batch, cfgs[mode], two_view, guard, epoch=0, step=0, device="cpu")
        guard.check()
        return {k: v.item() for k, v in out.items() if k in ("loss", "cls", "fsae")}  # the timed step's result

    first = {mode: step(mode) for mode in MODES}  # same weights, same augmentation draws: also the warm-up
    same_cls = first["base"]["cls"] == first["reuse"]["cls"] == first["separate"]["cls"]
    fsae_diff = abs(first["reuse"]["fsae"] - first["separate"]["fsae"]) / max(abs(first["reuse"]["fsae"]), 1e-12)
    check = check_equal("training step", same_cls and fsae_diff <= 1e-6,
                        f"first step from equal weights: cls equal in all modes, fsae term reuse vs separate "
                        f"within {fsae_diff:.0e}")

    weak = weak_view(batch["image"], torch.Generator().manual_seed(2), jitter=cfgs["reuse"].data.jitter)
    fs = cfgs["reuse"].fsae
    fns = {mode: (lambda mode=mode: step(mode)) for mode in MODES}
    generators = image_generators(cfgs["reuse"].train.seed, 0, batch["index"])
    fns["strong_view"] = lambda: per_image(strong_view, weak, generators, num_ops=fs.strong_ops,
                                           blur_sigma=tuple(fs.blur), blur_prob=fs.blur_prob)
    seconds, _ = interleaved(fns, repeats)
    base = seconds["base"]
    ms = lambda s: f"{1000 * s:.0f} ms ({batch_size / s:.0f} img/s)"
    rows = [Row(f"base step ({batch_size} images)", ms(base), "", None, "", check)]
    for mode in ("reuse", "separate"):
        ratio = seconds[mode] / base
        rows.append(Row(f"base + FSAE, teacher={mode}: step / base step", ms(base), ms(seconds[mode]), ratio,
                        f"floor {FLOORS[mode]:.2f}x (measured {ratio / FLOORS[mode]:.2f}x the floor)",
                        "passed (see base step)"))
    sv = seconds["strong_view"]
    rows.append(Row("of which `strong_view` (blur + 3 colour ops, per image) / base step", "", f"{1000 * sv:.0f} ms",
                    sv / base, "", f"{100 * sv / (seconds['reuse'] - base):.0f} % of reuse's overhead"))
    model = step_config(Path("."), "reuse", batch_size).model
    setup = (f"Demo recipe (`configs/synthetic/cam*.yaml`: tinycnn at depth {model.depth}, output stride "
             f"{model.output_stride}, background logit {model.background_logit}, Adam), "
             f"one fixed batch of {batch_size} 128x128 crops from `TrainViews`, CPU, loader excluded; median of "
             f"{repeats} warm steps per mode, modes round-robin. Here the ratio is the cost: fsae step time / "
             f"base step time (base = reference column).")
    notes = ["The timed step is `fsae.train.train_step`, the step `fsae.train.train` runs."]
    return BenchResult("3. FSAE training overhead", setup, rows, notes,
                       {"seconds": seconds, "batch_size": batch_size,
                        "ratios": {m: seconds[m] / base for m in ("reuse", "separate")}, "first": first})
