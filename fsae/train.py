"""The training loop: base method losses + (when ``fsae.enabled``) the FSAE loss on weak/strong views.

In torchvision's references/segmentation shape: ``train`` sets up (data, model, optimizer, FSAE
protocol, resume, logs) and runs ``train_one_epoch`` + ``evaluate`` + a checkpoint per epoch;
``train_one_epoch`` sets the learning rate and calls ``train_step`` per batch (also timed by
benchmarks/bench_fsae_step.py). One step, top to bottom:
1. the loader gives crops (random long-side resize, flip, crop with padding marked invalid);
2. x_s = A_w(x): colour jitter (the weak view); S_s = model(x_s) gives the base losses;
3. ``fsae.two_view.TwoViewFSAE``: x_t = A_s(x_s), S_t = model(x_t), the teacher's S_s, eq. 5-9;
4. backward, optimizer step, EMA update. The step's losses and statistics stay tensors: they become
   numbers only at log steps (the one host sync, see ``log_step``); ``NonFiniteGuard`` finds a NaN
   without a sync per step (docs/decisions.md).

Run directory: ``config.yaml``, ``checkpoints/last.pt`` (atomic; training resumes from it),
``metrics.csv`` (per logged step), ``epochs.csv`` (per epoch, with held-out seed mIoU when
``train.val_every`` > 0).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fsae import distributed
from fsae.augment import (apply_geometry, image_generators, normalize, per_image, random_geometry,  # noqa: F401
                          timm_train_transform, timm_train_view, weak_view)
from fsae.config import Config, config_from_dict, save_config
from fsae.data import build_dataset
from fsae.data.check import check_training_data, format_problems
from fsae.errors import CheckpointError, ConfigError, DataError, FsaeError
from fsae.evaluate import SeedEvaluator, default_thresholds
from fsae.fsae import STATISTICS
from fsae.infer import batches_by_size, multiscale_cam, normalise_seed, resolve_batch_size, to_tensor_image
from fsae.io import atomic_write, ensure_output_dir
from fsae.lock import output_lock
from fsae.methods import build_method
from fsae.models.batchnorm import sync_batch_norm
from fsae.weights import read_weight_file
from fsae.settings import describe_changes
from fsae.speed import grad_scaler as speed_grad_scaler, loader_options
from fsae.tblog import close_writer, log_scalars, open_writer
from fsae.two_view import TwoViewFSAE, model_forward

# The held-out monitor's threshold sweep (fsae's own per-epoch check, not a base repo's protocol) unless the
# recipe sets eval.sweep: the 0.00-0.60 range the demo's per-epoch columns report.
MONITOR_SWEEP = (0.0, 0.60, 0.01)

METRIC_FIELDS = ["step", "epoch", "lr", "loss", "cls", "fsae", "mask_ratio", "confident_ratio",
                 "boundary_ratio", "sae_added_ratio", "pl_accuracy", "skipped",
                 "sal", "er", "ecr", "contrast",  # EPS / PPC terms (fsae/methods/eps.py, ppc.py)
                 "gsc", "patch"]  # SIPE's GSC term, MCTformer's patch-token term (sipe.py, mctformer.py)
EPOCH_FIELDS = ["epoch", "step", "seconds", "val_miou", "val_fpr", "val_fnr", "val_threshold"]


class TrainViews(Dataset):
    """Wraps a data set: per-image geometry (seeded by seed, epoch and index) -> fixed-size crops."""

    def __init__(self, dataset, data_cfg, seed: int):
        self.dataset = dataset
        self.cfg = data_cfg
        self.seed = seed
        # In shared memory: persistent loader workers (fsae.speed.loader_options) read the epoch set here.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.timm_transform = timm_train_transform(data_cfg) if data_cfg.transform == "timm" else None

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if self.timm_transform is not None:  # data.transform "timm" (MCTformer's recipe): no mask, no padding
            image = timm_train_view(sample["image"], self.timm_transform, hash((self.seed, self.epoch, index)))
            return {"id": sample["id"], "index": index, "image": image, "label": torch.as_tensor(sample["label"]),
                    "valid": torch.ones(image.shape[-2:], dtype=torch.bool)}
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        geo = random_geometry(sample["image"], sample.get("mask"), long_side=self.cfg.long_side,
                              crop_size=self.cfg.crop_size, hflip=self.cfg.hflip, generator=gen)
        out = {"id": sample["id"], "index": index, "image": geo["image"], "valid": geo["valid"],
               "label": torch.as_tensor(sample["label"])}
        if "mask" in geo:
            out["mask"] = geo["mask"]
        if "saliency" in sample:  # saliency-guided methods (EPS, PPC): the same geometry, float [0, 1]
            out["saliency"] = apply_geometry(sample["saliency"], geo["params"], tuple(geo["image"].shape[-2:]))
        return out


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    return base_lr * (1 - step / max(total, 1)) ** power


def learning_rate(optim_cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of 0-based ``step`` of ``total_steps`` (set before every step).

    Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_epochs * steps_per_epoch`` steps, then
    ``schedule``: "poly", ``lr (1 - step / total) ** poly_power``; "cosine", ``min_lr + (lr - min_lr)
    (1 + cos(pi step / total)) / 2``, timm's ``CosineLRScheduler`` (warmup_prefix=False) stepped per update.
    ``lr_step = "epoch"``: the value at the first step of epoch ``max(e - 1, 0)`` for every step of epoch ``e``
    (timm's ``scheduler.step(epoch)`` after each epoch, MCTformer main.py:297).
    """
    if getattr(optim_cfg, "lr_step", "update") == "epoch":
        step = max(step // max(steps_per_epoch, 1) - 1, 0) * steps_per_epoch
    warmup = optim_cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return optim_cfg.warmup_lr + (optim_cfg.lr - optim_cfg.warmup_lr) * step / warmup
    if optim_cfg.schedule == "poly":
        return poly_lr(optim_cfg.lr, step, total_steps, optim_cfg.poly_power)
    if optim_cfg.schedule == "cosine":
        progress = step / max(total_steps, 1)
        return optim_cfg.min_lr + 0.5 * (optim_cfg.lr - optim_cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise FsaeError(f"unknown optim.schedule {optim_cfg.schedule!r}; expected poly or cosine")


def build_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
    groups = []
    for group in model.param_groups():
        mult = optim_cfg.new_layer_lr_mult if group.get("new") else 1.0
        mult *= group.get("lr_mult", 1.0)  # a group's own factor on top (EPS/PPC: x2 on biases)
        groups.append({"params": group["params"], "lr": optim_cfg.lr * mult, "lr_mult": mult,
                       **({"weight_decay": group["weight_decay"]} if "weight_decay" in group else {})})
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    raise FsaeError(f"unknown optimizer {optim_cfg.name!r}; expected sgd, adam or adamw")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, device, scales=None) -> dict:
    """Seed mIoU (best over the threshold sweep) on ``dataset`` without writing seed files.

    Under torchrun every process scores its share of the images and the evaluator sums the shares."""
    model.eval()
    evaluator = SeedEvaluator(cfg.data.num_classes, default_thresholds(*(cfg.eval.sweep or MONITOR_SWEEP)))
    share = distributed.shard_indices(range(len(dataset)), (distributed.rank(), distributed.world_size()))
    scales = scales or cfg.train.val_scales
    batch_size = resolve_batch_size(cfg.infer.batch_size, lambda x, _: multiscale_cam(model, x, scales,
                                                                                      cfg.infer.flip),
                                    dataset, share, "bilinear", device)
    for group in batches_by_size(dataset, share, batch_size):
        images = torch.stack([to_tensor_image(s["image"]) for s in group]).to(device)
        cams = multiscale_cam(model, normalize(images), scales, cfg.infer.flip)
        for sample, cam in zip(group, cams):
            evaluator.update(*normalise_seed(cam, torch.as_tensor(sample["label"])), sample["mask"])
    model.train()
    return evaluator.reduce_from_all_processes().result()["best"]


def save_checkpoint(path: Path, state: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: the archive's folder is "archive", not the random temp
            torch.save(state, f)  # name, so equal states give equal bytes (the checkpoint digest of the stamps)

    atomic_write(path, write)


def training_state(model, optimizer, ema, cfg: Config, step: int, epoch: int, skipped: int,
                   best: dict | None = None, scaler=None) -> dict:
    """What a resumed run needs to continue exactly: weights, optimizer, EMA, step, completed epochs,
    skipped-step count, the best held-out epoch so far, config (+ hash) and the global torch RNG. The data
    order and the augmentations are functions of (seed, epoch, index), so the step alone says where the
    data stream resumes."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
             "skipped": skipped, "best": best, "config": cfg.to_dict(), "config_hash": cfg.hash(),
             "torch_rng": torch.get_rng_state()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if scaler is not None:  # train.precision fp16: the GradScaler's scale and growth tracker
        state["scaler"] = scaler.state_dict()
    return state


def config_changes(saved: dict, cfg: Config, limit: int = 8) -> str:
    """The deciding fields where a checkpoint's config and ``cfg`` differ: ``"train.epochs 3 -> 4, ..."``."""
    return describe_changes(config_from_dict(saved), cfg, limit)


def _trim_csv(path: Path, column: str, last: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint (``column`` > ``last``), atomically."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    index = rows[0].index(column)
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[index]) <= last]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    atomic_write(path, write)


def read_checkpoint_file(path: Path, hint: str) -> dict:
    """``read_weight_file`` of a checkpoint; one that exists but does not read (truncated by a full disk or a
    copy cut short) names what to do instead: ``hint``."""
    try:
        return read_weight_file(path, "checkpoint", unwrap=False)
    except CheckpointError as exc:
        if not path.is_file():
            raise
        raise CheckpointError(f"{exc}; the file is truncated or corrupt: {hint}") from exc


def cam_checkpoint_hint(path: Path) -> str:
    """What to do with an unreadable CAM checkpoint ``path``: the run's other checkpoint, or a fresh start."""
    other = path.parent / ("last.pt" if path.name == "best.pt" else "best.pt")
    use = f"use {other} (--checkpoint {other.stem}), " if other.is_file() else f"(no {other.name} beside it) "
    return f"{use}or train again from scratch with --no-resume"


def checkpoint_kind(state: dict) -> str | None:
    """Which command wrote a checkpoint dict: ``"segmentation"`` (``fsae seg train``), ``"cam"`` (``fsae
    train``), None when neither."""
    if not isinstance(state, dict):
        return None
    if state.get("kind") == "segmentation":
        return "segmentation"
    if "model" in state and "config" in state and "step" in state:
        return "cam"
    return None


def load_checkpoint(path: str | os.PathLike, cfg: Config | None = None) -> dict:
    """Load a checkpoint (weights only); refuse one whose class count or config differs from ``cfg``, one of
    another kind (a DeepLab checkpoint: which command takes it) or one that does not read (what to do)."""
    path = Path(path)
    state = read_checkpoint_file(path, cam_checkpoint_hint(path))
    if checkpoint_kind(state) == "segmentation":
        raise CheckpointError(f"{path}: a DeepLab checkpoint (from `fsae seg train`): `fsae seg infer` takes it; "
                              f"`fsae cam` needs a CAM checkpoint of `fsae train` (RUN/checkpoints/last.pt)")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an fsae checkpoint (no 'model'/'config' entries)")
    if cfg is not None:
        saved = config_from_dict(state["config"], str(path))
        if saved.data.num_classes != cfg.data.num_classes:
            raise CheckpointError(f"{path}: checkpoint has {saved.data.num_classes} classes, the config "
                                  f"{cfg.data.num_classes}")
        if saved.model != cfg.model:
            raise CheckpointError(f"{path}: the checkpoint's model differs from the config's "
                                  f"({describe_changes(saved, cfg, hashed_only=False, within='model')})")
    return state


CHECKPOINTS = ("last", "best")


def run_checkpoint(run_dir: str | os.PathLike, which: str = "last") -> Path:
    """``RUN_DIR/checkpoints/<which>.pt``: ``last`` (end of training, or where it stopped) or ``best`` (the
    epoch with the highest held-out seed mIoU, ``epochs.csv`` val_miou; ties keep the earlier epoch)."""
    if which not in CHECKPOINTS:
        raise CheckpointError(f"checkpoint {which!r}: expected one of {', '.join(CHECKPOINTS)}")
    path = Path(run_dir) / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        why = (" (best.pt needs a held-out evaluation: train.val_every > 0 and data.val_split)"
               if which == "best" else "")
        raise CheckpointError(f"{path}: no such checkpoint{why}")
    return path


def model_from_checkpoint(path: str | os.PathLike, cfg: Config | None = None, device="cpu"):
    """Rebuild the method from a checkpoint's own config and load its weights; returns (model, cfg)."""
    state = load_checkpoint(path, cfg)
    saved = config_from_dict(state["config"], str(path))
    model = build_method(saved.model, saved.data.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), saved


class NonFiniteGuard:
    """Stops the run on a NaN/Inf loss, naming the step, the loss terms and the batch ids.

    Default: no host sync per step. ``admit`` keeps each step's [total, terms] on the device with its
    ids; ``check`` (at log steps, before checkpoints and at epoch ends, on every process) reads them
    in one sync and raises for the first non-finite step, so no checkpoint ever holds its weights.
    With ``train.skip_nonfinite`` the decision to skip an update is needed before the update, so
    ``admit`` syncs every step (as torch.amp's GradScaler does) and counts the skipped steps.
    """

    def __init__(self, skip: bool, device, skipped: int = 0):
        self.skip = skip
        self.device = device
        self.skipped = skipped
        self.pending: list[tuple[int, list, list[str], torch.Tensor]] = []

    def admit(self, total: torch.Tensor, terms: dict, step: int, ids) -> bool:
        """Whether the step's update is applied."""
        if self.skip:
            finite = distributed.all_true(bool(torch.isfinite(total)), self.device)  # sync: skip mode only
            self.skipped += not finite
            return finite
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())])
        self.pending.append((step, list(ids), list(terms), values))
        return True

    def check(self) -> None:
        """Raise ``FsaeError`` if a step since the last check had a non-finite loss on any process."""
        if self.skip:
            return
        finite = torch.stack([torch.isfinite(v).all() for *_, v in self.pending]).tolist() if self.pending else []
        bad = next((entry for entry, ok in zip(self.pending, finite) if not ok), None)  # the sync point
        self.pending.clear()
        if not distributed.all_true(bad is None, self.device):
            if bad is None:
                raise FsaeError("non-finite loss in another process (its error names the step, terms and ids)")
            step, ids, names, values = bad
            terms = dict(zip(names, values[1:].tolist()))
            raise FsaeError(f"non-finite loss at step {step}: terms {terms}; batch ids {ids}")


