"""Training DeepLab on pseudo-masks: an iteration loop with poly LR and 10x on the head.

One iteration, top to bottom:
1. the loader gives ``batch_size`` crops: each image (and its pseudo-mask) is rescaled by a random factor
   in ``data.scale_range``, flipped with probability 0.5 and cropped / padded to ``crop_size``
   (``fsae.augment.random_geometry``); padding is the mean colour (0 after normalisation) and label 255;
2. logits = DeepLab(crop) at stride 8 (under ``train.precision``'s autocast, cast back to fp32), upsampled
   bilinearly to the crop size;
3. loss = cross-entropy over the pixels whose mask is not 255 (ignored), in fp32; with ``train.msc_scales``
   (deeplab-pytorch's MSC) the sum of that loss on the crop's logits, on the logits of the crop resized by
   each factor, and on their pixel-wise max (``msc_logits``);
4. SGD step (momentum, weight decay) at ``lr * (1 - it / iterations) ** poly_power``, x ``head_lr_mult``
   on the head (and, when set, x ``bias_lr_mult`` and no decay on biases, BatchNorm affine left out:
   ``DeepLab.param_groups``).

The data order is a function of (seed, iteration) only (``IterationBatches``) and every crop's geometry of
(seed, iteration, index), so a run resumed from ``checkpoints/last.pt`` sees the same batches it would have
seen without the interruption.

Run directory: ``config.yaml``, ``checkpoints/last.pt`` (atomic; model, optimizer, iteration, config and its
hash, RNG state, and the pseudo-masks it trains on: ``data.mask_dir``'s digest and stamp, ``fsae.stamps``),
``metrics.csv`` (iteration, lr, loss). A resume on a mask folder made again since is refused.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fsae.augment import normalize, random_geometry
from fsae.data import build_dataset
from fsae.io import read_mask
from fsae.errors import CheckpointError, ConfigError, DataError, FsaeError
from fsae.labels import IGNORE_INDEX
from fsae.settings import describe_changes
from fsae.segment.config import SegConfig
from fsae.weights import read_weight_file
from fsae.segment.deeplab import DeepLab, build_deeplab
from fsae.speed import grad_scaler, loader_options, mixed_forward, optimizer_step
from fsae.stamps import StaleOutputError, folder_digest, read_stamp, stamp_changes
from fsae.train import checkpoint_kind, poly_lr, read_checkpoint_file, save_checkpoint
from fsae.lock import output_lock
from fsae.masks_check import mask_warnings, say_warnings

METRIC_FIELDS = ["iteration", "lr", "loss", "labelled_ratio"]


class IterationBatches(Sampler):
    """Batches of ``(index, iteration)`` pairs for iterations ``start .. total - 1``.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; each epoch gives ``len // batch_size``
    full batches (the rest of the permutation is dropped), so iteration ``i``'s batch does not depend on
    where a run started.
    """

    def __init__(self, num_items: int, batch_size: int, total: int, seed: int, start: int = 0):
        if num_items < batch_size:
            raise DataError(f"{num_items} training images is fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.total, self.seed, self.start = num_items, batch_size, total, seed, start
        self.per_epoch = num_items // batch_size

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        epoch, order = -1, None
        for it in range(self.start, self.total):
            e, b = divmod(it, self.per_epoch)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
            yield [(int(i), it) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]


class SegTrainCrops(Dataset):
    """Random rescale (factor in ``scale_range``), flip and crop of an image and its mask.

    ``__getitem__((index, iteration))`` -> ``image`` float (3, c, c) normalised (0 on padding),
    ``mask`` long (c, c) (255 on padding), ``id``.
    """

    def __init__(self, dataset, crop_size: int, scale_range, hflip: bool, seed: int):
        self.dataset = dataset
        self.crop_size, self.scale_range, self.hflip, self.seed = crop_size, scale_range, hflip, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, iteration = key
        sample = self.dataset[index]
        if "mask" not in sample:
            raise DataError(f"{self.dataset.mask_path(sample['id'])}: mask file not found (training needs a "
                            f"pseudo-mask for every image of the split; check data.mask_dir)")
        gen = torch.Generator().manual_seed(hash((self.seed, iteration, index)) % (2**63))
        # A random factor s in scale_range, as a long-side range for random_geometry (uniform integers).
        long_side = max(sample["image"].shape[:2])
        lo, hi = self.scale_range
        geo = random_geometry(sample["image"], sample["mask"], long_side=(max(1, round(lo * long_side)),
                              max(1, round(hi * long_side))), crop_size=self.crop_size, hflip=self.hflip,
                              generator=gen)
        image = normalize(geo["image"]) * geo["valid"]  # padding = mean colour, as in DeepLab
        return {"id": sample["id"], "image": image, "mask": geo["mask"]}


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pixel cross-entropy at mask resolution, label 255 ignored; 0 when every pixel is ignored.

    Shape: logits (B, C+1, h, w), masks (B, H, W) long -> scalar loss and the labelled pixel ratio.
    """
    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    labelled = masks != IGNORE_INDEX
    loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / labelled.sum().clamp(min=1), labelled.float().mean().item()


