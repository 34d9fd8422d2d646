"""The training loop: base method losses + (when ``fsae.enabled``) the FSAE loss on weak/strong views.

One step, top to bottom:
1. the loader gives crops (random long-side resize, flip, crop with padding marked invalid);
2. x_s = A_w(x): colour jitter (the weak view), x_t = A_s(x_s): blur + colour RandAugment (eq. 3);
3. S_s = model(x_s) gives the base losses; S_t = model(x_t) (eq. 4);
4. the teacher's score map (S_s detached, a separate no-grad pass, or an EMA copy) gives the online
   pseudo-labels (eq. 5-8) and ``fsae_loss`` adds lambda * CE(S_t, P_s) on the mask (eq. 9);
5. backward, optimizer step, poly learning rate, EMA update; metrics to ``metrics.csv``.

Run directory: ``config.yaml``, ``checkpoints/last.pt`` (atomic; training resumes from it),
``metrics.csv`` (per logged step), ``epochs.csv`` (per epoch, with held-out seed mIoU when
``train.val_every`` > 0).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fsae.augment import normalize, random_geometry, strong_view, weak_view
from fsae.config import Config, config_from_dict, save_config
from fsae.data import build_dataset
from fsae.data.check import check_dataset, format_problems
from fsae.errors import CheckpointError, DataError, FsaeError
from fsae.evaluate import SeedEvaluator, default_thresholds
from fsae.fsae import fsae_loss, mask_absent_classes
from fsae.infer import batches_by_size, multiscale_cam, normalise_seed, to_tensor_image
from fsae.io import atomic_write
from fsae.methods import build_method

METRIC_FIELDS = ["step", "epoch", "lr", "loss", "cls", "fsae", "mask_ratio", "confident_ratio",
                 "boundary_ratio", "sae_added_ratio", "pl_accuracy"]


class TrainViews(Dataset):
    """Wraps a data set: per-image geometry (seeded by seed, epoch and index) -> fixed-size crops."""

    def __init__(self, dataset, data_cfg, seed: int):
        self.dataset = dataset
        self.cfg = data_cfg
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        geo = random_geometry(sample["image"], sample.get("mask"), long_side=self.cfg.long_side,
                              crop_size=self.cfg.crop_size, hflip=self.cfg.hflip, generator=gen)
        out = {"id": sample["id"], "index": index, "image": geo["image"], "valid": geo["valid"],
               "label": torch.as_tensor(sample["label"])}
        if "mask" in geo:
            out["mask"] = geo["mask"]
        return out


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    return base_lr * (1 - step / max(total, 1)) ** power


def build_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
    groups = []
    for group in model.param_groups():
        mult = optim_cfg.new_layer_lr_mult if group.get("new") else 1.0
        groups.append({"params": group["params"], "lr": optim_cfg.lr * mult, "lr_mult": mult})
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


def downsample_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) integer or bool map -> (B, h, w) by nearest-neighbour sampling."""
    return torch.nn.functional.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)


@torch.no_grad()
def update_ema(ema_model, model, decay: float) -> None:
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


@torch.no_grad()
def evaluate_seeds_in_memory(model, dataset, cfg: Config, device, scales=None) -> dict:
    """Seed mIoU (best over the threshold sweep) on ``dataset`` without writing seed files."""
    model.eval()
    evaluator = SeedEvaluator(cfg.data.num_classes, default_thresholds(*cfg.eval.sweep))
    for group in batches_by_size(dataset, range(len(dataset)), cfg.infer.batch_size):
        images = torch.stack([to_tensor_image(s["image"]) for s in group]).to(device)
        cams = multiscale_cam(model, normalize(images), scales or cfg.train.val_scales, cfg.infer.flip)
        for sample, cam in zip(group, cams):
            evaluator.update(*normalise_seed(cam, torch.as_tensor(sample["label"])), sample["mask"])
    model.train()
    return evaluator.result()["best"]


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, cfg: Config | None = None) -> dict:
    """Load a checkpoint (weights only); refuse one whose class count or config differs from ``cfg``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not an fsae checkpoint (no 'model'/'config' entries)")
    if cfg is not None:
        saved = config_from_dict(state["config"], str(path))
        if saved.data.num_classes != cfg.data.num_classes:
            raise CheckpointError(f"{path}: checkpoint has {saved.data.num_classes} classes, the config "
                                  f"{cfg.data.num_classes}")
        if saved.model != cfg.model:
            raise CheckpointError(f"{path}: checkpoint model {saved.model} differs from the config's {cfg.model}")
    return state


def model_from_checkpoint(path: str | os.PathLike, cfg: Config | None = None, device="cpu"):
    """Rebuild the method from a checkpoint's own config and load its weights; returns (model, cfg)."""
    state = load_checkpoint(path, cfg)
    saved = config_from_dict(state["config"], str(path))
    model = build_method(saved.model, saved.data.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), saved


def _check_finite(total: torch.Tensor, terms: dict, step: int, ids) -> None:
    if not torch.isfinite(total):
        values = {k: v.item() for k, v in terms.items()}
        raise FsaeError(f"non-finite loss at step {step}: terms {values}; batch ids {list(ids)}")