def train_step(model, optimizer, batch: dict, cfg: Config, two_view: TwoViewFSAE, guard: NonFiniteGuard,
               epoch: int, step: int, device, forward_model=None, scaler=None) -> dict[str, torch.Tensor]:
    """One optimisation step: weak view, base terms, FSAE term, backward, optimizer step, EMA.

    ``model`` is the unwrapped method (its ``losses``, the teacher pass); ``forward_model`` the DDP
    wrapper (or the compiled model) when there is one; ``scaler`` the GradScaler of fp16. The forward
    passes run under ``train.precision`` (``model_forward``), the losses in fp32. Returns ``{"loss", <terms>,
    <FSAE statistics>}`` as 0-dim tensors and makes no host sync (except under ``train.skip_nonfinite``, see
    ``NonFiniteGuard``; fp16's GradScaler syncs once per step in ``scaler.step``).
    """
    forward_model = model if forward_model is None else forward_model  # a compiled module has no truth value
    images = batch["image"].to(device)
    labels = batch["label"].to(device)
    generators = image_generators(cfg.train.seed, epoch, batch["index"])
    x_s = per_image(weak_view, images, generators, jitter=cfg.data.jitter)
    source = normalize(x_s)
    out_s = model_forward(forward_model, source, labels, cfg.train.precision, cfg.train.channels_last)
    terms = model.losses({**batch, "label": labels}, out_s)
    stats: dict[str, torch.Tensor] = {}
    if cfg.fsae.enabled:
        terms["fsae"], stats = two_view.loss(model, forward_model, x_s, source, labels, out_s, batch, generators,
                                             epoch, device, images)
    total = sum(terms.values())
    apply = guard.admit(total, terms, step, batch["id"])
    optimizer.zero_grad(set_to_none=True)
    if apply and scaler is not None:  # fp16: scaled loss; the scaler skips a step with inf/NaN gradients
        scaler.scale(total).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        two_view.after_update(model)
    elif apply:
        total.backward()  # DDP: gradients averaged over the processes here
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        two_view.after_update(model)
    return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}, **stats}


