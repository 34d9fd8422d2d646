"""Configuration: dataclasses with the paper's defaults; a recipe YAML overrides fields.

A recipe file (``configs/**.yaml``) is a nested mapping whose keys are these dataclasses' fields::

    data: {root: data/synthetic, num_classes: 4}
    fsae: {enabled: true}

``--set fsae.tau_fae=0.9`` style overrides apply on top (values parsed as YAML). Unknown keys are an
error naming the file (or override) and the key.

One machinery serves every stage's settings (``Config`` here, ``fsae.segment.config.SegConfig``,
``fsae.refine.irn.config.IRNConfig``):

- each field declares its allowed values once, with ``setting(default, ...)`` (a range, choices, a list
  length); the type comes from the annotation. Every value set from a file, an override or a saved dict is
  checked; an error names the source, the field, the value and what is allowed;
- a root config (a ``Settings`` subclass) has ``from_dict``, ``to_dict``, ``save`` and ``hash``: the hash of
  every field except those in its ``not_hashed`` tuple, the fields that do not decide the output
  (logging, devices, worker counts, where the data lies, inference and evaluation settings);
- ``changes(old, new)`` lists the deciding fields that differ (resume refusals name them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from fsae.errors import ConfigError

# --------------------------------------------------------------------------------- allowed values


@dataclass(frozen=True)
class Rule:
    """What a field allows besides its type: ``choices``, or a range ``low..high`` (each end open or
    closed; for a list, every item), and for a list its ``length`` (exact) or ``nonempty``."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    length: int | None = None
    nonempty: bool = False
    words: tuple | None = None  # strings allowed besides the numbers, e.g. ("auto",)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, list):
            if (self.length is not None and len(value) != self.length) or (self.nonempty and not value):
                return False
            return all(self._item_ok(v) for v in value)
        return self._item_ok(value)

    def _item_ok(self, v: Any) -> bool:
        if self.choices is not None and v not in self.choices:
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if bounds:
            parts.append(" and ".join(bounds))
        if self.length is not None:
            parts.append(f"{self.length} items")
        elif self.nonempty:
            parts.append("at least one item")
        if self.words:
            parts.append("or " + " or ".join(self.words))
        return ", ".join(parts)


def setting(default: Any = MISSING, *, factory: Any = MISSING, choices=None, low=None, high=None,
            low_open: bool = False, high_open: bool = False, length: int | None = None,
            nonempty: bool = False, words=None) -> Any:
    """A dataclass field with its allowed values (``Rule``); ``factory`` for list defaults; ``words``: strings
    allowed besides the numbers (``infer.batch_size: auto``)."""
    rule = Rule(tuple(choices) if choices is not None else None, low, high, low_open, high_open, length, nonempty,
                tuple(words) if words is not None else None)
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def positive(default: Any) -> Any:
    return setting(default, low=0, low_open=True)


def at_least(bound: float, default: Any) -> Any:
    return setting(default, low=bound)


def fraction(default: Any, low_open: bool = False, high_open: bool = False) -> Any:
    """A value in [0, 1] (ends open as asked)."""
    return setting(default, low=0, high=1, low_open=low_open, high_open=high_open)