def train(cfg: Config, run_dir: str | os.PathLike, progress: bool = True, resume: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir``; resume from ``checkpoints/last.pt`` when present."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    device = torch.device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # Refuse to start on a data set whose lists, label file or files are missing (the fast check).
    problems = check_dataset(cfg.data.kind, cfg.data.root, split=cfg.data.train_split, fast=True,
                             num_classes=cfg.data.num_classes)
    if problems:
        raise DataError(f"the training data fails `fsae data check --fast`:\n{format_problems(problems, limit=20)}")
    dataset = build_dataset(cfg.data, cfg.data.train_split, with_saliency=False)
    views = TrainViews(dataset, cfg.data, cfg.train.seed)
    loader_gen = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(views, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.workers, generator=loader_gen)
    if len(loader) == 0:
        raise FsaeError(f"{cfg.data.root}: {len(dataset)} images is fewer than one batch of {cfg.train.batch_size}")
    val_set = None
    if cfg.train.val_every and cfg.data.val_split:
        val_set = build_dataset(cfg.data, cfg.data.val_split)

    model = build_method(cfg.model, cfg.data.num_classes).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = None
    if cfg.fsae.enabled and cfg.fsae.teacher == "ema":
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    aug_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    total_steps = cfg.train.epochs * len(loader)
    step, start_epoch = 0, 0

    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, cfg)
        if state.get("config_hash") != cfg.hash():
            raise CheckpointError(f"{ckpt_path}: written by another config (hash {state.get('config_hash')} "
                                  f"!= {cfg.hash()}); use a new run directory or delete it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        aug_gen.set_state(state["aug_rng"])
        loader_gen.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, start_epoch = state["step"], state["epoch"]

    metrics_path = run_dir / "metrics.csv"
    epochs_path = run_dir / "epochs.csv"
    if start_epoch == 0:
        for p, header in ((metrics_path, METRIC_FIELDS), (epochs_path, ["epoch", "step", "seconds", "val_miou",
                                                                      "val_fpr", "val_fnr", "val_threshold"])):
            with open(p, "w", newline="") as f:
                csv.writer(f).writerow(header)

    fs = cfg.fsae
    started = time.time()
    model.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        views.epoch = epoch
        use_fsae = fs.enabled and epoch >= fs.start_epoch
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not progress, leave=False)
        for batch in bar:
            lr = poly_lr(cfg.optim.lr, step, total_steps, cfg.optim.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            images = batch["image"].to(device)
            labels = batch["label"].to(device)
            x_s = weak_view(images, aug_gen, jitter=cfg.data.jitter)
            source = normalize(x_s)
            out_s = model(source, labels)
            terms = model.losses({**batch, "label": labels}, out_s)
            stats: dict[str, float] = {}
            if use_fsae:
                x_t = strong_view(x_s, aug_gen, num_ops=fs.strong_ops, blur_sigma=tuple(fs.blur),
                                  blur_prob=fs.blur_prob)
                out_t = model(normalize(x_t), labels)
                if fs.teacher == "reuse":
                    teacher = out_s.score_map.detach()
                elif fs.teacher == "separate":
                    with torch.no_grad():
                        teacher = model(source, labels).score_map
                else:
                    with torch.no_grad():
                        teacher = ema(source, labels).score_map
                size = teacher.shape[-2:]
                gt = downsample_nearest(batch["mask"], size).to(device) if "mask" in batch else None
                terms["fsae"], stats = fsae_loss(
                    mask_absent_classes(teacher, labels), mask_absent_classes(out_t.score_map, labels),
                    tau_fae=fs.tau_fae, tau_sae=fs.tau_sae, kernel_size=fs.kernel_size, weight=fs.weight,
                    use_sae=fs.use_sae, reduction=fs.reduction,
                    valid=downsample_nearest(batch["valid"], size).to(device), gt=gt)
            elif fs.enabled:
                terms["fsae"] = torch.zeros((), device=device)  # before start_epoch: exactly zero
            total = sum(terms.values())
            _check_finite(total, terms, step, batch["id"])
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, fs.ema_decay)
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch, "lr": lr, "loss": total.item(),
                       **{k: v.item() for k, v in terms.items()}, **stats}
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([_fmt(row.get(k)) for k in METRIC_FIELDS])
                bar.set_postfix(loss=f"{total.item():.3f}")
        bar.close()
        val = {}
        if val_set is not None and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
            val = evaluate_seeds_in_memory(model, val_set, cfg, device)
        with open(epochs_path, "a", newline="") as f:
            csv.writer(f).writerow([epoch + 1, step, _fmt(time.time() - started), _fmt(val.get("miou")),
                                    _fmt(val.get("fpr")), _fmt(val.get("fnr")), _fmt(val.get("threshold"))])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "epoch": epoch + 1, "config": cfg.to_dict(), "config_hash": cfg.hash(),
                 "aug_rng": aug_gen.get_state(), "loader_rng": loader_gen.get_state(),
                 "torch_rng": torch.get_rng_state()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(ckpt_path, state)
    return ckpt_path


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = ["train", "load_checkpoint", "model_from_checkpoint", "TrainViews"]
