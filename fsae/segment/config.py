"""Settings of the segmentation stage (DeepLab V1 / V2 trained on pseudo-masks), one dataclass per concern.

The defaults are the DeepLab-V2 settings WSSS papers use on VOC (``configs/voc/deeplabv2_r101.yaml``
documents where each number comes from). A recipe YAML overrides fields and ``--set train.iterations=100``
overrides apply on top, with ``fsae.config``'s own helpers (unknown keys are an error naming the file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsae.config import _apply, fill_config
from fsae.errors import ConfigError


@dataclass
class SegDataConfig:
    kind: str = "voc"  # voc | coco (the synthetic set uses the voc layout)
    root: str = "data/synthetic"
    num_classes: int = 4
    train_split: str = "train"
    val_split: str = "val"  # evaluated against gt_dir after `fsae seg infer` ("" = none)
    test_split: str = ""  # VOC test server: results/VOC2012/Segmentation/comp6_test_cls ("" = none)
    # Training masks: the pseudo-mask folder (absolute, or relative to root); coco appends /<split>.
    mask_dir: str | None = None
    gt_dir: str = "SegmentationClass"  # val ground truth, relative to root (coco: SegmentationClass/val2014)
    label_file: str | None = None  # default: <root>/cls_labels.json
    saliency_dir: str | None = None  # unused here; build_dataset reads the attribute
    crop_size: int = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # random rescale factor
    hflip: bool = True
    workers: int = 0


@dataclass
class SegModelConfig:
    arch: str = "deeplabv2"  # deeplabv2 (ASPP, branches summed) | deeplabv1 (LargeFOV)
    backbone: str = "resnet101"  # timm name, "torchvision:<name>", or tinycnn (tests)
    output_stride: int = 8
    # null (random init) | local file (ImageNet state dict or an fsae DeepLab checkpoint, e.g. COCO-trained)
    # | "timm" (timm's download) | "efficientnet-lite0-package"
    weights: str | None = None
    freeze_bn: bool = True  # keep the backbone's BatchNorm statistics and affine fixed (batch 10)
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # deeplabv2
    largefov_dilation: int = 12  # deeplabv1: fc6 3x3 conv dilation
    largefov_channels: int = 1024  # deeplabv1: fc6 / fc7 width
    dropout: float = 0.5  # deeplabv1: after fc6 and fc7
    width: int = 32  # tinycnn only
    depth: int = 6  # tinycnn only
    # Heads of other codebases (fsae.segment.deeplab): deeplab (the two above) | ppc (the PPC/EPS authors':
    # ASPP with BN and image pooling, concatenated / LargeFOV with BN) | mctformer (deeplabv1 only).
    head: str = "deeplab"
    aspp_channels: int = 256  # ppc deeplabv2: width of each ASPP branch
    bn_momentum: float = 3e-4  # ppc heads' BatchNorm momentum (PyTorch convention)
    resnet38_width: float = 1.0  # resnet38 backbone: channel multiplier (< 1 for CPU tests only)


@dataclass
class SegOptimConfig:
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    head_lr_mult: float = 10.0  # the new head (ASPP / LargeFOV) learns 10x faster than the backbone
    bias_lr_mult: float = 1.0  # extra factor on conv biases (the PPC authors': 2)
    bias_weight_decay: bool = True  # false: biases without weight decay (the PPC authors')
    train_bn_affine: bool = True  # false: BatchNorm weight/bias left out of the optimiser (the PPC authors')


@dataclass
class SegTrainConfig:
    iterations: int = 20000
    batch_size: int = 10
    seed: int = 0
    device: str = "cpu"
    log_every: int = 20  # iterations between metrics.csv rows
    checkpoint_every: int = 1000  # iterations between checkpoints/last.pt writes (and at the end)


@dataclass
class CrfParams:
    """``fsae.refine.crf.crf_inference`` keywords; the defaults are DeepLab's (see the VOC recipe)."""

    enabled: bool = True
    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("enabled")
        return d


@dataclass
class SegInferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    flip: bool = True
    fuse: str = "mean_probs"  # over scales x flips: mean_probs | mean_logits (PPC authors') | max_probs (MCTformer)
    crf: CrfParams = field(default_factory=CrfParams)


@dataclass
class SegConfig:
    name: str = "seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    infer: SegInferConfig = field(default_factory=SegInferConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Hash of what decides the trained weights (not the name, device, logging or inference)."""
        d = self.to_dict()
        for key in ("name", "infer"):
            d.pop(key)
        for key in ("device", "log_every", "checkpoint_every"):
            d["train"].pop(key)
        d["data"].pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_seg_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SegConfig:
    """Defaults, then the recipe YAML at ``path`` (if any), then ``overrides`` (``a.b=value``)."""
    cfg = fill_config(SegConfig(), path, overrides)
    check_seg_config(cfg, str(path) if path else "config")
    return cfg


def seg_config_from_dict(data: dict[str, Any], where: str) -> SegConfig:
    cfg = SegConfig()
    _apply(cfg, data, where)
    return cfg


def check_seg_config(cfg: SegConfig, where: str) -> None:
    """Values that would only fail deep inside training: an error naming the file and the field."""
    if cfg.model.arch not in ("deeplabv1", "deeplabv2"):
        raise ConfigError(f"{where}: model.arch must be deeplabv1 or deeplabv2, got {cfg.model.arch!r}")
    head = (cfg.model.head, cfg.model.arch)
    if head[0] not in ("deeplab", "ppc", "mctformer") or head == ("mctformer", "deeplabv2"):
        raise ConfigError(f"{where}: model.head must be deeplab, ppc or mctformer (deeplabv1 only), got "
                          f"{cfg.model.head!r} with model.arch {cfg.model.arch!r}")
    if cfg.infer.fuse not in ("mean_probs", "mean_logits", "max_probs"):
        raise ConfigError(f"{where}: infer.fuse must be mean_probs, mean_logits or max_probs, got {cfg.infer.fuse!r}")
    lo, hi = (list(cfg.data.scale_range) + [None, None])[:2]
    if len(cfg.data.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError(f"{where}: data.scale_range must be [low, high] with 0 < low <= high, "
                          f"got {cfg.data.scale_range}")
    if not cfg.infer.scales or min(cfg.infer.scales) <= 0:
        raise ConfigError(f"{where}: infer.scales must be positive numbers, got {cfg.infer.scales}")
    if cfg.train.iterations < 1 or cfg.train.batch_size < 1:
        raise ConfigError(f"{where}: train.iterations and train.batch_size must be >= 1")


def save_seg_config(cfg: SegConfig, path: str | Path) -> Path:
    from fsae.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