@dataclass
class TrainingRun:
    """What ``train`` sets up and ``train_one_epoch`` / ``end_epoch`` use."""

    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    forward_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    two_view: TwoViewFSAE
    guard: NonFiniteGuard
    views: TrainViews
    sampler: distributed.ResumableSampler
    loader: DataLoader
    val_set: Dataset | None
    device: torch.device
    step: int
    steps_per_epoch: int
    main: bool
    progress: bool
    tb: object = None
    started: float = 0.0
    best: dict | None = None  # {"epoch", "val_miou"} of best.pt
    scaler: object = None  # torch.amp.GradScaler under train.precision fp16

    def say(self, line: str) -> None:
        """A console line, also appended to ``RUN_DIR/log.txt`` (rank 0)."""
        if self.main:
            print(line, flush=True)
            with open(self.run_dir / "log.txt", "a", buffering=1) as f:
                f.write(line + "\n")

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.steps_per_epoch  # the same for any process count: global batches

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def save(self, epoch: int, name: str = "last") -> None:
        """Check the finiteness of the steps so far, then (rank 0) write ``<name>.pt`` atomically."""
        self.guard.check()
        if self.main:
            save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt",
                            training_state(self.model, self.optimizer, self.two_view.ema, self.cfg, self.step,
                                           epoch, self.guard.skipped, self.best, self.scaler))


