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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fsae import distributed
from fsae.augment import apply_geometry, normalize, random_geometry, strong_view, timm_train_transform, timm_train_view, weak_view
from fsae.config import Config, config_from_dict, describe_changes, save_config
from fsae.data import build_dataset
from fsae.data.check import check_training_data, format_problems
from fsae.errors import CheckpointError, ConfigError, DataError, FsaeError
from fsae.evaluate import SeedEvaluator, default_thresholds
from fsae.fsae import fsae_loss, mask_absent_classes
from fsae.infer import batches_by_size, multiscale_cam, normalise_seed, to_tensor_image
from fsae.io import atomic_write, ensure_output_dir
from fsae.methods import build_method
from fsae.models.backbones import read_weight_file
from fsae.tblog import close_writer, log_scalars, open_writer

METRIC_FIELDS = ["step", "epoch", "lr", "loss", "cls", "fsae", "mask_ratio", "confident_ratio",
                 "boundary_ratio", "sae_added_ratio", "pl_accuracy", "skipped",
                 "sal", "er", "ecr", "contrast",  # EPS / PPC terms (fsae/methods/eps.py, ppc.py)
                 "gsc", "patch"]  # SIPE's GSC term, MCTformer's patch-token term (sipe.py, mctformer.py)


class TrainViews(Dataset):
    """Wraps a data set: per-image geometry (seeded by seed, epoch and index) -> fixed-size crops."""

    def __init__(self, dataset, data_cfg, seed: int):
        self.dataset = dataset
        self.cfg = data_cfg
        self.seed = seed
        self.epoch = 0
        self.timm_transform = timm_train_transform(data_cfg) if data_cfg.transform == "timm" else None

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


def image_generators(seed: int, epoch: int, indices) -> list[torch.Generator]:
    """One colour-augmentation generator per image, seeded by (seed, epoch, index) like the geometry: an
    image gets the same weak and strong views whichever process or batch position it lands in."""
    return [torch.Generator().manual_seed(hash((seed, epoch, int(i), 1)) % (2**63)) for i in indices]


def per_image(view, images: torch.Tensor, generators, **kwargs) -> torch.Tensor:
    """``view`` (``weak_view`` / ``strong_view``) image by image, each with its own generator. (B, 3, H, W)."""
    return torch.cat([view(image[None], gen, **kwargs) for image, gen in zip(images, generators)])


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    return base_lr * (1 - step / max(total, 1)) ** power


def learning_rate(optim_cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of 0-based ``step`` of ``total_steps`` (set before every step).

    Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_epochs * steps_per_epoch`` steps, then
    ``schedule``: "poly", ``lr (1 - step / total) ** poly_power``; "cosine", ``min_lr + (lr - min_lr)
    (1 + cos(pi step / total)) / 2``, timm's ``CosineLRScheduler`` (warmup_prefix=False) stepped per update.
    """
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
    """Seed mIoU (best over the threshold sweep) on ``dataset`` without writing seed files.

    Under torchrun every process scores its share of the images and the confusions are summed."""
    model.eval()
    evaluator = SeedEvaluator(cfg.data.num_classes, default_thresholds(*cfg.eval.sweep))
    share = distributed.shard_indices(range(len(dataset)), (distributed.rank(), distributed.world_size()))
    for group in batches_by_size(dataset, share, cfg.infer.batch_size):
        images = torch.stack([to_tensor_image(s["image"]) for s in group]).to(device)
        cams = multiscale_cam(model, normalize(images), scales or cfg.train.val_scales, cfg.infer.flip)
        for sample, cam in zip(group, cams):
            evaluator.update(*normalise_seed(cam, torch.as_tensor(sample["label"])), sample["mask"])
    distributed.all_reduce_sum(evaluator.confusions)
    evaluator.count = len(dataset)
    model.train()
    return evaluator.result()["best"]


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def training_state(model, optimizer, ema, cfg: Config, step: int, epoch: int, skipped: int) -> dict:
    """What a resumed run needs to continue exactly: weights, optimizer, EMA, step, completed epochs,
    skipped-step count, config (+ hash) and the global torch RNG. The data order and the augmentations are
    functions of (seed, epoch, index), so the step alone says where the data stream resumes."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
             "skipped": skipped, "config": cfg.to_dict(), "config_hash": cfg.hash(),
             "torch_rng": torch.get_rng_state()}
    if ema is not None:
        state["ema"] = ema.state_dict()
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


