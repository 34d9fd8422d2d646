"""The two-view FSAE protocol of a training step (paper Fig. 2, eq. 3-9); the loss itself is fsae/fsae.py.

Per step, after the base method's forward on the weak view x_s (``fsae.train.train_step``):
1. x_t = A_s(x_s): blur + colour RandAugment of the weak view, one generator per image (eq. 3);
2. S_t = model(x_t), the student's score map (eq. 4; under DDP a second forward, one backward);
3. the teacher's score map S_s (``fsae.teacher``): ``reuse`` = the weak view's own output, detached;
   ``separate`` = an extra no-grad pass of the model on x_s; ``ema`` = a no-grad pass of an EMA copy;
4. absent classes masked in both maps, then ``fsae_loss`` on the valid (non-padding) pixels, with the
   pseudo-label accuracy against the GT mask when the batch has one (the paper's Fig. 6).
Before ``fsae.start_epoch`` the term is exactly zero. Statistics stay tensors (no host sync).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fsae.augment import normalize, per_image, run_blur_kernel, strong_view, weak_view
from fsae.config import FSAEConfig
from fsae.fsae import fsae_loss, mask_absent_classes
from fsae.speed import mixed_forward

TEACHERS = ("reuse", "separate", "ema")
BLUR_KERNELS = ("sigma", "per_run")
STRONG_SOURCES = ("weak", "original")


def model_forward(model, x: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
                  channels_last: bool = False):
    """The method's ``model(x, labels)`` by ``fsae.speed.mixed_forward``: the outputs come back in fp32.

    The losses (the method's and eq. 9, with its softmax and tau comparisons) run on these fp32 outputs,
    outside autocast: bf16 keeps 8 mantissa bits, too few for a softmax near tau_fae = 0.95 or a log-loss."""
    return mixed_forward(model, x, labels, precision=precision, channels_last=channels_last)


def downsample_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) integer or bool map -> (B, h, w) by nearest-neighbour sampling."""
    return torch.nn.functional.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0].to(x.dtype)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model on floating tensors; integer buffers copied."""
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


class TwoViewFSAE:
    """The FSAE side of training: the teacher (and its EMA copy), the strong view and the loss term.

    ``model`` is the unwrapped method; ``forward_model`` (the DDP wrapper, or the model) runs the
    student's forward so that its gradient is averaged across processes.
    """

    def __init__(self, cfg: FSAEConfig, model: nn.Module, seed: int = 0, jitter=None, precision: str = "fp32",
                 channels_last: bool = False):
        for name, value, allowed in (("teacher", cfg.teacher, TEACHERS), ("blur_kernel", cfg.blur_kernel, BLUR_KERNELS),
                                     ("strong_source", cfg.strong_source, STRONG_SOURCES)):
            if value not in allowed:
                raise ValueError(f"fsae.{name} must be one of {allowed}, got {value!r}")
        self.cfg = cfg
        self.seed = seed
        self.jitter = jitter  # data.jitter: the original-image strong view's own colour jitter
        self.precision = precision  # train.precision / train.channels_last of the forward passes (model_forward)
        self.channels_last = channels_last
        self.blur_kernel = run_blur_kernel(seed) if cfg.blur_kernel == "per_run" else None
        self.ranges = None
        if (list(cfg.enhance_range), list(cfg.posterize_bits)) != ([0.05, 1.95], [4, 8]):
            self.ranges = {**{op: tuple(cfg.enhance_range) for op in ("Brightness", "Color", "Contrast", "Sharpness")},
                           "Posterize": tuple(cfg.posterize_bits)}
        self.ema = None
        if cfg.enabled and cfg.teacher == "ema":
            self.ema = copy.deepcopy(model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)

    def active(self, epoch: int) -> bool:
        return self.cfg.enabled and epoch >= self.cfg.start_epoch

    def teacher_scores(self, model: nn.Module, source: torch.Tensor, labels: torch.Tensor, out_s) -> torch.Tensor:
        """S_s (B, C+1, h, w) of the normalised weak view ``source``, without gradient."""
        if self.cfg.teacher == "reuse":
            return out_s.score_map.detach()
        with torch.no_grad():
            teacher = model if self.cfg.teacher == "separate" else self.ema.train(self.cfg.ema_mode == "train")
            return model_forward(teacher, source, labels, self.precision, self.channels_last).score_map

    def strong(self, x_s, images, batch: dict, generators, epoch: int) -> torch.Tensor:
        """x_t (B, 3, H, W): A_s of the weak view, or (``strong_source: original``) of the loader's crop
        ``images`` with its own colour jitter (the authors' data/dataset.py:224-246: same resize, flip and
        crop, ``ColorJitter`` drawn again)."""
        fs = self.cfg
        base = x_s
        if fs.strong_source == "original":
            own = [torch.Generator().manual_seed(hash((self.seed, epoch, int(i), 2)) % (2**63)) for i in batch["index"]]
            base = per_image(weak_view, images, own, jitter=self.jitter)
        return per_image(strong_view, base, generators, num_ops=fs.strong_ops, blur_sigma=tuple(fs.blur),
                         blur_prob=fs.blur_prob, blur_kernel=self.blur_kernel, replacement=fs.strong_replacement,
                         ranges=self.ranges)

    def loss(self, model, forward_model, x_s, source, labels, out_s, batch: dict, generators, epoch: int,
             device, images=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's FSAE term and its mask statistics (0-dim tensors); zero before ``start_epoch``.

        Shape: x_s (B, 3, H, W) weak view in [0, 1], source = normalize(x_s), labels (B, C); ``images``
        the loader's crops (for ``strong_source: original``)."""
        if not self.active(epoch):
            return torch.zeros((), device=device), {}  # before start_epoch: exactly zero
        fs = self.cfg
        x_t = self.strong(x_s, images, batch, generators, epoch)
        out_t = model_forward(forward_model, normalize(x_t), labels, self.precision, self.channels_last)
        teacher = self.teacher_scores(model, source, labels, out_s)
        size = teacher.shape[-2:]
        gt = downsample_nearest(batch["mask"], size).to(device) if "mask" in batch else None
        return fsae_loss(mask_absent_classes(teacher, labels), mask_absent_classes(out_t.score_map, labels),
                         tau_fae=fs.tau_fae, tau_sae=fs.tau_sae, kernel_size=fs.kernel_size, weight=fs.weight,
                         use_sae=fs.use_sae, reduction=fs.reduction, form=fs.loss_form,
                         valid=downsample_nearest(batch["valid"], size).to(device) if fs.mask_padding else None,
                         gt=gt)

    def after_update(self, model: nn.Module) -> None:
        """The EMA teacher follows the weights after every applied optimizer step."""
        if self.ema is not None:
            update_ema(self.ema, model, self.cfg.ema_decay)
