"""Configuration: one dataclass per concern, with the paper's defaults; a recipe YAML overrides fields.

A recipe file (``configs/**.yaml``) is a nested mapping whose keys are these dataclasses' fields::

    data: {root: data/synthetic, num_classes: 4}
    fsae: {enabled: true}

``--set fsae.tau_fae=0.9`` style overrides apply on top (values parsed as YAML). Unknown keys are an
error naming the file (or override) and the key. The resolved config is saved in the run directory and
its hash is stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fsae.errors import ConfigError


@dataclass
class DataConfig:
    kind: str = "voc"  # voc | coco (the synthetic set uses the voc layout)
    root: str = "data/synthetic"
    num_classes: int = 4
    train_split: str = "train"
    val_split: str = "val"  # held-out split for per-epoch seed mIoU ("" = none)
    mask_dir: str = "SegmentationClass"
    label_file: str | None = None  # default: <root>/cls_labels.json
    saliency_dir: str | None = None
    long_side: list[int] | None = None  # random long-side resize range, e.g. [448, 768]
    crop_size: int | None = 128
    hflip: bool = True
    jitter: list[float] | None = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.1])  # weak view A_w
    workers: int = 0


@dataclass
class ModelConfig:
    method: str = "cam"
    backbone: str = "tinycnn"
    output_stride: int = 8
    weights: str | None = None  # local path | "timm" | "efficientnet-lite0-package"
    width: int = 32  # tinycnn only
    depth: int = 6  # tinycnn only
    # Background channel of the plain CAM's (C+1)-channel score map: constant | sipe | learned (fsae/methods/cam.py)
    background: str = "constant"
    score_scale: float = 10.0  # "sipe": S = scale * [normalised CAMs, 1 - max]
    background_logit: float = 5.0  # "constant": fixed background logit


@dataclass
class OptimConfig:
    name: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    poly_power: float = 0.9
    new_layer_lr_mult: float = 10.0  # the usual 10x LR on layers trained from scratch (the classifier)
    grad_clip: float | None = None


@dataclass
class FSAEConfig:
    enabled: bool = False
    weight: float = 1.0  # lambda, eq. 9
    tau_fae: float = 0.95  # eq. 6
    tau_sae: float = 0.8  # eq. 7
    kernel_size: int = 3  # k of the SAE dilation, eq. 7
    use_sae: bool = True
    start_epoch: int = 0  # FSAE term is exactly zero before this epoch
    teacher: str = "reuse"  # reuse (weak view's own output, detached) | separate (extra no-grad pass) | ema
    ema_decay: float = 0.999
    reduction: str = "mean"  # mean over all B*H*W pixels (authors' code) | masked_mean
    strong_ops: int = 3  # RandAugment colour ops per image
    blur: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range
    blur_prob: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10  # steps between metrics.csv rows
    val_every: int = 1  # epochs between held-out seed evaluations (0 = off)
    val_scales: list[float] = field(default_factory=lambda: [1.0])
    deterministic: bool = False


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    batch_size: int = 4  # same-size images batched per scale; 4 is fastest on CPU (benchmarks/results.md), raise on GPU
    split: str = "train"  # the paper evaluates seeds on the train set


@dataclass
class EvalConfig:
    threshold: float = 0.25  # background threshold when no sweep is run
    sweep: list[float] = field(default_factory=lambda: [0.0, 0.60, 0.01])  # start, stop, step


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsae: FSAEConfig = field(default_factory=FSAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """Hash of everything that decides the trained weights' meaning (not the run name)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value: Any, annotation: str, what: str) -> Any:
    """YAML reads ``1e-4`` as a string and ``1`` as an int: convert to the field's number type."""
    kinds = str(annotation).replace(" ", "").split("|")
    if value is None or isinstance(value, bool):
        return value
    try:
        if "float" in kinds and isinstance(value, (int, str)):
            return float(value)
        if "int" in kinds and isinstance(value, str):
            return int(value)
    except ValueError as exc:
        raise ConfigError(f"{what} must be a number ({annotation}), got {value!r}") from exc
    return value


def _apply(obj: Any, updates: dict[str, Any], where: str, prefix: str = "") -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in updates.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown config key '{prefix}{key}' (known: {', '.join(known)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}' must be a mapping, got {value!r}")
            _apply(current, value, where, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, known[key].type, f"{where}: '{prefix}{key}'"))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=value`` strings (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. fsae.enabled=true")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _apply(cfg, nested, f"override {item!r}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe YAML at ``path`` (if any), then ``overrides``."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections")
        _apply(cfg, data, str(path))
        if "name" not in data:
            cfg.name = path.stem
    apply_overrides(cfg, overrides or [])
    return cfg


def config_from_dict(data: dict[str, Any], where: str = "checkpoint") -> Config:
    cfg = Config()
    _apply(cfg, data, where)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    from fsae.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
