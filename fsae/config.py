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
    # Training crops: "fsae" (fsae.augment.random_geometry) | "timm" (timm's create_transform at crop_size,
    # with auto_augment / re_prob; fsae.augment.timm_train_view). MCTformer's recipe uses "timm".
    transform: str = "fsae"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # "timm" only
    re_prob: float = 0.25  # "timm" only: random erasing probability


@dataclass
class SIPEConfig:
    """SIPE (fsae/methods/sipe.py): hierarchical features of a timm ResNet, prototypes, IS-CAM."""

    side_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 256])  # 1x1 side convs
    channels: list[int] | None = None  # timm ResNet stage widths (None: the model's own; small for tests)
    freeze_bn: bool = True  # BatchNorm in eval mode (SIPE's FixedBatchNorm)
    freeze_low_stages: bool = True  # stem, stage 1 and 2 get no gradient (SIPE detaches stage 2's output)
    score_map: str = "cam"  # FSAE's S: "cam" (CAM with 1 - max background) | "is_cam"


@dataclass
class MCTConfig:
    """MCTformer V2 (fsae/methods/mctformer.py): timm ViT with C class tokens."""

    img_size: int = 224  # training input size (patch position grid)
    embed_dim: int | None = None  # None: the timm model's own (small values for tests)
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.1
    attention_layers: int = 3  # class-to-patch attention summed over the last n layers at inference
    patch_refine: bool = True  # patch-to-patch affinity refinement of the fused CAM at inference


@dataclass
class ResNet38Config:
    """The wide ResNet-38 backbone (``model.backbone: resnet38``, fsae/models/resnet38.py)."""

    width: float = 1.0  # channel multiplier: 1.0 is the real network (the only width the ImageNet weights fit)
    freeze_bn: bool = True  # BatchNorm in eval mode, affine not trained (PSA/SEAM/EPS/PPC)
    freeze_stem: bool = True  # conv1a, b2, b2_1, b2_2 not trained (SEAM/PPC)


@dataclass
class EPSConfig:
    """EPS saliency loss (fsae/methods/eps.py; Lee et al., CVPR 2021)."""

    tau: float = 0.4  # overlap ratio above which a class's CAM counts as foreground (authors' scripts: 0.4)
    alpha: float = 0.5  # blend of the foreground map and the inverted background map (COCO: 0.9)


@dataclass
class PPCConfig:
    """Pixel-to-prototype contrast and SEAM terms (fsae/methods/ppc.py; Du et al., CVPR 2022)."""

    view_size: int = 128  # second view: the crop resized bilinearly to view_size x view_size
    proj_dim: int = 128  # projection head output channels
    temperature: float = 0.1
    contrast_weight: float = 0.1  # gamma: weight of each of the three contrast terms
    bg_score: float = 0.10  # background score of the pseudo-labels for the contrast
    prototype_divisor: int = 16  # prototypes from the top h*w/16 pixels of each channel
    ecr_fraction: float = 0.2  # ECR on the top 20% of pixels
    min_pool_fraction: float = 0.25  # adaptive min-pooling on the lowest h*w/4 pixels
    pcm_dims: list[int] = field(default_factory=lambda: [64, 128])  # PCM 1x1 projections of conv4, conv5


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
    sipe: SIPEConfig = field(default_factory=SIPEConfig)  # method "sipe" only (fsae/methods/sipe.py)
    mct: MCTConfig = field(default_factory=MCTConfig)  # method "mctformer" only (fsae/methods/mctformer.py)
    resnet38: ResNet38Config = field(default_factory=ResNet38Config)  # backbone "resnet38" only
    eps: EPSConfig = field(default_factory=EPSConfig)  # methods "eps" and "ppc" (fsae/methods/eps.py)
    ppc: PPCConfig = field(default_factory=PPCConfig)  # method "ppc" only (fsae/methods/ppc.py)