def _kinds(annotation: Any) -> tuple[str, bool]:
    """``"list[int] | None"`` -> (``"list[int]"``, optional)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    base = [p for p in parts if p != "None"]
    return (base[0] if base else "None"), optional


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _coerce_scalar(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (int, float, bool, str), or raise ValueError. YAML reads ``1e-4`` as a string and
    ``1`` as an int: those become floats; a fractional number is not an int; only true/false are booleans."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if kind == "float":
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            out = float(value.strip())
        else:
            raise ValueError
        if not math.isfinite(out):
            raise ValueError
        return out
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)  # a split or folder named 2012
        raise ValueError
    return value


def check_value(value: Any, f: dataclasses.Field, name: str) -> Any:
    """``value`` converted to field ``f``'s type and checked against its rule; ConfigError naming ``name``,
    the value and what is allowed."""
    kind, optional = _kinds(f.type)
    rule: Rule | None = f.metadata.get("rule")
    allowed = rule.describe() if rule else ""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} = null is not allowed; expected {_describe(kind, allowed)}")
    if rule is not None and rule.words and value in rule.words:
        return value
    refusal = ConfigError(f"{name} = {value!r} is not allowed; expected {_describe(kind, allowed)}")
    try:
        if kind.startswith("list["):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            converted = [_coerce_scalar(v, kind[5:-1]) for v in value]
        else:
            converted = _coerce_scalar(value, kind)
    except ValueError:
        raise refusal from None
    if rule is not None and not rule.accepts(converted):
        raise refusal
    return converted


def _describe(kind: str, allowed: str) -> str:
    if kind.startswith("list["):
        what = f"a list of {_TYPE_WORDS.get(kind[5:-1], kind[5:-1]).split(' ', 1)[-1]}s"
    else:
        what = _TYPE_WORDS.get(kind, kind)
    return f"{what} ({allowed})" if allowed else what


def check_sweep(sweep, name: str = "eval.sweep") -> None:
    """A threshold sweep ``[start, stop, step]``: step > 0 and start <= stop."""
    start, stop, step = sweep
    if not (step > 0 and start <= stop):
        raise ConfigError(f"{name} = {list(sweep)} is not allowed; expected START STOP STEP with step > 0 and "
                          f"start <= stop, e.g. 0 0.6 0.01")


def check_range_pair(pair, name: str) -> None:
    """``[low, high]`` with low <= high."""
    if pair is not None and pair[0] > pair[1]:
        raise ConfigError(f"{name} = {list(pair)} is not allowed; expected [low, high] with low <= high")


def check_device(device: str, name: str = "device") -> str:
    """A torch device string that this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``. ConfigError
    otherwise (imports torch)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name} = {device!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{name} = {device!r}: this machine has no CUDA GPU (torch sees none); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{name} = {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{name} = {device!r}: this machine has no Apple MPS device; use cpu")
    elif parsed.type != "cpu":
        raise ConfigError(f"{name} = {device!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return device


# --------------------------------------------------------------------------------- the machinery


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class Settings:
    """Base of a stage's root config: ``from_dict``, ``to_dict``, ``save``, ``hash`` and ``check``.

    ``not_hashed``: dotted field names (or whole sections) that do not decide the stage's output; all other
    fields go into ``hash()``, which checkpoints store so that a resume refuses another config.
    """

    not_hashed: ClassVar[tuple[str, ...]] = ()
    # Fields added after runs were written, hashed only when off their default, so that those runs' checkpoints
    # still resume (e.g. train.precision: they were trained in fp32).
    hashed_unless_default: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hashed_fields(self) -> dict[str, Any]:
        """``{dotted name: value}`` of the fields that decide the output."""
        defaults = _flat(type(self)().to_dict()) if self.hashed_unless_default else {}
        return {k: v for k, v in _flat(self.to_dict()).items() if not _excluded(k, self.not_hashed)
                and not (k in self.hashed_unless_default and v == defaults[k])}

    def hash(self) -> str:
        text = json.dumps(self.hashed_fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "checkpoint"):
        """A config from a (saved) nested dict, every value checked; ConfigError naming ``where``."""
        cfg = cls()
        _apply(cfg, data, where)
        validate(cfg, where)
        return cfg

    def save(self, path: str | Path) -> Path:
        from fsae.io import write_text

        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def check(self) -> None:
        """Rules between fields (a subclass adds its own); ConfigError naming the fields."""


def _excluded(name: str, not_hashed: tuple[str, ...]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in not_hashed)


def changes(old: Settings, new: Settings, hashed_only: bool = True, within: str = "") -> list[str]:
    """The fields where two configs differ, ``"train.epochs 3 -> 4"``, sorted; with ``hashed_only`` only
    those that decide the output (those that make ``hash()`` differ); ``within`` a section, e.g. ``"model"``."""
    if hashed_only:
        a, b = old.hashed_fields(), new.hashed_fields()
    else:
        a, b = _flat(old.to_dict()), _flat(new.to_dict())
    names = [k for k in sorted(set(a) | set(b)) if not within or _excluded(k, (within,))]
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in names if a.get(k) != b.get(k)]


def describe_changes(old: Settings, new: Settings, limit: int = 8, hashed_only: bool = True,
                     within: str = "") -> str:
    """``changes`` as one line: ``"fsae.tau_fae 0.95 -> 0.9, train.epochs 15 -> 4"``, at most ``limit``."""
    changed = changes(old, new, hashed_only, within)
    return ", ".join(changed[:limit]) + (f", ... ({len(changed)} fields)" if len(changed) > limit else "")


def validate(cfg: Any, where: str = "config") -> Any:
    """Check every field of ``cfg`` (types, ranges, choices) and the rules between fields (``check``)."""

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                try:
                    setattr(obj, f.name, check_value(value, f, f"{prefix}{f.name}"))
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None

    walk(cfg, "")
    if isinstance(cfg, Settings):
        try:
            cfg.check()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cfg


# Fields removed from the recipes, with the one value that stayed (docs/decisions.md): a config saved
# before the removal (a run's config.yaml, a checkpoint) that holds that value still loads.
REMOVED_KEYS = {"model.background": "constant", "model.sipe.score_map": "cam"}


def _apply(obj: Any, updates: dict[str, Any], where: str, prefix: str = "") -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in updates.items():
        if f"{prefix}{key}" in REMOVED_KEYS:
            kept = REMOVED_KEYS[f"{prefix}{key}"]
            if value == kept:
                continue
            raise ConfigError(f"{where}: '{prefix}{key}: {value}' was removed; only {kept!r} remains "
                              "(docs/decisions.md): delete the key")
        if key not in known:
            raise ConfigError(f"{where}: unknown config key '{prefix}{key}' (known: {', '.join(known)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{key}' must be a mapping, got {value!r}")
            _apply(current, value, where, f"{prefix}{key}.")
        else:
            try:
                setattr(obj, key, check_value(value, known[key], f"{prefix}{key}"))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``a.b=value`` strings (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. fsae.enabled=true")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
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
    project's settings dataclasses: ``Config``, ``SegConfig``, ``IRNConfig``), then check every value. A
    ``name`` field not set by the file becomes the file's stem."""
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
    return validate(cfg, str(path) if path is not None else "config")


# --------------------------------------------------------------------------------- CAM training

METHODS = ("cam", "eps", "ppc", "sipe", "mctformer")  # fsae.methods.build_method


@dataclass
class DataConfig:
    kind: str = setting("voc", choices=("voc", "coco"))  # the synthetic set uses the voc layout
    root: str = "data/synthetic"
    num_classes: int = at_least(1, 4)
    train_split: str = "train"
    val_split: str = "val"  # held-out split for per-epoch seed mIoU ("" = none)
    mask_dir: str | None = "SegmentationClass"  # GT masks below root (null: none)
    label_file: str | None = None  # default: <root>/cls_labels.json
    saliency_dir: str | None = None
    long_side: list[int] | None = setting(None, low=1, length=2)  # random long-side resize range, e.g. [448, 768]
    crop_size: int | None = at_least(1, 128)
    hflip: bool = True
    jitter: list[float] | None = setting(factory=lambda: [0.3, 0.3, 0.3, 0.1], low=0, length=4)  # weak view A_w
    workers: int = at_least(0, 0)
    prefetch: int = at_least(1, 2)  # batches each loader worker prepares ahead (workers > 0; torch's default)
    # Training crops: "fsae" (fsae.augment.random_geometry) | "timm" (timm's create_transform at crop_size,
    # with auto_augment / re_prob; fsae.augment.timm_train_view). MCTformer's recipe uses "timm".
    transform: str = setting("fsae", choices=("fsae", "timm"))
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # "timm" only
    re_prob: float = fraction(0.25)  # "timm" only: random erasing probability


@dataclass
class SIPEConfig:
    """SIPE (fsae/methods/sipe.py): hierarchical features of a timm ResNet, prototypes, IS-CAM."""

    side_channels: list[int] = setting(factory=lambda: [128, 128, 256, 256], low=1, length=4)  # 1x1 side convs
    channels: list[int] | None = setting(None, low=1, length=4)  # timm ResNet stage widths (None: the model's own)
    freeze_bn: bool = True  # BatchNorm in eval mode (SIPE's FixedBatchNorm)
    freeze_low_stages: bool = True  # stem, stage 1 and 2 get no gradient (SIPE detaches stage 2's output)


@dataclass
class CAMConfig:
    """The plain CAM's backbone training (fsae/methods/cam.py); the VOC / COCO recipes set IRN's (true)."""

    freeze_bn: bool = False  # BatchNorm in eval mode (IRN's FixedBatchNorm, net/resnet50.py:11-14)
    freeze_low_stages: bool = False  # stem, stage 1 and 2 get no gradient (IRN net/resnet50_cam.py:28, 39-43)


@dataclass
class MCTConfig:
    """MCTformer V2 (fsae/methods/mctformer.py): timm ViT with C class tokens."""

    img_size: int = at_least(1, 224)  # training input size (patch position grid)
    embed_dim: int | None = at_least(1, None)  # None: the timm model's own (small values for tests)
    depth: int | None = at_least(1, None)
    num_heads: int | None = at_least(1, None)
    drop_path: float = fraction(0.1, high_open=True)
    attention_layers: int = at_least(1, 3)  # class-to-patch attention summed over the last n layers at inference
    patch_refine: bool = True  # patch-to-patch affinity refinement of the fused CAM at inference


@dataclass
class ResNet38Config:
    """The wide ResNet-38 backbone (``model.backbone: resnet38``, fsae/models/resnet38.py)."""

    width: float = positive(1.0)  # channel multiplier: 1.0 is the real network (the only width the ImageNet weights fit)
    freeze_bn: bool = True  # BatchNorm in eval mode, affine not trained (PSA/SEAM/EPS/PPC)
    freeze_stem: bool = True  # conv1a, b2, b2_1, b2_2 not trained (SEAM/PPC)


@dataclass
class EPSConfig:
    """EPS saliency loss (fsae/methods/eps.py; Lee et al., CVPR 2021)."""

    tau: float = fraction(0.4)  # overlap ratio above which a class's CAM counts as foreground (authors' scripts: 0.4)
    alpha: float = fraction(0.5)  # blend of the foreground map and the inverted background map (COCO: 0.9)


@dataclass
class PPCConfig:
    """Pixel-to-prototype contrast and SEAM terms (fsae/methods/ppc.py; Du et al., CVPR 2022)."""

    view_size: int = at_least(1, 128)  # second view: the crop resized bilinearly to view_size x view_size
    proj_dim: int = at_least(1, 128)  # projection head output channels
    temperature: float = positive(0.1)
    contrast_weight: float = at_least(0, 0.1)  # gamma: weight of each of the three contrast terms
    bg_score: float = fraction(0.10)  # background score of the pseudo-labels for the contrast
    prototype_divisor: int = at_least(1, 16)  # prototypes from the top h*w/16 pixels of each channel
    ecr_fraction: float = fraction(0.2, low_open=True)  # ECR on the top 20% of pixels
    min_pool_fraction: float = fraction(0.25, low_open=True)  # adaptive min-pooling on the lowest h*w/4 pixels
    pcm_dims: list[int] = setting(factory=lambda: [64, 128], low=1, length=2)  # PCM 1x1 projections of conv4, conv5


@dataclass
class ModelConfig:
    method: str = setting("cam", choices=METHODS)
    backbone: str = "tinycnn"  # a name of fsae.models.backbones.BACKBONES, torchvision:<resnet> or a timm model
    output_stride: int = setting(8, choices=(4, 8, 16, 32))
    weights: str | None = None  # local path | "timm" | "efficientnet-lite0-package"
    width: int = at_least(1, 32)  # tinycnn only
    depth: int = at_least(1, 6)  # tinycnn only
    score_scale: float = positive(10.0)  # method "sipe": FSAE's S = score_scale * norm_cam (fsae/methods/sipe.py)
    # methods "cam" and "mctformer": the fixed background logit of FSAE's S = [cams, b] (fsae/methods/cam.py)
    background_logit: float = 5.0
    sipe: SIPEConfig = field(default_factory=SIPEConfig)  # method "sipe" only (fsae/methods/sipe.py)
    cam: CAMConfig = field(default_factory=CAMConfig)  # method "cam" only (fsae/methods/cam.py)
    mct: MCTConfig = field(default_factory=MCTConfig)  # method "mctformer" only (fsae/methods/mctformer.py)
    resnet38: ResNet38Config = field(default_factory=ResNet38Config)  # backbone "resnet38" only
    eps: EPSConfig = field(default_factory=EPSConfig)  # methods "eps" and "ppc" (fsae/methods/eps.py)
    ppc: PPCConfig = field(default_factory=PPCConfig)  # method "ppc" only (fsae/methods/ppc.py)


@dataclass
class OptimConfig:
    name: str = setting("adam", choices=("sgd", "adam", "adamw"))
    lr: float = positive(1e-3)
    weight_decay: float = at_least(0, 1e-4)
    momentum: float = fraction(0.9, high_open=True)  # sgd only
    poly_power: float = at_least(0, 0.9)
    new_layer_lr_mult: float = positive(10.0)  # the usual 10x LR on layers trained from scratch (the classifier)
    grad_clip: float | None = positive(None)
    schedule: str = setting("poly", choices=("poly", "cosine"))  # fsae.train.learning_rate
    warmup_epochs: float = at_least(0, 0.0)  # linear warm-up from warmup_lr to lr
    warmup_lr: float = at_least(0, 0.0)
    min_lr: float = at_least(0, 0.0)  # cosine only: the final learning rate
    # update: the schedule moves every step | epoch: once per epoch, as timm's scheduler.step(epoch) after each epoch
    # (MCTformer main.py:297: epoch e trains at the schedule's value of e - 1, epochs 0 and 1 alike)
    lr_step: str = setting("update", choices=("update", "epoch"))


@dataclass
class FSAEConfig:
    enabled: bool = False
    weight: float = at_least(0, 1.0)  # lambda, eq. 9
    tau_fae: float = fraction(0.95)  # eq. 6
    tau_sae: float = fraction(0.8)  # eq. 7
    kernel_size: int = at_least(1, 3)  # k of the SAE dilation, eq. 7 (odd)
    use_sae: bool = True
    start_epoch: int = at_least(0, 0)  # FSAE term is exactly zero before this epoch
    # reuse (weak view's own output, detached) | separate (extra no-grad pass) | ema
    teacher: str = setting("reuse", choices=("reuse", "separate", "ema"))
    ema_decay: float = fraction(0.999)
    # the EMA teacher's layers: eval | train (dropout on, as the authors swap the EMA weights into the model in
    # train mode: obeychoi0120/wseg ssl module/train.py:355-361)
    ema_mode: str = setting("eval", choices=("eval", "train"))
    reduction: str = setting("mean", choices=("mean", "masked_mean"))  # mean over all B*H*W pixels | masked_mean
    strong_ops: int = at_least(0, 3)  # RandAugment colour ops per image
    blur: list[float] = setting(factory=lambda: [0.1, 2.0], low=0, length=2)  # Gaussian blur sigma range
    blur_prob: float = fraction(1.0)
    # The FSAE authors' code (obeychoi0120/wseg, branch ssl) where it differs from the paper. The defaults
    # are the paper's; configs/{voc,coco}/ppc_eps_fsae_authors.yaml set the authors' values (file:line there).
    strong_replacement: bool = False  # strong ops drawn with replacement (an op may repeat)
    # Brightness/Color/Contrast/Sharpness enhance factors
    enhance_range: list[float] = setting(factory=lambda: [0.05, 1.95], low=0, length=2)
    posterize_bits: list[int] = setting(factory=lambda: [4, 8], low=1, high=8, length=2)  # both ends included
    # sigma: kernel from each image's sigma | per_run: one of 1/3/5 for the run
    blur_kernel: str = setting("sigma", choices=("sigma", "per_run"))
    # weak: x_t = A_s(x_s) | original: A_s of the crop with its own colour jitter
    strong_source: str = setting("weak", choices=("weak", "original"))
    # union: eq. 9 on M u M_bdry | two_term: mean(CE M) + weight * mean(CE M_bdry)
    loss_form: str = setting("union", choices=("union", "two_term"))
    mask_padding: bool = True  # remove crop padding from the FSAE mask


@dataclass
class TrainConfig:
    epochs: int = at_least(1, 15)
    batch_size: int = at_least(1, 32)
    seed: int = at_least(0, 0)
    device: str = "cpu"  # checked against the machine when a stage starts (check_device)
    log_every: int = at_least(1, 10)  # steps between metrics.csv rows
    val_every: int = at_least(0, 1)  # epochs between held-out seed evaluations (0 = off)
    val_scales: list[float] = setting(factory=lambda: [1.0], low=0, low_open=True, nonempty=True)
    deterministic: bool = False
    tensorboard: bool = True  # also log the metrics.csv / epochs.csv rows to RUN_DIR/tb/ (TensorBoard events)
    # Several processes (torchrun, docs/distributed.md): batch_size is the GLOBAL batch, split evenly.
    sync_bn: bool = False  # SyncBatchNorm (CUDA only): BN statistics over the global batch when per-GPU batches are small
    checkpoint_every: int = at_least(0, 0)  # also save checkpoints/last.pt every N steps mid-epoch (0 = at epoch ends only)
    skip_nonfinite: bool = False  # a NaN/Inf loss skips the update (counted in metrics.csv "skipped") instead of stopping
    # Speed (fsae/two_view.py model_forward): autocast dtype of the forward passes (losses stay fp32; fp16 adds
    # a GradScaler), channels_last memory format for model and inputs, torch.compile of the forward model.
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = False
    compile: bool = False


@dataclass
class InferConfig:
    scales: list[float] = setting(factory=lambda: [0.5, 1.0, 1.5, 2.0], low=0, low_open=True, nonempty=True)
    flip: bool = True
    # same-size images batched per scale; auto: on CPU the fastest per image of 1, 2, 4, 8, 16 timed on the first
    # image, on CUDA the largest that fits half the free memory (fsae.infer.pick_batch_size). Seeds: the same up
    # to their last float16 bit (docs/precision.md)
    batch_size: int | str = setting(4, low=1, words=("auto",))
    split: str = "train"  # the paper evaluates seeds on the train set
    # Protocol (fsae/protocol.py; None = the method's own repository's)
    resize: str | None = setting(None, choices=("pil_bicubic", "bilinear"))
    upsample: str | None = setting(None, choices=("strided_up", "direct"))
    normalise: str | None = setting(None, choices=("max", "minmax"))
    # autocast dtype of the CAM forward passes (the sums over scales and the normalisation stay fp32)
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    # seed file storage (fsae.seeds): float16, or uint8 per class on the 0.005 threshold grid (smaller files)
    seed_dtype: str = setting("float16", choices=("float16", "uint8"))


@dataclass
class EvalConfig:
    # Protocol (fsae/protocol.py; None = the method's own repository's): the background threshold, the sweep
    # [start, stop, step], how the reported threshold is picked, the split whose ids are scored, and the
    # CRF pseudo-masks' background form with its power and CRF iterations.
    threshold: float | None = fraction(None)
    sweep: list[float] | None = setting(None, length=3)
    mode: str | None = setting(None, choices=("fixed", "sweep", "first_drop", "argmax"))
    split: str | None = None
    background: str | None = setting(None, choices=("threshold", "own", "power"))
    bg_power: float | None = positive(None)
    crf_iterations: int | None = at_least(1, None)
    # a named entry of fsae.protocol.PROTOCOLS to start from (None: model.method's), e.g. eps_wseg
    protocol: str | None = None


@dataclass
class Config(Settings):
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsae: FSAEConfig = field(default_factory=FSAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # Not deciding the trained weights: the name, where the data and its GT lie (moving them keeps a run
    # resumable), held-out evaluation, inference and evaluation settings, logging, device, loader processes,
    # memory format and compilation (like the device, they change float rounding only).
    not_hashed: ClassVar[tuple[str, ...]] = (
        "name", "data.root", "data.label_file", "data.saliency_dir", "data.mask_dir", "data.val_split",
        "data.workers", "data.prefetch", "train.device", "train.log_every", "train.tensorboard", "train.val_every",
        "train.val_scales", "train.checkpoint_every", "train.channels_last", "train.compile", "infer", "eval",
    )
    # Fields added after runs were written (those runs: EMA teacher in eval mode; the plain CAM's BN and low stages
    # trained; the LR moved every step)
    hashed_unless_default: ClassVar[tuple[str, ...]] = ("fsae.ema_mode", "model.cam.freeze_bn",
                                                        "model.cam.freeze_low_stages", "optim.lr_step")

    def check(self) -> None:
        check_range_pair(self.data.long_side, "data.long_side")
        check_range_pair(self.fsae.blur, "fsae.blur")
        if self.eval.sweep is not None:
            check_sweep(self.eval.sweep)
        check_range_pair(self.fsae.enhance_range, "fsae.enhance_range")
        check_range_pair(self.fsae.posterize_bits, "fsae.posterize_bits")
        if self.fsae.kernel_size % 2 != 1:
            raise ConfigError(f"fsae.kernel_size = {self.fsae.kernel_size} is not allowed; expected an odd integer")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe YAML at ``path`` (if any), then ``overrides``; every value checked."""
    return fill_config(Config(), path, overrides)


def config_from_dict(data: dict[str, Any], where: str = "checkpoint") -> Config:
    return Config.from_dict(data, where)


def save_config(cfg: Settings, path: str | Path) -> Path:
    return cfg.save(path)