def train_one_epoch(run: TrainingRun, epoch: int) -> dict[str, float]:
    """One epoch (or its rest, when resuming mid-epoch): learning rate, ``train_step``, logs, checkpoints.

    Returns the epoch's mean loss terms (summed on the device, one sync at the end)."""
    cfg = run.cfg
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    run.views.epoch = epoch
    run.sampler.set_epoch(epoch, skip_batches=run.step - epoch * run.steps_per_epoch)  # > 0: resumed mid-epoch
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not run.progress, leave=False)
    for batch in bar:
        lr = learning_rate(cfg.optim, run.step, run.total_steps, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        out = train_step(run.model, run.optimizer, batch, cfg, run.two_view, run.guard, epoch, run.step,
                         run.device, run.forward_model, run.scaler)
        run.step += 1
        for key, value in out.items():
            if key not in STATISTICS:
                sums[key] = sums.get(key, 0) + value.double()
                counts[key] = counts.get(key, 0) + 1
        if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
            run.guard.check()
            row = log_step(run, epoch, lr, out)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0 \
                and run.step % run.steps_per_epoch:  # mid-epoch; the epoch's end saves in end_epoch
            run.save(epoch)
    bar.close()
    means = torch.stack(list(sums.values())).tolist() if sums else []  # a sync point, once per epoch
    return distributed.mean_over_ranks({key: total / counts[key] for key, total in zip(sums, means)}, run.device)


def log_step(run: TrainingRun, epoch: int, lr: float, out: dict[str, torch.Tensor]) -> dict:
    """One ``metrics.csv`` / TensorBoard row of the step's losses and statistics (mean over processes)."""
    # The sync point: the step's tensors become numbers here, at log steps only (nanoGPT's log_interval).
    numbers = torch.stack([v.double() for v in out.values()]).tolist()
    values = {"lr": lr, **dict(zip(out, numbers))}
    row = {"step": run.step, "epoch": epoch, **distributed.mean_over_ranks(values, run.device),
           "skipped": run.guard.skipped}
    if run.main:
        with open(run.run_dir / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k)) for k in METRIC_FIELDS])
    log_scalars(run.tb, "train", row, run.step)
    return row


