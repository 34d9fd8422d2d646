"""IRN settings: one dataclass per step, IRN's defaults (``run_sample.py``, as SIPE's copy uses them).

A recipe YAML (``configs/*/irn.yaml``) overrides fields; ``--set train.epochs=1`` overrides on the CLI
(the parsing helpers of ``fsae.config``). The resolved config is saved next to the IRN checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsae.config import fill_config
from fsae.errors import ConfigError


@dataclass
class IRLabelConfig:
    fg_threshold: float = 0.30  # conf_fg_thres: background score for the confident foreground
    bg_threshold: float = 0.05  # conf_bg_thres: background score for the confident background
    gt_prob: float = 0.7  # CRF unary: probability of the given hard label (crf_inference_label)
    crf_iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    workers: int | None = None  # processes for the CRF (None = all cores)

    def crf_params(self) -> dict[str, float]:
        return {"iterations": self.crf_iterations, "gaussian_sxy": self.gaussian_sxy,
                "gaussian_compat": self.gaussian_compat, "bilateral_sxy": self.bilateral_sxy,
                "bilateral_srgb": self.bilateral_srgb, "bilateral_compat": self.bilateral_compat}


@dataclass
class IRNNetConfig:
    backbone: str = "resnet50"  # torchvision ResNet name
    weights: str | None = None  # local state-dict path | "torchvision" (download) | null (random init)
    branch_width: int = 32
    freeze_backbone: bool = True  # IRN: frozen; false trains it too (for random-init backbones, not IRN)


@dataclass
class IRNTrainConfig:
    epochs: int = 3  # irn_num_epoches
    batch_size: int = 32  # irn_batch_size
    crop_size: int = 512  # irn_crop_size
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # train_irn rescale
    hflip: bool = True
    radius: int = 10  # PathIndex(radius=10) for the affinity labels
    lr: float = 0.1  # irn_learning_rate
    weight_decay: float = 1e-4  # irn_weight_decay
    # IRN's PolyOptimizer passes weight_decay where torch's SGD takes momentum: it trains with
    # momentum 1e-4, i.e. none. Kept as IRN runs it.
    momentum: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    workers: int = 0  # DataLoader processes


@dataclass
class WalkConfig:
    radius: int = 5  # propagate_to_edge(radius=5)
    beta: float = 10.0
    exp_times: int = 8  # the walk runs 2^exp_times steps
    bg_threshold: float = 0.25  # sem_seg_bg_thres


@dataclass
class IRNConfig:
    name: str = "irn"
    device: str = "cpu"
    ir_label: IRLabelConfig = field(default_factory=IRLabelConfig)
    net: IRNNetConfig = field(default_factory=IRNNetConfig)
    train: IRNTrainConfig = field(default_factory=IRNTrainConfig)
    walk: WalkConfig = field(default_factory=WalkConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Hash of what decides the trained boundary network (label, net and train settings)."""
        d = {k: self.to_dict()[k] for k in ("ir_label", "net", "train")}
        d["ir_label"].pop("workers")
        d["train"].pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_irn_config(path: str | Path | None = None, overrides: list[str] | None = None) -> IRNConfig:
    """IRN defaults, then the YAML at ``path`` (if any), then ``a.b=value`` overrides."""
    cfg = fill_config(IRNConfig(), path, overrides, what="IRN config")
    if cfg.ir_label.bg_threshold > cfg.ir_label.fg_threshold:
        raise ConfigError(f"ir_label.bg_threshold {cfg.ir_label.bg_threshold} must not exceed "
                          f"ir_label.fg_threshold {cfg.ir_label.fg_threshold}")
    if cfg.train.crop_size % 16:
        raise ConfigError(f"train.crop_size must be a multiple of 16, got {cfg.train.crop_size}")
    return cfg


def save_irn_config(cfg: IRNConfig, path: str | Path) -> Path:
    from fsae.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
