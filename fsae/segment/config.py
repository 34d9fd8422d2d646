"""Settings of the segmentation stage (DeepLab V1 / V2 trained on pseudo-masks), one dataclass per concern.

The defaults are the DeepLab-V2 settings WSSS papers use on VOC (``configs/voc/deeplabv2_r101.yaml``
documents where each number comes from). A recipe YAML overrides fields and ``--set train.iterations=100``
overrides apply on top, with ``fsae.settings``' machinery (unknown keys and values out of range are an error
naming the file and the field; one hash of what decides the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fsae.settings import Settings, at_least, check_range_pair, fill_config, fraction, positive, setting
from fsae.errors import ConfigError
from fsae.refine.crf import DEEPLAB_CRF, CrfParams


@dataclass
class SegDataConfig:
    kind: str = setting("voc", choices=("voc", "coco"))  # the synthetic set uses the voc layout
    root: str = "data/synthetic"
    num_classes: int = at_least(1, 4)
    train_split: str = "train"
    val_split: str = "val"  # evaluated against gt_dir after `fsae seg infer` ("" = none)
    test_split: str = ""  # VOC test server: results/VOC2012/Segmentation/comp6_test_cls ("" = none)
    # Training masks: the pseudo-mask folder (absolute, or relative to root); coco appends /<split>.
    mask_dir: str | None = None
    gt_dir: str = "SegmentationClass"  # val ground truth, relative to root (coco: SegmentationClass/val2014)
    label_file: str | None = None  # default: <root>/cls_labels.json
    saliency_dir: str | None = None  # unused here; build_dataset reads the attribute
    crop_size: int = at_least(1, 321)
    scale_range: list[float] = setting(factory=lambda: [0.5, 1.5], low=0, low_open=True, length=2)  # rescale factor
    hflip: bool = True
    workers: int = at_least(0, 0)
    prefetch: int = at_least(1, 2)  # batches each loader worker prepares ahead (workers > 0; torch's default)


@dataclass
class SegModelConfig:
    arch: str = setting("deeplabv2", choices=("deeplabv2", "deeplabv1"))  # ASPP, branches summed | LargeFOV
    backbone: str = "resnet101"  # timm name, "torchvision:<name>", or tinycnn (tests): checked when built
    output_stride: int = setting(8, choices=(8, 16, 32))
    # null (random init) | local file (ImageNet state dict or an fsae DeepLab checkpoint, e.g. COCO-trained)
    # | "timm" (timm's download) | "efficientnet-lite0-package"
    weights: str | None = None
    freeze_bn: bool = True  # keep the backbone's BatchNorm statistics and affine fixed (batch 10)
    aspp_rates: list[int] = setting(factory=lambda: [6, 12, 18, 24], low=1, nonempty=True)  # deeplabv2
    largefov_dilation: int = at_least(1, 12)  # deeplabv1: fc6 3x3 conv dilation
    largefov_channels: int = at_least(1, 1024)  # deeplabv1: fc6 / fc7 width
    dropout: float = fraction(0.5, high_open=True)  # deeplabv1: after fc6 and fc7
    width: int = at_least(1, 32)  # tinycnn only
    depth: int = at_least(1, 6)  # tinycnn only
    # Heads of other codebases (fsae.segment.deeplab): deeplab (the two above) | ppc (the PPC/EPS authors':
    # ASPP with BN and image pooling, concatenated / LargeFOV with BN) | mctformer (deeplabv1 only).
    head: str = setting("deeplab", choices=("deeplab", "ppc", "mctformer"))
    aspp_channels: int = at_least(1, 256)  # ppc deeplabv2: width of each ASPP branch
    bn_momentum: float = fraction(3e-4, low_open=True)  # ppc heads' BatchNorm momentum (PyTorch convention)
    resnet38_width: float = positive(1.0)  # resnet38 backbone: channel multiplier (< 1 for CPU tests only)


@dataclass
class SegOptimConfig:
    lr: float = positive(2.5e-4)
    momentum: float = fraction(0.9, high_open=True)
    weight_decay: float = at_least(0, 5e-4)
    poly_power: float = at_least(0, 0.9)
    head_lr_mult: float = positive(10.0)  # the new head (ASPP / LargeFOV) learns 10x faster than the backbone
    bias_lr_mult: float = positive(1.0)  # extra factor on conv biases (the PPC authors': 2)
    bias_weight_decay: bool = True  # false: biases without weight decay (the PPC authors')
    train_bn_affine: bool = True  # false: BatchNorm weight/bias left out of the optimiser (the PPC authors')


@dataclass
class SegTrainConfig:
    iterations: int = at_least(1, 20000)
    batch_size: int = at_least(1, 10)
    seed: int = at_least(0, 0)
    device: str = "cpu"  # checked against the machine when a stage starts (check_device)
    log_every: int = at_least(1, 20)  # iterations between metrics.csv rows
    checkpoint_every: int = at_least(1, 1000)  # iterations between checkpoints/last.pt writes (and at the end)
    # Speed (fsae.speed.mixed_forward): autocast dtype of DeepLab's forward (the loss stays fp32; fp16 adds a
    # GradScaler) and channels-last memory format of model and crops. The recipes keep fp32.
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = False
    # Multi-scale training (deeplab-pytorch MSC, libs/models/msc.py:26-47, main.py:228-239): the loss on the
    # crop's logits, on the logits of the crop resized by each of these factors, and on their pixel-wise max,
    # summed (null: the crop only). The deeplabv2_r101 recipes: [0.5, 0.75].
    msc_scales: list[float] | None = setting(None, low=0, low_open=True)


@dataclass
class SegCrf(CrfParams):
    """DeepLab's CRF (``fsae.refine.crf.DEEPLAB_CRF``) and whether ``fsae seg infer`` runs it."""

    enabled: bool = True


