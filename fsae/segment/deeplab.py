"""DeepLab V1 (LargeFOV head) and V2 (ASPP head) on a dilated backbone at output stride 8.

``DeepLab(images) -> logits``: (B, 3, H, W) normalised images -> (B, C+1, ceil(H/8), ceil(W/8)); channel
``k`` scores segmentation label ``k`` (0 = background, 1..C = classes, the label space of the masks), so
the logits go straight into ``cross_entropy(..., ignore_index=255)`` against label-space masks.

- DeepLab-V2 (Chen et al., TPAMI 2017, sec. 3.3 / Fig. 7): four parallel 3x3 convolutions with
  dilation rates 6, 12, 18, 24 on the last feature map, each predicting the C+1 class scores; their
  outputs are **summed** (ASPP-L).
- DeepLab-V1 LargeFOV (Chen et al., ICLR 2015, sec. 4): fc6 = 3x3 conv with dilation 12 to 1024
  channels, fc7 = 1x1 conv to 1024, each followed by ReLU and dropout, and fc8 = 1x1 conv to C+1.

Backbones by name: a timm model (``resnet101``, ``resnet50``, ``resnet18``, ``tf_efficientnet_lite0``;
timm dilates the last stages for the output stride), ``torchvision:<name>`` (a torchvision ResNet with
``replace_stride_with_dilation``), or ``tinycnn`` (``fsae.models.backbones``, for tests).

Weights (``load_pretrained``): a local file holding an ImageNet backbone state dict (timm / torchvision
key names; the ``fc.*`` classifier is dropped) or a whole fsae DeepLab checkpoint (e.g. one trained on
COCO: the backbone is loaded, the head too when its class count matches). Missing, unexpected or
wrongly shaped tensors are a ``CheckpointError`` naming the file and the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsae.errors import CheckpointError, ConfigError
from fsae.models.backbones import LITE0_PACKAGE, build_backbone, read_weight_file
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


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet up to ``layer4``, dilated to the output stride. Shape: (B,3,H,W) -> (B,D,H/s,W/s).

    ``.net`` keeps torchvision's module names (conv1, bn1, layer1..4) so ImageNet state dicts load as is.
    """

    def __init__(self, name: str, output_stride: int = 8):
        super().__init__()
        import torchvision

        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}.get(output_stride)
        if dilate is None:
            raise ConfigError(f"torchvision backbones support output_stride 8, 16 or 32, got {output_stride}")
        try:
            net = torchvision.models.get_model(name, weights=None, replace_stride_with_dilation=dilate)
        except (ValueError, NotImplementedError) as exc:
            raise ConfigError(f"torchvision backbone {name!r} at output stride {output_stride}: {exc}") from exc
        del net.fc, net.avgpool
        self.net = net
        self.out_channels = net.layer4[-1].conv1.in_channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


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
    if name.startswith("torchvision:"):
        if weights in ("timm", LITE0_PACKAGE):
            raise CheckpointError(f"weights {weights!r} do not fit torchvision backbone {name!r}; give a file")
        return TorchvisionResNet(name.split(":", 1)[1], output_stride)
    library = weights if weights in ("timm", LITE0_PACKAGE) else None
    return build_backbone(name, output_stride=output_stride, weights=library, width=width, depth=depth)


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
    if model_cfg.weights not in (None, "", "timm", LITE0_PACKAGE):
        load_pretrained(model, model_cfg.weights)
    return model


def _backbone_target(backbone: nn.Module) -> nn.Module:
    """The module whose state dict uses the library's own key names (timm / torchvision)."""
    return backbone.net if hasattr(backbone, "net") else backbone


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    state = read_weight_file(path, "weight")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _check_and_load(target: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = {k: v for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:4]}")
    if shapes:
        problems.append(f"{len(shapes)} tensors of the wrong shape (file vs model), e.g. {shapes[:3]}")
    if problems:
        raise CheckpointError(f"{path}: does not fit the {what}: " + "; ".join(problems)
                              + " (is it the right backbone / architecture?)")
    target.load_state_dict(state, strict=False)


def load_pretrained(model: DeepLab, path: str | Path) -> dict[str, bool]:
    """Load an ImageNet backbone state dict or a whole DeepLab checkpoint from ``path``.

    Returns ``{"backbone": True, "head": bool}`` (the head is loaded only from a DeepLab checkpoint
    whose head has the same shapes, e.g. not from COCO's 81 classes into VOC's 21).
    """
    path = Path(path)
    state = _read_state(path)
    if any(k.startswith("backbone.") for k in state):  # an fsae DeepLab checkpoint
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        _check_and_load(model.backbone, backbone, path, "backbone")
        own_head = model.head.state_dict()
        head_fits = set(head) == set(own_head) and all(head[k].shape == v.shape for k, v in own_head.items())
        if head_fits:
            model.head.load_state_dict(head)
        return {"backbone": True, "head": head_fits}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier
    _check_and_load(_backbone_target(model.backbone), state, path, "backbone")
    return {"backbone": True, "head": False}
