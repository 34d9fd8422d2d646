"""The plain CAM baseline (IRN-style): backbone -> 1x1 classifier without bias -> GAP -> soft-margin loss.

The class score map ``cams = classifier(features)`` (B, C, h, w) gives the class scores by global
average pooling, which equals GAP followed by the fully-connected layer (paper eq. 1-2).

The plain CAM has no background channel, but FSAE needs a (C+1)-channel score map S with the
background LAST. ``background`` chooses how S is built:
- ``"constant"`` (default): S = [cam_1..cam_C, b] with a fixed background logit b = ``background_logit``
  (5): a pixel is confident background only where every present class's raw CAM is low (< ~1.3), and
  confident foreground only where one class's CAM is high (> ~8); weakly activated object parts stay
  unlabelled;
- ``"sipe"``: S = s * [n_1..n_C, 1 - max_c n_c], where n_c = ReLU(cam_c) / (max_hw cam_c + 1e-5) is the
  per-image max-normalised CAM of the present classes (SIPE's background) and s = ``score_scale``;
- ``"learned"``: an extra 1x1 output channel (with bias) is the background logit.

``"constant"`` is the default (``ModelConfig`` and this constructor); the measurement that chose it
is in docs/decisions.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.methods.base import Method, Output, backbone_options
from fsae.models.backbones import build_backbone

BACKGROUNDS = ("sipe", "constant", "learned")


def normalised_cams(cams: torch.Tensor, labels: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """ReLU(cam) / (spatial max + eps), times the image-level label when given. Shape: (B, C, h, w)."""
    cams = F.relu(cams)
    norm = cams / (F.adaptive_max_pool2d(cams, 1) + eps)
    if labels is not None:
        norm = norm * labels[:, :, None, None].to(norm.dtype)
    return norm


def sipe_score_map(cams: torch.Tensor, labels: torch.Tensor | None, scale: float) -> torch.Tensor:
    """S = scale * [normalised CAMs, 1 - max over classes]: (B, C, h, w) -> (B, C+1, h, w)."""
    norm = normalised_cams(cams, labels)
    background = 1.0 - norm.max(dim=1, keepdim=True).values
    return scale * torch.cat([norm, background], dim=1)


class CAM(Method):
    def __init__(self, num_classes: int, backbone: str = "tinycnn", output_stride: int = 8,
                 weights: str | None = None, background: str = "constant", score_scale: float = 10.0,
                 background_logit: float = 5.0, **backbone_kwargs):
        super().__init__()
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        self.num_classes = num_classes
        self.background = background
        self.score_scale = score_scale
        self.background_logit = background_logit
        self.backbone = build_backbone(backbone, output_stride, weights, **backbone_kwargs)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes, 1, bias=False)
        self.bg_head = nn.Conv2d(self.backbone.out_channels, 1, 1) if background == "learned" else None

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "CAM":
        return cls(num_classes, backbone=model_cfg.backbone, output_stride=model_cfg.output_stride,
                   weights=model_cfg.weights, background=model_cfg.background, score_scale=model_cfg.score_scale,
                   background_logit=model_cfg.background_logit, **backbone_options(model_cfg))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        features = self.backbone(images)
        cams = self.classifier(features)  # (B, C, h, w), eq. 2 before the ReLU
        logits = cams.mean(dim=(2, 3))  # eq. 1: GAP of the class score map
        if self.background == "sipe":
            score_map = sipe_score_map(cams, labels, self.score_scale)
        elif self.background == "constant":
            score_map = torch.cat([cams, torch.full_like(cams[:, :1], self.background_logit)], dim=1)
        else:
            score_map = torch.cat([cams, self.bg_head(features)], dim=1)
        return Output(logits=logits, score_map=score_map, extras={"cams": cams})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        return {"cls": F.multilabel_soft_margin_loss(output.logits, batch["label"].to(output.logits))}

    @torch.no_grad()
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.backbone(images)))

    def param_groups(self) -> list[dict]:
        new = list(self.classifier.parameters()) + (list(self.bg_head.parameters()) if self.bg_head else [])
        return [{"params": list(self.backbone.parameters()), "new": False}, {"params": new, "new": True}]