def msc_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               scales) -> list[torch.Tensor]:
    """deeplab-pytorch's multi-scale training outputs (libs/models/msc.py:26-47): ``[logits, logits at each
    scale, their pixel-wise max]``; each scale resizes ``images`` bilinearly (``scale_factor``, no corner
    alignment) and the max is taken after resizing every output bilinearly to the full-scale logits' size.

    Shape: images (B, 3, H, W) -> len(scales) + 2 tensors (B, K, h_s, w_s); no scales (None, []): ``[logits]``.
    """
    logits = forward(images)
    if not scales:
        return [logits]
    pyramid = [forward(F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    size = logits.shape[-2:]
    resized = [logits] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
    return [logits, *pyramid, torch.stack(resized).max(dim=0).values]


def msc_loss(outputs: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The sum of ``segmentation_loss`` over ``msc_logits``' outputs (deeplab-pytorch main.py:231-236) and the
    labelled pixel ratio."""
    losses = [segmentation_loss(o, masks) for o in outputs]
    return sum(loss for loss, _ in losses), losses[0][1]


def check_training_masks(dataset) -> None:
    """Every id of the split needs its mask file: a DataError naming the first missing files."""
    missing = [dataset.mask_path(i) for i in dataset.ids if not dataset.mask_path(i).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: mask file not found ({len(missing)} of {len(dataset.ids)} missing, e.g. "
                        f"{[str(p) for p in missing[1:4]]}); data.mask_dir must hold a pseudo-mask per image")


def mask_source(mask_dir: str | os.PathLike) -> dict:
    """What a run trains on: ``{"digest": folder_digest, "stamp": the folder's stamp or None}``."""
    return {"digest": folder_digest(mask_dir), "stamp": read_stamp(mask_dir)}


def check_same_masks(state: dict, masks: dict, ckpt_path: Path, mask_dir: Path) -> None:
    """A checkpoint resumes only on the masks it was trained on (checkpoints without the record pass)."""
    saved = state.get("masks")
    if saved is None or saved["digest"] == masks["digest"]:
        return
    if saved["stamp"] is not None and masks["stamp"] is not None:
        what = stamp_changes(saved["stamp"], masks["stamp"])
    else:
        what = "its files changed since"
    raise StaleOutputError(f"{ckpt_path}: trained on other pseudo-masks than {mask_dir} holds now ({what}); "
                           f"use a new run directory or pass --no-resume")


def build_seg_optimizer(model: DeepLab, cfg: SegConfig) -> torch.optim.SGD:
    o = cfg.optim
    groups = [{"params": g["params"], "lr": o.lr * g["lr_mult"], "lr_mult": g["lr_mult"],
               "weight_decay": g.get("weight_decay", o.weight_decay)}
              for g in model.param_groups(o.head_lr_mult, o.bias_lr_mult, o.bias_weight_decay, o.train_bn_affine)
              if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def load_seg_checkpoint(path: str | os.PathLike, num_classes: int | None = None) -> dict:
    """Read a ``fsae seg train`` checkpoint; a CheckpointError naming the file if it is not one (a CAM
    checkpoint: which command takes it), does not read (what to do) or does not fit."""
    path = Path(path)
    state = read_checkpoint_file(path, "use an earlier copy, or train again from scratch with --no-resume")
    if checkpoint_kind(state) == "cam":
        raise CheckpointError(f"{path}: a CAM checkpoint (from `fsae train`): `fsae cam` takes it; `fsae seg "
                              f"infer` needs a DeepLab checkpoint of `fsae seg train` (RUN/checkpoints/last.pt)")
    if not isinstance(state, dict) or state.get("kind") != "segmentation" or "model" not in state:
        raise CheckpointError(f"{path}: not a segmentation checkpoint from `fsae seg train` (no 'kind: "
                              f"segmentation' entry); pass the run's checkpoints/last.pt")
    saved = SegConfig.from_dict(state["config"], str(path))
    if num_classes is not None and saved.data.num_classes != num_classes:
        raise CheckpointError(f"{path}: checkpoint has {saved.data.num_classes} classes, the config {num_classes}")
    return state


def seg_model_from_checkpoint(path: str | os.PathLike, num_classes: int | None = None, device="cpu"):
    """Rebuild the DeepLab from a checkpoint's own config and load its weights; returns (model, cfg)."""
    state = load_seg_checkpoint(path, num_classes)
    saved = SegConfig.from_dict(state["config"], str(path))
    saved.model.weights = None  # the checkpoint holds every weight
    model = build_deeplab(saved.model, saved.data.num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model in its own config ({exc})") from exc
    return model.to(device).eval(), saved


GT_FOLDERS = ("SegmentationClass", "SegmentationClassAug")  # a data set's ground truth (plus data.gt_dir)
GT_CHECKED = 8  # masks compared with the ground truth (evenly spaced ids)


def ground_truth_folders(data_cfg) -> list[Path]:
    """The data set's ground-truth mask folders, symlinks resolved: ``GT_FOLDERS``, ``data.gt_dir`` and its
    parent, each also with the training split's subfolder (COCO's ``SegmentationClass/<split>``)."""
    root = Path(data_cfg.root)
    names = [*GT_FOLDERS, data_cfg.gt_dir, str(Path(data_cfg.gt_dir).parent)]
    folders = [root / n for n in names if n and n != "."]
    return [f.resolve() for f in folders + [f / data_cfg.train_split for f in folders]]


def ground_truth_copy(mask_folder: Path, ids: list[str], data_cfg) -> str:
    """Why ``mask_folder`` is the ground truth (empty: it is not): the same folder, or masks equal to the
    ground truth on every one of up to ``GT_CHECKED`` checked images that have a ground-truth mask."""
    folders = ground_truth_folders(data_cfg)
    if mask_folder.resolve() in folders:
        return f"it is the data set's ground-truth folder ({mask_folder.resolve()})"
    picked = ids if len(ids) <= GT_CHECKED else [ids[round(k * (len(ids) - 1) / (GT_CHECKED - 1))]
                                                  for k in range(GT_CHECKED)]
    same = 0
    for image_id in picked:
        gt = next((f / f"{image_id}.png" for f in folders if (f / f"{image_id}.png").is_file()), None)
        if gt is None:
            continue
        try:
            if not np.array_equal(read_mask(mask_folder / f"{image_id}.png"), read_mask(gt)):
                return ""
        except DataError:
            return ""
        same += 1
    return f"its masks equal the ground truth ({gt.parent}) on all {same} checked images" if same else ""


def check_not_ground_truth(mask_folder: Path, ids: list[str], data_cfg, allow_gt: bool) -> None:
    """Refuse (DataError) to train on the ground truth unless ``allow_gt`` (an upper-bound run)."""
    why = "" if allow_gt else ground_truth_copy(mask_folder, ids, data_cfg)
    if why:
        raise DataError(f"{mask_folder}: {why}: DeepLab would train on the ground truth, not on pseudo-masks; "
                        f"point data.mask_dir at the pseudo-masks (e.g. RUN/crf), or pass --allow-gt for an "
                        f"upper-bound run")


def train_segmentation(cfg: SegConfig, run_dir: str | os.PathLike, progress: bool = True, resume: bool = True,
                       on_iteration: Callable[[int], None] | None = None, allow_gt: bool = False) -> Path:
    """Train ``cfg`` into ``run_dir``; resume from ``checkpoints/last.pt`` when present.

    ``on_iteration(i)`` is called after iteration ``i`` (1-based) is done and checkpointed (if due).
    Returns the checkpoint path. A finished run returns at once. One writer per run directory
    (``fsae.lock``). The pseudo-masks are checked first: the ground truth is refused unless ``allow_gt``
    (``check_not_ground_truth``; recorded in the checkpoint as ``allow_gt``), and degenerate masks are
    named on stderr (``fsae.masks_check.mask_warnings``, with ``progress``).
    """
    with output_lock(run_dir):
        return _train_segmentation(cfg, Path(run_dir), progress, resume, on_iteration, allow_gt)


def _train_segmentation(cfg: SegConfig, run_dir: Path, progress: bool, resume: bool,
                        on_iteration: Callable[[int], None] | None, allow_gt: bool) -> Path:
    if not cfg.data.mask_dir:
        raise ConfigError("data.mask_dir is not set: point it at the pseudo-mask folder (e.g. RUN/masks), "
                          "with --masks or --set data.mask_dir=...")
    run_dir = Path(run_dir)  # created by the config's save below: a refused or failed start leaves nothing
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    device = torch.device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    dataset = build_dataset(cfg.data, cfg.data.train_split)
    check_training_masks(dataset)
    # the folder the masks are read from (COCO: data.mask_dir/<split>), recorded in the checkpoint
    mask_folder = dataset.mask_path(dataset.ids[0]).parent if dataset.ids else Path(cfg.data.mask_dir)
    check_not_ground_truth(mask_folder, list(dataset.ids), cfg.data, allow_gt)
    labels = {i: [int(c) + 1 for c in np.flatnonzero(dataset.labels[i])] for i in dataset.ids}
    say_warnings(mask_warnings(mask_folder, list(dataset.ids), labels), progress)
    trained_on = mask_source(mask_folder)
    model = build_deeplab(cfg.model, cfg.data.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_seg_optimizer(model, cfg)
    scaler = grad_scaler(cfg.train.precision, device)  # train.precision fp16 only
    start = 0
    if resume and ckpt_path.exists():
        state = load_seg_checkpoint(ckpt_path, cfg.data.num_classes)
        if state.get("config_hash") != cfg.hash():
            saved = SegConfig.from_dict(state["config"], str(ckpt_path))
            raise CheckpointError(f"{ckpt_path}: written by another config ({describe_changes(saved, cfg)}); "
                                  f"use a new run directory or pass --no-resume")
        check_same_masks(state, trained_on, ckpt_path, mask_folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start = state["iteration"]
    cfg.save(run_dir / "config.yaml")
    total = cfg.train.iterations
    if start >= total:
        return ckpt_path

    metrics_path = run_dir / "metrics.csv"
    rows = []
    if start > 0 and metrics_path.exists():  # drop rows logged after the checkpoint we resume from
        with open(metrics_path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start]
    with open(metrics_path, "w", newline="") as f:
        csv.writer(f).writerows([METRIC_FIELDS, *rows])
    crops = SegTrainCrops(dataset, cfg.data.crop_size, cfg.data.scale_range, cfg.data.hflip, cfg.train.seed)
    sampler = IterationBatches(len(dataset), cfg.train.batch_size, total, cfg.train.seed, start)
    # Its own generator: the loader must not draw from the global RNG that a resumed run restores.
    loader = DataLoader(crops, batch_sampler=sampler, generator=torch.Generator().manual_seed(cfg.train.seed),
                        **loader_options(cfg.data.workers, device, cfg.data.prefetch))

    def checkpoint(iteration: int) -> None:
        save_checkpoint(ckpt_path, {"kind": "segmentation", "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "iteration": iteration,
                                    "config": cfg.to_dict(), "config_hash": cfg.hash(), "masks": trained_on,
                                    **({"allow_gt": True} if allow_gt else {}),
                                    "torch_rng": torch.get_rng_state(),
                                    **({"scaler": scaler.state_dict()} if scaler is not None else {})})

    model.train()
    bar = tqdm(loader, desc="seg train", total=len(sampler), disable=not progress)
    iteration = start
    for batch in bar:
        lr = poly_lr(cfg.optim.lr, iteration, total, cfg.optim.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        outputs = msc_logits(lambda x: mixed_forward(model, x, precision=cfg.train.precision,
                                                     channels_last=cfg.train.channels_last),
                             images, cfg.train.msc_scales)
        loss, labelled = msc_loss(outputs, masks)  # fp32 logits: the log-softmax needs fp32's mantissa
        if not torch.isfinite(loss):
            raise FsaeError(f"non-finite loss at iteration {iteration}; batch ids {list(batch['id'])}")
        optimizer_step(optimizer, scaler, loss)
        iteration += 1
        if iteration % cfg.train.log_every == 0 or iteration == total:
            with open(metrics_path, "a", newline="") as f:
                csv.writer(f).writerow([iteration, f"{lr:.6g}", f"{loss.item():.6g}", f"{labelled:.4f}"])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if iteration % cfg.train.checkpoint_every == 0 or iteration == total:
            checkpoint(iteration)
        if on_iteration is not None:
            on_iteration(iteration)
    bar.close()
    return ckpt_path


__all__ = ["train_segmentation", "load_seg_checkpoint", "seg_model_from_checkpoint", "segmentation_loss",
           "msc_logits", "msc_loss",
           "IterationBatches", "SegTrainCrops"]