def load_checkpoint(path: str | os.PathLike, cfg: Config | None = None) -> dict:
    """Load a checkpoint (weights only); refuse one whose class count or config differs from ``cfg``."""
    path = Path(path)
    state = read_weight_file(path, "checkpoint", unwrap=False)
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


def model_from_checkpoint(path: str | os.PathLike, cfg: Config | None = None, device="cpu"):
    """Rebuild the method from a checkpoint's own config and load its weights; returns (model, cfg)."""
    state = load_checkpoint(path, cfg)
    saved = config_from_dict(state["config"], str(path))
    model = build_method(saved.model, saved.data.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), saved


def _check_finite(total: torch.Tensor, terms: dict, step: int, ids, finite_everywhere: bool = True) -> None:
    """Stop on a non-finite loss, naming the step, the loss terms and the batch ids (every process stops)."""
    if not torch.isfinite(total):
        values = {k: v.item() for k, v in terms.items()}
        raise FsaeError(f"non-finite loss at step {step}: terms {values}; batch ids {list(ids)}")
    if not finite_everywhere:
        raise FsaeError(f"non-finite loss at step {step} in another process (its error names the terms and ids)")


def train(cfg: Config, run_dir: str | os.PathLike, progress: bool = True, resume: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir``; resume from ``checkpoints/last.pt`` when present.

    Under torchrun (``fsae.distributed.process_group`` entered by the caller) every process trains on
    ``train.batch_size / world size`` images of each global batch with DistributedDataParallel; rank 0
    logs, evaluates and writes checkpoints. The result equals one process with the global batch (same
    images per step, same per-image augmentations, averaged gradients) up to float rounding, and exactly
    only with ``train.sync_bn`` (GPU) or a BatchNorm-free backbone: plain BatchNorm normalises each
    process's share of the batch on its own.
    """
    run_dir = Path(run_dir)
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    progress = progress and main
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # under torchrun: this process's own GPU
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # Refuse to start on a data set whose lists, label file or files are missing (the fast check).
    problems = check_training_data(cfg)
    if problems:
        raise DataError(f"the training data fails `fsae data check --fast`:\n{format_problems(problems, limit=20)}")
    dataset = build_dataset(cfg.data, cfg.data.train_split, with_saliency=bool(cfg.data.saliency_dir))
    views = TrainViews(dataset, cfg.data, cfg.train.seed)
    sampler = distributed.ResumableSampler(views, distributed.per_rank_batch(cfg.train.batch_size, world),
                                           num_replicas=world, rank=rank, seed=cfg.train.seed)
    loader = DataLoader(views, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.workers)
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise FsaeError(f"{cfg.data.root}: {len(dataset)} images is fewer than one batch of {cfg.train.batch_size}")
    val_set = None
    if cfg.train.val_every and cfg.data.val_split:
        val_set = build_dataset(cfg.data, cfg.data.val_split)

    model = build_method(cfg.model, cfg.data.num_classes).to(device)
    if getattr(model, "needs_saliency", False) and not cfg.data.saliency_dir:
        raise ConfigError(f"method {cfg.model.method!r} needs saliency maps: set data.saliency_dir "
                          f"(e.g. {cfg.data.root}/saliency for the generated set, SALImages for VOC)")
    if cfg.train.sync_bn and world > 1:
        if device.type != "cuda":
            raise FsaeError("train.sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); set "
                            "train.sync_bn=false for CPU processes")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    optimizer = build_optimizer(model, cfg.optim)  # the method's own param_groups, on the unwrapped module
    ema = None
    if cfg.fsae.enabled and cfg.fsae.teacher == "ema":
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    total_steps = cfg.train.epochs * steps_per_epoch  # the same for any process count: global batches
    step, skipped = 0, 0

    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, cfg)
        if state.get("config_hash") != cfg.hash():
            raise CheckpointError(f"{ckpt_path}: written by another config ({config_changes(state['config'], cfg)}); "
                                  f"use a new run directory, or --no-resume to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        step, skipped = state["step"], state.get("skipped", 0)
    ensure_output_dir(run_dir)  # only now: a refused or failed start leaves the run directory as it was
    if main:
        save_config(cfg, run_dir / "config.yaml")
    start_epoch = step // steps_per_epoch  # a mid-epoch checkpoint (train.checkpoint_every) resumes mid-epoch
    # One process with the global batch, or DDP: gradients are averaged over the processes in backward.
    forward_model = model
    if world > 1:
        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = run_dir / "metrics.csv"
    epochs_path = run_dir / "epochs.csv"
    if main and step == 0:
        for p, header in ((metrics_path, METRIC_FIELDS), (epochs_path, ["epoch", "step", "seconds", "val_miou",
                                                                      "val_fpr", "val_fnr", "val_threshold"])):
            with open(p, "w", newline="") as f:
                csv.writer(f).writerow(header)
    elif main:
        _trim_csv(metrics_path, "step", step)
        _trim_csv(epochs_path, "epoch", start_epoch)

    # TensorBoard (train.tensorboard): the same rows as metrics.csv / epochs.csv, in RUN_DIR/tb/.
    tb = open_writer(run_dir / "tb", cfg.train.tensorboard, purge_step=step if step else None)
    fs = cfg.fsae
    started = time.time()
    model.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        views.epoch = epoch
        sampler.set_epoch(epoch, skip_batches=step - epoch * steps_per_epoch)  # > 0 only when resuming mid-epoch
        use_fsae = fs.enabled and epoch >= fs.start_epoch
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not progress, leave=False)
        for batch in bar:
            lr = learning_rate(cfg.optim, step, total_steps, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            images = batch["image"].to(device)
            labels = batch["label"].to(device)
            generators = image_generators(cfg.train.seed, epoch, batch["index"])
            x_s = per_image(weak_view, images, generators, jitter=cfg.data.jitter)
            source = normalize(x_s)
            out_s = forward_model(source, labels)
            terms = model.losses({**batch, "label": labels}, out_s)
            stats: dict[str, float] = {}
            if use_fsae:
                x_t = per_image(strong_view, x_s, generators, num_ops=fs.strong_ops, blur_sigma=tuple(fs.blur),
                                blur_prob=fs.blur_prob)
                out_t = forward_model(normalize(x_t), labels)  # under DDP: a second forward, one backward
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
            finite = distributed.all_true(bool(torch.isfinite(total)), device)  # every process skips or none
            if not (finite or cfg.train.skip_nonfinite):
                _check_finite(total, terms, step, batch["id"], finite_everywhere=False)
            optimizer.zero_grad(set_to_none=True)
            if finite:
                total.backward()  # DDP: gradients averaged over the processes here
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if ema is not None:
                    update_ema(ema, model, fs.ema_decay)
            else:
                skipped += 1  # train.skip_nonfinite: this batch does not update the weights
            step += 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                values = {"lr": lr, "loss": total.item(), **{k: v.item() for k, v in terms.items()}, **stats}
                row = {"step": step, "epoch": epoch, **distributed.mean_over_ranks(values, device), "skipped": skipped}
                if main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow([_fmt(row.get(k)) for k in METRIC_FIELDS])
                log_scalars(tb, "train", row, step)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            if main and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 \
                    and step % steps_per_epoch:  # mid-epoch; the epoch's end saves below
                save_checkpoint(ckpt_path, training_state(model, optimizer, ema, cfg, step, epoch, skipped))
        bar.close()
        val = {}
        if val_set is not None and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
            val = evaluate_seeds_in_memory(model, val_set, cfg, device)  # every process scores 1/N
        if main:
            with open(epochs_path, "a", newline="") as f:
                csv.writer(f).writerow([epoch + 1, step, _fmt(time.time() - started), _fmt(val.get("miou")),
                                        _fmt(val.get("fpr")), _fmt(val.get("fnr")), _fmt(val.get("threshold"))])
            log_scalars(tb, "val", val, step, flush=True)
            save_checkpoint(ckpt_path, training_state(model, optimizer, ema, cfg, step, epoch + 1, skipped))
        distributed.barrier()  # the other processes wait for rank 0's checkpoint
    close_writer(tb)
    return ckpt_path


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = ["train", "load_checkpoint", "model_from_checkpoint", "TrainViews"]