def end_epoch(run: TrainingRun, epoch: int, losses: dict[str, float], epoch_started: float) -> dict:
    """Held-out seed mIoU (every ``train.val_every`` epochs and after the last), ``epochs.csv``, ``best.pt``
    (the highest held-out seed mIoU so far; a tie keeps the earlier epoch), ``last.pt``, the epoch's line."""
    cfg = run.cfg
    run.guard.check()
    val = {}
    if run.val_set is not None and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
        val = evaluate(run.model, run.val_set, cfg, run.device)  # every process scores 1/N
    miou = val.get("miou", math.nan)
    if math.isfinite(miou) and (run.best is None or miou > run.best["val_miou"]):
        run.best = {"epoch": epoch + 1, "val_miou": miou}
        run.save(epoch + 1, "best")  # before last.pt: a resumed run never points at a best.pt not written
    if run.main:
        with open(run.run_dir / "epochs.csv", "a", newline="") as f:
            csv.writer(f).writerow([epoch + 1, run.step, _fmt(time.time() - run.started), _fmt(val.get("miou")),
                                    _fmt(val.get("fpr")), _fmt(val.get("fnr")), _fmt(val.get("threshold"))])
        log_scalars(run.tb, "val", val, run.step, flush=True)
    run.save(epoch + 1)
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    held_out = "" if not val else (f" | val mIoU {100 * miou:.2f} (best {100 * run.best['val_miou']:.2f}, "
                                   f"epoch {run.best['epoch']})" if run.best else f" | val mIoU {100 * miou:.2f}")
    run.say(f"epoch {epoch + 1}/{cfg.train.epochs} step {run.step}: {terms}{held_out} | "
            f"{time.time() - epoch_started:.1f} s")
    distributed.barrier()  # the other processes wait for rank 0's checkpoint
    return val


