"""Benchmark 3: the cost of the FSAE term in a training step (step time of base + FSAE over base).

The step is ``fsae.train``'s, written out here from the same library pieces (``weak_view``,
``normalize``, ``model.losses``, ``strong_view``, ``mask_absent_classes``, ``fsae_loss``,
``build_optimizer``); ``check_against_train`` proves it computes the same losses as the first step of
``fsae.train.train``. Floors: ``teacher="reuse"`` adds one forward + backward (the strong view), so
>= 2.0x; ``"separate"`` adds a no-grad forward on top (a forward is ~1/3 of forward + backward),
so ~2.33x. Anything above the floor is the strong view's augmentation and the pseudo-label masks.
"""

from __future__ import annotations

import copy
import csv
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import BenchResult, Row, check_equal, generated_set, interleaved
from fsae.augment import normalize, strong_view, weak_view
from fsae.data.voc import VOCDataset
from fsae.demo import demo_config
from fsae.fsae import fsae_loss, mask_absent_classes
from fsae.methods import build_method
from fsae.distributed import ResumableSampler
from fsae.train import (TrainViews, build_optimizer, downsample_nearest, image_generators, per_image,
                        seed_everything, train)

MODES = ("base", "reuse", "separate")
FLOORS = {"reuse": 2.0, "separate": 7 / 3}


def train_step(model, optimizer, batch: dict, cfg, generators: list, mode: str) -> dict[str, float]:
    """One step of ``fsae.train.train`` (CPU): ``mode`` is "base" (FSAE off) or the FSAE teacher;
    ``generators``: one colour-augmentation generator per image (``fsae.train.image_generators``)."""
    fs = cfg.fsae
    images, labels = batch["image"], batch["label"]
    x_s = per_image(weak_view, images, generators, jitter=cfg.data.jitter)
    source = normalize(x_s)
    out_s = model(source, labels)
    terms = model.losses({**batch, "label": labels}, out_s)
    if mode != "base":
        x_t = per_image(strong_view, x_s, generators, num_ops=fs.strong_ops, blur_sigma=tuple(fs.blur),
                        blur_prob=fs.blur_prob)
        out_t = model(normalize(x_t), labels)
        if mode == "reuse":
            teacher = out_s.score_map.detach()
        else:
            with torch.no_grad():
                teacher = model(source, labels).score_map
        size = teacher.shape[-2:]
        gt = downsample_nearest(batch["mask"], size) if "mask" in batch else None
        terms["fsae"], _ = fsae_loss(
            mask_absent_classes(teacher, labels), mask_absent_classes(out_t.score_map, labels),
            tau_fae=fs.tau_fae, tau_sae=fs.tau_sae, kernel_size=fs.kernel_size, weight=fs.weight,
            use_sae=fs.use_sae, reduction=fs.reduction, valid=downsample_nearest(batch["valid"], size), gt=gt)
    total = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}


def step_config(data_root: Path, mode: str, batch_size: int):
    """The demo recipe with FSAE from the first step (``mode`` "base" turns FSAE off)."""
    cfg = demo_config("base" if mode == "base" else "fsae", data_root)
    cfg.fsae.start_epoch = 0
    if mode != "base":
        cfg.fsae.teacher = mode
    cfg.train.batch_size = batch_size
    cfg.train.val_every = 0
    return cfg


