"""CAM training's settings (``fsae train`` / ``cam`` / ``eval`` / ``crf``): one dataclass per section with
the paper's defaults; a recipe YAML and ``--set`` overrides fill them through ``fsae.settings``' machinery
(checked values, one hash of the deciding fields, ``changes`` between two configs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fsae.errors import ConfigError
# The machinery, re-exported: code and saved notebooks that import it from here keep working.
from fsae.settings import (Rule, Settings, apply_overrides, at_least, changes, check_device, check_range_pair,  # noqa: F401
                           check_sweep, check_value, describe_changes, fill_config, fraction, positive, setting,
                           validate)

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
    # Removed from the recipes, with the one value that stayed (docs/decisions.md).
    removed_keys: ClassVar[dict[str, Any]] = {"model.background": "constant", "model.sipe.score_map": "cam"}

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
