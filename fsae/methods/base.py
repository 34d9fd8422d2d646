"""The interface every base CAM method implements; the training loop owns FSAE."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Output:
    """What a method's forward pass returns.

    ``logits`` (B, C) image-level class scores; ``score_map`` (B, C+1, h, w) the map S that FSAE
    supervises, background channel LAST; ``extras`` anything the method's own losses need.
    """

    logits: torch.Tensor
    score_map: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A base CAM method: ``forward`` for training, ``losses`` for its own terms, ``cam`` for inference.

    A method never knows whether FSAE is on. ``from_config`` builds it from ``ModelConfig``; the
    optional capabilities are declared here with their defaults and overridden by a method's class.
    """

    num_classes: int
    needs_saliency: bool = False  # training batches must carry "saliency" (data.saliency_dir): EPS, PPC
    seed_background: bool = False  # cam(images, labels) -> (B, C+1, h, w), its own background LAST: SIPE

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "Method":
        """Build the method from ``fsae.config.ModelConfig``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        """images (B, 3, H, W) normalised; labels (B, C) multi-hot when known (training)."""
        raise NotImplementedError

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        """The base method's named loss terms (summed by the training loop)."""
        raise NotImplementedError

    @torch.no_grad()
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground CAM for inference: (B, C, h, w), non-negative, not normalised."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Parameter groups, each with ``new``: True for layers trained from scratch on top of a
        backbone (they get ``OptimConfig.new_layer_lr_mult`` times the learning rate); optionally
        ``lr_mult`` (a further factor, e.g. 2 for biases) and ``weight_decay`` (the group's own)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "new": False}]


def backbone_options(model_cfg) -> dict:
    """Keyword arguments of ``fsae.models.backbones.build_backbone`` for the configured backbone."""
    if model_cfg.backbone == "tinycnn":
        return {"width": model_cfg.width, "depth": model_cfg.depth}
    if model_cfg.backbone == "resnet38":
        r = model_cfg.resnet38
        return {"resnet38": {"width": r.width, "freeze_bn": r.freeze_bn, "freeze_stem": r.freeze_stem}}
    return {}