def training_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # under torchrun: this process's own GPU
    return device


def build_loader(cfg: Config, rank: int, world: int):
    """Refuse a data set that fails the fast check; -> (TrainViews, ResumableSampler, DataLoader)."""
    problems = check_training_data(cfg)  # every split the run reads: train, and val when evaluated
    if problems:
        raise DataError(f"the training data fails `fsae data check --fast`:\n{format_problems(problems, limit=20)}")
    dataset = build_dataset(cfg.data, cfg.data.train_split, with_saliency=bool(cfg.data.saliency_dir))
    views = TrainViews(dataset, cfg.data, cfg.train.seed)
    sampler = distributed.ResumableSampler(views, distributed.per_rank_batch(cfg.train.batch_size, world),
                                           num_replicas=world, rank=rank, seed=cfg.train.seed)
    # Its own generator: the loader draws a worker seed when an epoch starts (with persistent workers only the
    # first time); from the global RNG, which a checkpoint saves and a resume restores, that would shift the
    # stream of dropout / drop-path after a resume.
    loader = DataLoader(views, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        **loader_options(cfg.data.workers, cfg.train.device, cfg.data.prefetch))
    if sampler.batches_per_epoch == 0:
        raise FsaeError(f"{cfg.data.root}: {len(dataset)} images is fewer than one batch of {cfg.train.batch_size}")
    return views, sampler, loader


