"""The plain CAM baseline (IRN-style): backbone -> 1x1 classifier without bias -> GAP -> soft-margin loss.

The class score map ``cams = classifier(features)`` (B, C, h, w) gives the class scores by global
average pooling, which equals GAP followed by the fully-connected layer (paper eq. 1-2).

The plain CAM has no background channel, but FSAE needs a (C+1)-channel score map S with the
background LAST: S = [cam_1..cam_C, b] with a fixed background logit b = ``background_logit`` (5). A
pixel is confident background only where every present class's raw CAM is low (< ~1.3), and confident
foreground only where one class's CAM is high (> ~8); weakly activated object parts stay unlabelled.
docs/decisions.md has the measurement that chose this map over SIPE's and a learned background.

Backbone training as IRN's CAM step (``model.cam``, on in the VOC / COCO recipes, off by default):
``freeze_bn`` keeps every BatchNorm in eval mode with its affine trained (IRN's FixedBatchNorm,
net/resnet50.py:11-14); ``freeze_low_stages`` trains only ``layer3`` / ``layer4`` of the backbone (IRN
freezes conv1 / bn1 and detaches stage 2's output, net/resnet50_cam.py:28, 39-43).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.methods.base import Method, Output, backbone_options
from fsae.models.backbones import build_backbone
from fsae.models.backbones import freeze_low_stages as freeze_low_stages_of
from fsae.models.batchnorm import freeze_batch_norm


class CAM(Method):
    def __init__(self, num_classes: int, backbone: str = "tinycnn", output_stride: int = 8,
                 weights: str | None = None, background_logit: float = 5.0, freeze_bn: bool = False,
                 freeze_low_stages: bool = False, **backbone_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.background_logit = background_logit
        self.backbone = build_backbone(backbone, output_stride, weights, **backbone_kwargs)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes, 1, bias=False)
        if freeze_bn:  # IRN's FixedBatchNorm: running statistics in training too
            freeze_batch_norm(self.backbone)
        if freeze_low_stages:  # IRN: conv1 / bn1 frozen, stage 2's output detached
            freeze_low_stages_of(self.backbone)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "CAM":
        return cls(num_classes, backbone=model_cfg.backbone, output_stride=model_cfg.output_stride,
                   weights=model_cfg.weights, background_logit=model_cfg.background_logit,
                   freeze_bn=model_cfg.cam.freeze_bn, freeze_low_stages=model_cfg.cam.freeze_low_stages,
                   **backbone_options(model_cfg))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        cams = self.classifier(self.backbone(images))  # (B, C, h, w), eq. 2 before the ReLU
        logits = cams.mean(dim=(2, 3))  # eq. 1: GAP of the class score map
        score_map = torch.cat([cams, torch.full_like(cams[:, :1], self.background_logit)], dim=1)
        return Output(logits=logits, score_map=score_map, extras={"cams": cams})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        return {"cls": F.multilabel_soft_margin_loss(output.logits, batch["label"].to(output.logits))}

    @torch.no_grad()
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.backbone(images)))

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "new": False},
                {"params": list(self.classifier.parameters()), "new": True}]