@dataclass
class OptimConfig:
    name: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    poly_power: float = 0.9
    new_layer_lr_mult: float = 10.0  # the usual 10x LR on layers trained from scratch (the classifier)
    grad_clip: float | None = None
    schedule: str = "poly"  # poly | cosine (fsae.train.learning_rate)
    warmup_epochs: float = 0.0  # linear warm-up from warmup_lr to lr
    warmup_lr: float = 0.0
    min_lr: float = 0.0  # cosine only: the final learning rate


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
    # The FSAE authors' code (obeychoi0120/wseg, branch ssl) where it differs from the paper. The defaults
    # are the paper's; configs/{voc,coco}/ppc_eps_fsae_authors.yaml set the authors' values (file:line there).
    strong_replacement: bool = False  # strong ops drawn with replacement (an op may repeat)
    enhance_range: list[float] = field(default_factory=lambda: [0.05, 1.95])  # Brightness/Color/Contrast/Sharpness
    posterize_bits: list[int] = field(default_factory=lambda: [4, 8])  # integer bits, both ends included
    blur_kernel: str = "sigma"  # sigma: kernel from each image's sigma | per_run: one of 1/3/5 for the run
    strong_source: str = "weak"  # weak: x_t = A_s(x_s) | original: A_s of the crop with its own colour jitter
    loss_form: str = "union"  # union: eq. 9 on M u M_bdry | two_term: mean(CE M) + weight * mean(CE M_bdry)
    mask_padding: bool = True  # remove crop padding from the FSAE mask


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
    tensorboard: bool = True  # also log the metrics.csv / epochs.csv rows to RUN_DIR/tb/ (TensorBoard events)
    # Several processes (torchrun, docs/distributed.md): batch_size is the GLOBAL batch, split evenly.
    sync_bn: bool = False  # SyncBatchNorm (CUDA only): BN statistics over the global batch when per-GPU batches are small
    checkpoint_every: int = 0  # also save checkpoints/last.pt every N steps mid-epoch (0 = at epoch ends only)
    skip_nonfinite: bool = False  # a NaN/Inf loss skips the update (counted in metrics.csv "skipped") instead of stopping


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    batch_size: int = 4  # same-size images batched per scale; 4 is fastest on CPU (benchmarks/results.md), raise on GPU
    split: str = "train"  # the paper evaluates seeds on the train set
    # Protocol (fsae/protocol.py; None = the method's own repository's): resize pil_bicubic | bilinear,
    # upsample strided_up | direct, normalise max | minmax.
    resize: str | None = None
    upsample: str | None = None
    normalise: str | None = None


@dataclass
class EvalConfig:
    # Protocol (fsae/protocol.py; None = the method's own repository's): the background threshold, the sweep
    # [start, stop, step], mode fixed | sweep | first_drop | argmax, the split whose ids are scored, and the
    # CRF pseudo-masks' background form threshold | own | power with its power and CRF iterations.
    threshold: float | None = None
    sweep: list[float] | None = None
    mode: str | None = None
    split: str | None = None
    background: str | None = None
    bg_power: float | None = None
    crf_iterations: int | None = None


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


def fill_config(cfg: Any, path: str | Path | None = None, overrides: list[str] | None = None,
                what: str = "config") -> Any:
    """Apply the recipe YAML at ``path`` (if any), then ``overrides``, to the dataclass ``cfg`` (any of the
    project's settings dataclasses: ``Config``, ``SegConfig``, ``IRNConfig``). A ``name`` field not set
    by the file becomes the file's stem."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: {what} file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {what} sections")
        _apply(cfg, data, str(path))
        if "name" not in data and any(f.name == "name" for f in fields(cfg)):
            cfg.name = path.stem
    apply_overrides(cfg, overrides or [])
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe YAML at ``path`` (if any), then ``overrides``."""
    return fill_config(Config(), path, overrides)


def config_from_dict(data: dict[str, Any], where: str = "checkpoint") -> Config:
    cfg = Config()
    _apply(cfg, data, where)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    from fsae.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