def _deeplab_crf() -> SegCrf:
    return SegCrf(**DEEPLAB_CRF.kwargs())


@dataclass
class SegInferConfig:
    scales: list[float] = setting(factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5], low=0, low_open=True, nonempty=True)
    flip: bool = True
    # over scales x flips: mean_probs | mean_logits (PPC authors') | max_probs (MCTformer)
    fuse: str = setting("mean_probs", choices=("mean_probs", "mean_logits", "max_probs"))
    crf: SegCrf = field(default_factory=_deeplab_crf)
    # autocast dtype of the forward passes (the softmaxes and their fusion stay fp32); stamped unless fp32
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16"))


@dataclass
class SegConfig(Settings):
    name: str = "seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    infer: SegInferConfig = field(default_factory=SegInferConfig)

    # Not deciding the trained weights: the name, where the data, pseudo-masks and GT lie (moving them keeps a
    # run resumable), the splits only inference reads, logging, checkpoint spacing, device, loader processes,
    # memory format (float rounding only, like the device) and inference.
    not_hashed: ClassVar[tuple[str, ...]] = (
        "name", "data.root", "data.mask_dir", "data.gt_dir", "data.label_file", "data.saliency_dir",
        "data.val_split", "data.test_split", "data.workers", "data.prefetch", "train.device", "train.log_every",
        "train.checkpoint_every", "train.channels_last", "infer",
    )
    # Fields added after runs were written (those runs: fp32, no multi-scale loss)
    hashed_unless_default: ClassVar[tuple[str, ...]] = ("train.precision", "train.msc_scales")

    def check(self) -> None:
        check_range_pair(self.data.scale_range, "data.scale_range")
        if self.model.head == "mctformer" and self.model.arch != "deeplabv1":
            raise ConfigError(f"model.head = 'mctformer' is not allowed with model.arch {self.model.arch!r}; "
                              f"expected deeplabv1 (MCTformer's ResNet-38 DeepLab)")


def load_seg_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SegConfig:
    """Defaults, then the recipe YAML at ``path`` (if any), then ``overrides`` (``a.b=value``); every value
    checked."""
    return fill_config(SegConfig(), path, overrides)
