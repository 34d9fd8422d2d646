"""PSA settings: one dataclass per step, defaults of PSA itself (github.com/jiwoon-ahn/psa).

MCTformer runs PSA with other values (``configs/voc/psa.yaml``: its ``main.py`` alphas, its copy of
``psa/train_aff.py`` and ``psa/infer_aff.py``). A recipe YAML overrides fields; ``--set walk.logt=6`` on
the CLI (``fsae.settings.fill_config``). The resolved config is saved next to the AffinityNet checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from fsae.settings import Settings, at_least, fill_config, fraction, positive, setting
from fsae.errors import ConfigError
from fsae.refine.crf import PSA_CRF, CrfParams

FEATURE_STRIDE = 8  # ResNet-38's output stride: affinities live on the stride-8 grid


@dataclass
class AffLabelConfig:
    low_alpha: float = positive(4.0)  # infer_cls.py --low_alpha: bg = (1 - max cam)^4, a high bg -> confident fg
    high_alpha: float = positive(32.0)  # --high_alpha: bg = (1 - max cam)^32, a low bg -> confident bg
    # tool/imutils.py crf_inference: t=10, Gaussian 3/3, bilateral 80/13/10
    crf: CrfParams = field(default_factory=lambda: replace(PSA_CRF))
    workers: int | None = at_least(1, None)  # processes for the CRF (None = all cores)

    def crf_params(self) -> dict[str, Any]:
        return self.crf.kwargs()


@dataclass
class AffNetConfig:
    width: float = positive(1.0)  # ResNet-38 channel scale (1.0 = the real network; smaller for CPU runs)
    # ResNet-38 weights: a local .params (ImageNet, MXNet) or .pth (ImageNet, or a trained classifier
    # such as MCTformer's res38_cls.pth); null = random init
    weights: str | None = None
    feature_channels: list[int] = setting(factory=lambda: [64, 128, 256], low=1, length=3)  # f8_3, f8_4, f8_5
    freeze_bn: bool = True  # resnet38d: BatchNorm in eval mode, not trained
    freeze_stem: bool = True  # resnet38d: conv1a, b2, b2_1, b2_2 not trained


@dataclass
class AffTrainConfig:
    epochs: int = at_least(1, 8)  # train_aff.py --max_epoches
    batch_size: int = at_least(1, 8)
    crop_size: int = at_least(FEATURE_STRIDE, 448)
    radius: int = at_least(1, 5)  # VOC12AffDataset(radius=5)
    lr: float = positive(0.1)
    new_layer_lr_mult: float = positive(10.0)  # from_scratch_layers (f8_3, f8_4, f8_5, f9) at 10 x lr
    weight_decay: float = at_least(0, 5e-4)  # --wt_dec
    # PolyOptimizer passes weight_decay where torch's SGD takes momentum (tool/torchutils.py): PSA trains
    # with momentum = wt_dec. Kept as PSA runs it.
    momentum: float = fraction(5e-4, high_open=True)
    poly_power: float = at_least(0, 0.9)
    color_jitter: list[float] = setting(factory=lambda: [0.3, 0.3, 0.3, 0.1], low=0, length=4)  # brightness..hue
    hflip: bool = True
    seed: int = at_least(0, 0)
    workers: int = at_least(0, 0)  # DataLoader processes
    prefetch: int = at_least(1, 2)  # batches each loader worker prepares ahead (workers > 0; torch's default)
    # Speed (fsae.speed.mixed_forward): autocast dtype of AffinityNet's forward (affinities and loss stay fp32;
    # fp16 adds a GradScaler) and channels-last memory format. The recipes keep fp32.
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = False


@dataclass
class PSAWalkConfig:
    radius: int = at_least(1, 5)  # resnet38_aff.py: pairs within radius 5
    beta: float = positive(8.0)  # infer_aff.py --beta
    logt: int = at_least(0, 8)  # --logt: the walk runs 2^logt steps
    # background plane walked with the CAMs: "power" = (1 - max cam)^alpha (PSA), "constant" = bg_threshold
    # (MCTformer's infer_aff.py)
    background: str = setting("power", choices=("power", "constant"))
    alpha: float = positive(16.0)  # PSA --alpha
    bg_threshold: float = fraction(0.39)  # MCTformer --bg_thr
    # autocast dtype of AffinityNet's pass before the walk (the walk itself stays fp32)
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))


@dataclass
class PSAConfig(Settings):
    name: str = "psa"
    device: str = "cpu"  # checked against the machine when the stage starts (check_device)
    aff_label: AffLabelConfig = field(default_factory=AffLabelConfig)
    net: AffNetConfig = field(default_factory=AffNetConfig)
    train: AffTrainConfig = field(default_factory=AffTrainConfig)
    walk: PSAWalkConfig = field(default_factory=PSAWalkConfig)

    # Not deciding the AffinityNet: the name, device, worker counts and prefetch, the memory format (float rounding
    # only), and the random walk (it runs after training).
    not_hashed: ClassVar[tuple[str, ...]] = ("name", "device", "aff_label.workers", "train.workers", "train.prefetch",
                                             "train.channels_last", "walk")
    hashed_unless_default: ClassVar[tuple[str, ...]] = ("train.precision",)  # runs before it trained in fp32

    def check(self) -> None:
        if self.aff_label.low_alpha > self.aff_label.high_alpha:
            raise ConfigError(f"aff_label.low_alpha {self.aff_label.low_alpha} must not exceed "
                              f"aff_label.high_alpha {self.aff_label.high_alpha}")
        if self.train.crop_size % FEATURE_STRIDE:
            raise ConfigError(f"train.crop_size must be a multiple of {FEATURE_STRIDE}, got {self.train.crop_size}")
        side, r = self.train.crop_size // FEATURE_STRIDE, self.train.radius - 1
        if side < 2 * r + 1:
            raise ConfigError(f"train.crop_size {self.train.crop_size} is too small for PSA's pairs of radius "
                              f"{self.train.radius}: it needs at least {FEATURE_STRIDE * (2 * r + 1)} px")


def load_psa_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PSAConfig:
    """PSA defaults, then the YAML at ``path`` (if any), then ``a.b=value`` overrides; every value checked."""
    return fill_config(PSAConfig(), path, overrides, what="PSA config")
