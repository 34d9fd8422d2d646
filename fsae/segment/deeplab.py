"""DeepLab V1 (LargeFOV head) and V2 (ASPP head) on a dilated backbone at output stride 8.

``DeepLab(images) -> logits``: (B, 3, H, W) normalised images -> (B, C+1, ceil(H/8), ceil(W/8)); channel
``k`` scores segmentation label ``k`` (0 = background, 1..C = classes, the label space of the masks), so
the logits go straight into ``cross_entropy(..., ignore_index=255)`` against label-space masks.

- DeepLab-V2 (Chen et al., TPAMI 2017, sec. 3.3 / Fig. 7): four parallel 3x3 convolutions with
  dilation rates 6, 12, 18, 24 on the last feature map, each predicting the C+1 class scores; their
  outputs are **summed** (ASPP-L).
- DeepLab-V1 LargeFOV (Chen et al., ICLR 2015, sec. 4): fc6 = 3x3 conv with dilation 12 to 1024
  channels, fc7 = 1x1 conv to 1024, each followed by ReLU and dropout, and fc8 = 1x1 conv to C+1.

Backbones by name (``fsae.models.backbones.create_backbone``): ``resnet101_deeplab`` (DeepLab's MSRA
ResNet-101 at output stride 8, the recipes'), a timm model (``resnet101``, ``resnet18``, ...; timm dilates
the last stages), ``torchvision:<name>`` (a dilated torchvision ResNet) or ``tinycnn`` (tests).

Weights (``load_pretrained``): ``imagenet`` (for ``resnet101_deeplab``: the COCO-pretrained init of
deeplab-pytorch, ``deeplabv1_resnet101-coco.pth``, its key names mapped by
``fsae.models.backbones.deeplab_key_map``; see ``fsae.weights.DEEPLAB_COCO``), a local file holding a
backbone state dict (torchvision / timm / deeplab-pytorch key names; classifier ``fc`` dropped) or a
whole fsae DeepLab checkpoint (e.g. one trained on COCO: the backbone is loaded, the head too when its
class count matches), or the library keywords of ``fsae.models.backbones``. Missing, unexpected or
wrongly shaped tensors are a ``CheckpointError`` naming the file and the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsae.errors import ConfigError
from fsae.models.backbones import (LIBRARY_WEIGHTS, TimmFeatures, create_backbone, load_pretrained as load_backbone,
                                  load_state_strict, resnet_state)
from fsae.weights import resolve_weights
from fsae.models.batchnorm import freeze_batch_norm


class ASPP(nn.Module):
    """DeepLab-V2 head: parallel dilated 3x3 convs to class scores, outputs summed.

    Shape: (B, D, h, w) -> (B, K, h, w), ``K = num_outputs``.
    """

    def __init__(self, in_channels: int, num_outputs: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_outputs, 3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return sum(branch(features) for branch in self.branches)


class LargeFOV(nn.Module):
    """DeepLab-V1 LargeFOV head: fc6 (3x3, dilation 12) - fc7 (1x1) - fc8 (1x1 to classes).

    Shape: (B, D, h, w) -> (B, K, h, w).
    """

    def __init__(self, in_channels: int, num_outputs: int, dilation: int = 12, channels: int = 1024,
                 dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.fc7 = nn.Conv2d(channels, channels, 1)
        self.fc8 = nn.Conv2d(channels, num_outputs, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout2d(dropout)
        for conv in (self.fc6, self.fc7, self.fc8):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.fc6(features)))
        x = self.drop(self.relu(self.fc7(x)))
        return self.fc8(x)


class DeepLab(nn.Module):
    """Backbone + head. Shape: images (B, 3, H, W) -> logits (B, C+1, h, w), ``h = ceil(H / stride)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_bn = freeze_bn
        if freeze_bn:  # the backbone's BatchNorm layers stay in eval mode, their affine not trained
            freeze_batch_norm(self.backbone)
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        """Backbone at the base LR, the (new) head at ``head_lr_mult`` x; frozen parameters left out."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr_mult": 1.0},
            {"params": [p for p in self.head.parameters() if p.requires_grad], "lr_mult": head_lr_mult},
        ]


def build_seg_backbone(name: str, output_stride: int = 8, weights: str | None = None, width: int = 32,
                       depth: int = 6) -> nn.Module:
    """A backbone by name (module docstring) with ``.out_channels``; only library weights are loaded here."""
    options = {"width": width, "depth": depth} if name == "tinycnn" else {}
    backbone = create_backbone(name, output_stride, **options)
    if weights in LIBRARY_WEIGHTS:
        load_backbone(backbone, name, weights)
    return backbone


def build_deeplab(model_cfg, num_classes: int) -> DeepLab:
    """DeepLab V1 / V2 for ``num_classes`` foreground classes (C+1 outputs), weights loaded from the config."""
    backbone = build_seg_backbone(model_cfg.backbone, model_cfg.output_stride, model_cfg.weights,
                                  model_cfg.width, model_cfg.depth)
    k = num_classes + 1
    if model_cfg.arch == "deeplabv2":
        head: nn.Module = ASPP(backbone.out_channels, k, model_cfg.aspp_rates)
    elif model_cfg.arch == "deeplabv1":
        head = LargeFOV(backbone.out_channels, k, model_cfg.largefov_dilation, model_cfg.largefov_channels,
                        model_cfg.dropout)
    else:
        raise ConfigError(f"unknown model.arch {model_cfg.arch!r}; expected deeplabv1 or deeplabv2")
    model = DeepLab(backbone, head, freeze_bn=model_cfg.freeze_bn)
    if model_cfg.weights not in (None, "", *LIBRARY_WEIGHTS):
        load_pretrained(model, resolve_weights(model_cfg.weights, model_cfg.backbone))
    return model


def _backbone_target(backbone: nn.Module) -> nn.Module:
    """The module whose state dict uses the library's own key names (timm / torchvision)."""
    return backbone.net if isinstance(backbone, TimmFeatures) else backbone


def load_pretrained(model: DeepLab, path: str | Path) -> dict[str, bool]:
    """Load an ImageNet backbone state dict or a whole DeepLab checkpoint from ``path``.

    Returns ``{"backbone": True, "head": bool}`` (the head is loaded only from a DeepLab checkpoint
    whose head has the same shapes, e.g. not from COCO's 81 classes into VOC's 21).
    """
    path = Path(path)
    state = resnet_state(path)
    if any(k.startswith("backbone.") for k in state):  # an fsae DeepLab checkpoint
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        load_state_strict(model.backbone, backbone, path, "backbone")
        own_head = model.head.state_dict()
        head_fits = set(head) == set(own_head) and all(head[k].shape == v.shape for k, v in own_head.items())
        if head_fits:
            model.head.load_state_dict(head)
        return {"backbone": True, "head": head_fits}
    load_state_strict(_backbone_target(model.backbone), state, path, "backbone")
    return {"backbone": True, "head": False}
