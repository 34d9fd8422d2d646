"""IRN settings: one dataclass per step, IRN's defaults (``run_sample.py``, as SIPE's copy uses them).

A recipe YAML (``configs/*/irn.yaml``) overrides fields; ``--set train.epochs=1`` overrides on the CLI
(``fsae.config``'s machinery: every value checked, one hash of what decides the boundary network). The
resolved config is saved next to the IRN checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from fsae.settings import Settings, at_least, check_range_pair, fill_config, fraction, positive, setting
from fsae.errors import ConfigError
from fsae.refine.crf import IRN_LABEL_CRF, CrfParams


@dataclass
class IRLabelConfig:
    fg_threshold: float = fraction(0.30)  # conf_fg_thres: background score for the confident foreground
    bg_threshold: float = fraction(0.05)  # conf_bg_thres: background score for the confident background
    gt_prob: float = fraction(0.7, low_open=True, high_open=True)  # CRF unary: probability of the given label
    crf: CrfParams = field(default_factory=lambda: replace(IRN_LABEL_CRF))  # crf_inference_label's kernels
    workers: int | None = at_least(1, None)  # processes for the CRF (None = all cores)

    def crf_params(self) -> dict[str, Any]:
        return self.crf.kwargs()


@dataclass
class IRNNetConfig:
    backbone: str = "resnet50"  # torchvision ResNet name (checked when built)
    weights: str | None = None  # local state-dict path | "torchvision" (download) | null (random init)
    branch_width: int = at_least(1, 32)
    freeze_backbone: bool = True  # IRN: frozen; false trains it too (for random-init backbones, not IRN)


@dataclass
class IRNTrainConfig:
    epochs: int = at_least(1, 3)  # irn_num_epoches
    batch_size: int = at_least(1, 32)  # irn_batch_size
    crop_size: int = at_least(16, 512)  # irn_crop_size (a multiple of 16)
    scale_range: list[float] = setting(factory=lambda: [0.5, 1.5], low=0, low_open=True, length=2)  # rescale
    hflip: bool = True
    radius: int = at_least(1, 10)  # PathIndex(radius=10) for the affinity labels
    lr: float = positive(0.1)  # irn_learning_rate
    weight_decay: float = at_least(0, 1e-4)  # irn_weight_decay
    # IRN's PolyOptimizer passes weight_decay where torch's SGD takes momentum: it trains with
    # momentum 1e-4, i.e. none. Kept as IRN runs it.
    momentum: float = fraction(1e-4, high_open=True)
    poly_power: float = at_least(0, 0.9)
    seed: int = at_least(0, 0)
    workers: int = at_least(0, 0)  # DataLoader processes
    prefetch: int = at_least(1, 2)  # batches each loader worker prepares ahead (workers > 0; torch's default)
    # Speed (fsae.speed.mixed_forward): autocast dtype of the network's forward (sigmoid, affinities and loss stay
    # fp32; fp16 adds a GradScaler) and channels-last memory format. The recipes keep fp32.
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = False


@dataclass
class WalkConfig:
    radius: int = at_least(1, 5)  # propagate_to_edge(radius=5)
    beta: float = positive(10.0)
    exp_times: int = at_least(0, 8)  # the walk runs 2^exp_times steps
    bg_threshold: float = fraction(0.25)  # sem_seg_bg_thres
    # autocast dtype of the boundary network's pass before the walk (the walk itself stays fp32); stamped unless fp32
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))


@dataclass
class IRNConfig(Settings):
    name: str = "irn"
    device: str = "cpu"  # checked against the machine when the stage starts (check_device)
    ir_label: IRLabelConfig = field(default_factory=IRLabelConfig)
    net: IRNNetConfig = field(default_factory=IRNNetConfig)
    train: IRNTrainConfig = field(default_factory=IRNTrainConfig)
    walk: WalkConfig = field(default_factory=WalkConfig)

    # Not deciding the boundary network: the name, device, worker counts and prefetch, the memory format (float
    # rounding only, like the device), and the random walk (it runs after training).
    not_hashed: ClassVar[tuple[str, ...]] = ("name", "device", "ir_label.workers", "train.workers", "train.prefetch",
                                             "train.channels_last", "walk")
    hashed_unless_default: ClassVar[tuple[str, ...]] = ("train.precision",)  # runs before it trained in fp32

    def check(self) -> None:
        if self.ir_label.bg_threshold > self.ir_label.fg_threshold:
            raise ConfigError(f"ir_label.bg_threshold = {self.ir_label.bg_threshold} is not allowed; expected "
                              f"<= ir_label.fg_threshold ({self.ir_label.fg_threshold})")
        if self.train.crop_size % 16:
            raise ConfigError(f"train.crop_size = {self.train.crop_size} is not allowed; expected a multiple of 16")
        check_range_pair(self.train.scale_range, "train.scale_range")


def load_irn_config(path: str | Path | None = None, overrides: list[str] | None = None) -> IRNConfig:
    """IRN defaults, then the YAML at ``path`` (if any), then ``a.b=value`` overrides; every value checked."""
    return fill_config(IRNConfig(), path, overrides, what="IRN config")