def check_against_train(data_root: Path, split: str, mode: str, workdir: Path) -> str:
    """Run ``fsae.train.train`` for one step on ``split`` and compare its logged losses with ``train_step``."""
    n = len(VOCDataset(data_root, split, num_classes=4).ids)
    cfg = step_config(data_root, mode, n)
    cfg.data.train_split = split
    cfg.train.epochs, cfg.train.log_every = 1, 1
    train(cfg, workdir / f"train_{mode}", progress=False, resume=False)
    with open(workdir / f"train_{mode}" / "metrics.csv") as f:
        logged = next(csv.DictReader(f))
    # Replay train()'s set-up: seeds, loader, model, optimizer, augmentation generator.
    seed_everything(cfg.train.seed)
    views = TrainViews(VOCDataset(data_root, split, num_classes=4), cfg.data, cfg.train.seed)
    sampler = ResumableSampler(views, n, seed=cfg.train.seed)
    sampler.set_epoch(0)
    model = build_method(cfg.model, cfg.data.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    model.train()
    batch = next(iter(DataLoader(views, batch_size=n, sampler=sampler, drop_last=True)))  # after the model's init
    ours = train_step(model, optimizer, batch, cfg, image_generators(cfg.train.seed, 0, batch["index"]), mode)
    keys = ["loss", "cls"] + ([] if mode == "base" else ["fsae"])
    worst = max(abs(ours[k] - float(logged[k])) / max(abs(float(logged[k])), 1e-8) for k in keys)
    check_equal(f"training step ({mode}) vs fsae.train.train", worst <= 2e-5,
                f"{', '.join(keys)} within {worst:.1e} of train()'s first logged step")
    return f"{mode}: {'/'.join(keys)} = train() step"


def run(batch_size: int = 32, repeats: int = 5, workdir: str | Path | None = None,
        data_root: Path | None = None) -> BenchResult:
    """Time warm steps of each mode round-robin on one fixed batch of the demo's generated set."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        data_root = data_root or generated_set(tmp, num_train=batch_size)
        train_checks = [check_against_train(data_root, "val", mode, tmp) for mode in ("reuse", "separate")]
        cfgs = {mode: step_config(data_root, mode, batch_size) for mode in MODES}
        views = TrainViews(VOCDataset(data_root, "train", num_classes=4), cfgs["base"].data, seed=0)
        batch = next(iter(DataLoader(views, batch_size=batch_size, shuffle=False)))

    torch.manual_seed(0)
    initial = build_method(cfgs["base"].model, 4)
    state = {}
    for mode in MODES:
        model = copy.deepcopy(initial).train()
        state[mode] = (model, build_optimizer(model, cfgs[mode].optim), image_generators(1, 0, batch["index"]))

    def step(mode):
        model, optimizer, gen = state[mode]
        return train_step(model, optimizer, batch, cfgs[mode], gen, mode)

    first = {mode: step(mode) for mode in MODES}  # same weights, same augmentation draws: also the warm-up
    same_cls = first["base"]["cls"] == first["reuse"]["cls"] == first["separate"]["cls"]
    fsae_diff = abs(first["reuse"]["fsae"] - first["separate"]["fsae"]) / max(abs(first["reuse"]["fsae"]), 1e-12)
    check = check_equal("training step", same_cls and fsae_diff <= 1e-6,
                        f"first step from equal weights: cls equal in all modes, fsae term reuse vs separate "
                        f"within {fsae_diff:.0e}; " + "; ".join(train_checks))

    weak = weak_view(batch["image"], torch.Generator().manual_seed(2), jitter=cfgs["reuse"].data.jitter)
    fs = cfgs["reuse"].fsae
    fns = {mode: (lambda mode=mode: step(mode)) for mode in MODES}
    fns["strong_view"] = lambda: per_image(strong_view, weak, state["reuse"][2], num_ops=fs.strong_ops,
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
    setup = (f"Demo recipe (`fsae.demo.demo_config`: tinycnn, output stride 8, constant background, Adam), "
             f"one fixed batch of {batch_size} 128x128 crops from `TrainViews`, CPU, loader excluded; median of "
             f"{repeats} warm steps per mode, modes round-robin. Here the ratio is the cost: fsae step time / "
             f"base step time (base = reference column).")
    notes = [("The timed step is checked against `fsae.train.train`: one real training step per teacher, "
              "whose logged loss, cls and fsae terms the benchmark's step reproduces.")]
    return BenchResult("3. FSAE training overhead", setup, rows, notes,
                       {"seconds": seconds, "batch_size": batch_size,
                        "ratios": {m: seconds[m] / base for m in ("reuse", "separate")}, "first": first})