def build_model(cfg: Config, device: torch.device, world: int):
    """The configured method on ``device`` (SyncBatchNorm under torchrun with ``train.sync_bn``)."""
    model = build_method(cfg.model, cfg.data.num_classes).to(device)
    if model.needs_saliency and not cfg.data.saliency_dir:
        raise ConfigError(f"method {cfg.model.method!r} needs saliency maps: set data.saliency_dir "
                          f"(e.g. {cfg.data.root}/saliency for the generated set, SALImages for VOC)")
    if cfg.train.sync_bn and world > 1:
        if device.type != "cuda":
            raise FsaeError("train.sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); set "
                            "train.sync_bn=false for CPU processes")
        model = sync_batch_norm(model)  # BN statistics over the global batch; frozen BN stays frozen
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def grad_scaler(cfg: Config, device: torch.device):
    """The GradScaler of ``train.precision`` fp16 (None otherwise); ConfigError where fp16 cannot run."""
    return speed_grad_scaler(cfg.train.precision, device)


def resume_from(path: Path, cfg: Config, model, optimizer, two_view: TwoViewFSAE,
                scaler=None) -> tuple[int, int, dict | None]:
    """Load ``last.pt`` into the model, optimizer, EMA, GradScaler and torch RNG; -> (step, skipped steps,
    best epoch)."""
    state = load_checkpoint(path, cfg)
    # The saved config, read by today's rules (Config.removed_keys), decides; not the hash stored with it.
    if config_from_dict(state["config"], str(path)).hash() != cfg.hash():
        raise CheckpointError(f"{path}: written by another config ({config_changes(state['config'], cfg)}); "
                              f"use a new run directory, or --no-resume to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if two_view.ema is not None:
        two_view.ema.load_state_dict(state["ema"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state.get("skipped", 0), state.get("best")


def open_logs(run_dir: Path, step: int, start_epoch: int) -> None:
    """New ``metrics.csv`` / ``epochs.csv`` headers, or (resuming) drop rows logged after ``last.pt``."""
    if step == 0:
        for path, header in ((run_dir / "metrics.csv", METRIC_FIELDS), (run_dir / "epochs.csv", EPOCH_FIELDS)):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(header)
    else:
        _trim_csv(run_dir / "metrics.csv", "step", step)
        _trim_csv(run_dir / "epochs.csv", "epoch", start_epoch)


def with_absolute_data_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``data.root``, ``data.saliency_dir`` and ``data.label_file`` absolute, so the
    run directory's config.yaml works from any directory (``fsae cam RUN``)."""
    from fsae.data.voc import saliency_folder

    cfg = copy.deepcopy(cfg)
    if cfg.data.saliency_dir:  # a relative one lies below data.root (fsae.data.voc.saliency_folder)
        cfg.data.saliency_dir = str(saliency_folder(cfg.data.root, cfg.data.saliency_dir))
    for name in ("root", "saliency_dir", "label_file"):
        if getattr(cfg.data, name):
            setattr(cfg.data, name, os.path.abspath(getattr(cfg.data, name)))
    return cfg


def start_run(cfg: Config, run_dir: Path, progress: bool, resume: bool) -> TrainingRun:
    """Everything before the first step: checks, data, model, optimizer, FSAE, resume; then (only once all
    of it succeeded) ``config.yaml``, the CSV headers and TensorBoard."""
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    device = training_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    views, sampler, loader = build_loader(cfg, rank, world)
    val_set = build_dataset(cfg.data, cfg.data.val_split) if cfg.train.val_every and cfg.data.val_split else None
    model = build_model(cfg, device, world)
    optimizer = build_optimizer(model, cfg.optim)  # the method's own param_groups, on the unwrapped module
    two_view = TwoViewFSAE(cfg.fsae, model, cfg.train.seed, cfg.data.jitter, cfg.train.precision,
                           cfg.train.channels_last)
    scaler = grad_scaler(cfg, device)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    step, skipped, best = 0, 0, None
    if resume and ckpt_path.exists():
        step, skipped, best = resume_from(ckpt_path, cfg, model, optimizer, two_view, scaler)
    start_epoch = step // sampler.batches_per_epoch  # a mid-epoch checkpoint resumes mid-epoch
    # One process with the global batch, or DDP: gradients are averaged over the processes in backward.
    forward_model = model
    if world > 1:
        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:  # the forward passes only; losses(), the teacher and the checkpoints use ``model``
        forward_model = torch.compile(forward_model)
    if main:
        save_config(cfg, run_dir / "config.yaml")
        open_logs(run_dir, step, start_epoch)
    run = TrainingRun(cfg, run_dir, model, forward_model, optimizer, two_view,
                      NonFiniteGuard(cfg.train.skip_nonfinite, device, skipped), views, sampler, loader, val_set,
                      device, step, sampler.batches_per_epoch, main, progress and main,
                      # TensorBoard (train.tensorboard): the rows of metrics.csv / epochs.csv, in RUN_DIR/tb/.
                      tb=open_writer(run_dir / "tb", cfg.train.tensorboard, purge_step=step if step else None),
                      started=time.time(), best=best, scaler=scaler)
    if step:
        run.say(f"resuming from step {step} (epoch {start_epoch + 1}) of {ckpt_path}")
    return run


def train(cfg: Config, run_dir: str | os.PathLike, progress: bool = True, resume: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir``; resume from ``checkpoints/last.pt`` when present.

    A start that fails (bad data, a refused resume, ...) leaves ``config.yaml`` as it was and removes a
    run directory it created. Under torchrun (``fsae.distributed.process_group`` entered by the caller)
    every process trains on ``train.batch_size / world size`` images of each global batch with
    DistributedDataParallel; rank 0 logs, evaluates and writes checkpoints. The result equals one process
    with the global batch (same images per step, same per-image augmentations, averaged gradients) up to
    float rounding, and exactly only with ``train.sync_bn`` (GPU) or a BatchNorm-free backbone: plain
    BatchNorm normalises each process's share of the batch on its own. A second process training into
    ``run_dir`` meanwhile is refused at once (``fsae.lock.FolderLockedError``: the folder and this one's pid).
    """
    cfg = with_absolute_data_paths(cfg)
    # one writer of the run directory (fsae.lock): rank 0 holds it for all the processes of a torchrun
    with output_lock(run_dir) if distributed.rank() == 0 else contextlib.nullcontext():
        created = not Path(run_dir).exists()
        run_dir = ensure_output_dir(run_dir)
        try:
            run = start_run(cfg, run_dir, progress, resume)
        except BaseException:
            if created and distributed.rank() == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        run.model.train()
        for epoch in range(run.step // run.steps_per_epoch, cfg.train.epochs):
            epoch_started = time.time()
            losses = train_one_epoch(run, epoch)
            end_epoch(run, epoch, losses, epoch_started)
        close_writer(run.tb)
    return run.checkpoint_path


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = ["train", "train_step", "train_one_epoch", "evaluate", "load_checkpoint", "model_from_checkpoint",
           "run_checkpoint", "TrainViews", "NonFiniteGuard"]
