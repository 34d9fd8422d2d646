"""PSA settings: one dataclass per step, defaults of PSA itself (github.com/jiwoon-ahn/psa).

MCTformer runs PSA with other values (``configs/voc/psa.yaml``: its ``main.py`` alphas, its copy of
``psa/train_aff.py`` and ``psa/infer_aff.py``). A recipe YAML overrides fields; ``--set walk.logt=6`` on
the CLI (``fsae.config.fill_config``). The resolved config is saved next to the AffinityNet checkpoint.
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

FEATURE_STRIDE = 8  # ResNet-38's output stride: affinities live on the stride-8 grid


@dataclass
class AffLabelConfig:
    low_alpha: float = 4.0  # infer_cls.py --low_alpha: bg = (1 - max cam)^4, a high bg -> confident fg
    high_alpha: float = 32.0  # --high_alpha: bg = (1 - max cam)^32, a low bg -> confident bg
    crf_iterations: int = 10  # tool/imutils.py crf_inference (t=10, Gaussian 3/3, bilateral 80/13/10)
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    workers: int | None = None  # processes for the CRF (None = all cores)

    def crf_params(self) -> dict[str, float]:
        return {"iterations": self.crf_iterations, "gaussian_sxy": self.gaussian_sxy,
                "gaussian_compat": self.gaussian_compat, "bilateral_sxy": self.bilateral_sxy,
                "bilateral_srgb": self.bilateral_srgb, "bilateral_compat": self.bilateral_compat}


@dataclass
class AffNetConfig:
    width: float = 1.0  # ResNet-38 channel scale (1.0 = the real network; smaller for CPU runs)
    # ResNet-38 weights: a local .params (ImageNet, MXNet) or .pth (ImageNet, or a trained classifier
    # such as MCTformer's res38_cls.pth); null = random init
    weights: str | None = None
    feature_channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # f8_3, f8_4, f8_5
    freeze_bn: bool = True  # resnet38d: BatchNorm in eval mode, not trained
    freeze_stem: bool = True  # resnet38d: conv1a, b2, b2_1, b2_2 not trained


@dataclass
class AffTrainConfig:
    epochs: int = 8  # train_aff.py --max_epoches
    batch_size: int = 8
    crop_size: int = 448
    radius: int = 5  # VOC12AffDataset(radius=5)
    lr: float = 0.1
    new_layer_lr_mult: float = 10.0  # from_scratch_layers (f8_3, f8_4, f8_5, f9) at 10 x lr
    weight_decay: float = 5e-4  # --wt_dec
    # PolyOptimizer passes weight_decay where torch's SGD takes momentum (tool/torchutils.py): PSA trains
    # with momentum = wt_dec. Kept as PSA runs it.
    momentum: float = 5e-4
    poly_power: float = 0.9
    color_jitter: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])  # brightness..hue
    hflip: bool = True
    seed: int = 0
    workers: int = 0  # DataLoader processes


@dataclass
class PSAWalkConfig:
    radius: int = 5  # resnet38_aff.py: pairs within radius 5
    beta: float = 8.0  # infer_aff.py --beta
    logt: int = 8  # --logt: the walk runs 2^logt steps
    # background plane walked with the CAMs: "power" = (1 - max cam)^alpha (PSA), "constant" = bg_threshold
    # (MCTformer's infer_aff.py)
    background: str = "power"
    alpha: float = 16.0  # PSA --alpha
    bg_threshold: float = 0.39  # MCTformer --bg_thr


@dataclass
class PSAConfig:
    name: str = "psa"
    device: str = "cpu"
    aff_label: AffLabelConfig = field(default_factory=AffLabelConfig)
    net: AffNetConfig = field(default_factory=AffNetConfig)
    train: AffTrainConfig = field(default_factory=AffTrainConfig)
    walk: PSAWalkConfig = field(default_factory=PSAWalkConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Hash of what decides the trained AffinityNet (label, net and train settings)."""
        d = {k: self.to_dict()[k] for k in ("aff_label", "net", "train")}
        d["aff_label"].pop("workers")
        d["train"].pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_psa_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PSAConfig:
    """PSA defaults, then the YAML at ``path`` (if any), then ``a.b=value`` overrides."""
    cfg = fill_config(PSAConfig(), path, overrides, what="PSA config")
    if cfg.aff_label.low_alpha > cfg.aff_label.high_alpha:
        raise ConfigError(f"aff_label.low_alpha {cfg.aff_label.low_alpha} must not exceed "
                          f"aff_label.high_alpha {cfg.aff_label.high_alpha}")
    if cfg.train.crop_size % FEATURE_STRIDE:
        raise ConfigError(f"train.crop_size must be a multiple of {FEATURE_STRIDE}, got {cfg.train.crop_size}")
    side, r = cfg.train.crop_size // FEATURE_STRIDE, cfg.train.radius - 1
    if side < 2 * r + 1:
        raise ConfigError(f"train.crop_size {cfg.train.crop_size} is too small for PSA's pairs of radius "
                          f"{cfg.train.radius}: it needs at least {FEATURE_STRIDE * (2 * r + 1)} px")
    if cfg.walk.background not in ("power", "constant"):
        raise ConfigError(f"walk.background must be 'power' or 'constant', got {cfg.walk.background!r}")
    if len(cfg.net.feature_channels) != 3:
        raise ConfigError(f"net.feature_channels must list 3 widths (conv4, conv5, conv6), "
                          f"got {cfg.net.feature_channels}")
    if len(cfg.train.color_jitter) != 4:
        raise ConfigError(f"train.color_jitter must be [brightness, contrast, saturation, hue], "
                          f"got {cfg.train.color_jitter}")
    return cfg


def save_psa_config(cfg: PSAConfig, path: str | Path) -> Path:
    from fsae.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
