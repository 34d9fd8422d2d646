"""DeepLab V1 (LargeFOV head) and V2 (ASPP head) on a dilated backbone at output stride 8.

``DeepLab(images) -> logits``: (B, 3, H, W) normalised images -> (B, C+1, ceil(H/8), ceil(W/8)); channel
``k`` scores segmentation label ``k`` (0 = background, 1..C = classes, the label space of the masks), so
the logits go straight into ``cross_entropy(..., ignore_index=255)`` against label-space masks.

- DeepLab-V2 (Chen et al., TPAMI 2017, sec. 3.3 / Fig. 7): four parallel 3x3 convolutions with
  dilation rates 6, 12, 18, 24 on the last feature map, each predicting the C+1 class scores; their
  outputs are **summed** (ASPP-L).
- DeepLab-V1 LargeFOV (Chen et al., ICLR 2015, sec. 4): fc6 = 3x3 conv with dilation 12 to 1024
  channels, fc7 = 1x1 conv to 1024, each followed by ReLU and dropout, and fc8 = 1x1 conv to C+1.

``model.head`` picks the heads of other codebases (the recipes ``configs/voc/deeplabv{1,2}_r101_ppc.yaml``
and ``deeplab_r38_mct.yaml``): ``ppc`` = the PPC/EPS authors' (YudeWang's segmentation codebase): for V2
``ASPPConcat`` (conv-BN-ReLU branches at 6/12/18/24 and an image-pooling branch, concatenated, 256 channels),
for V1 ``LargeFOV(batch_norm=True)`` (512 channels, BN after fc6 and fc7); ``mctformer`` = MCTformer's
``DilatedPairHead`` on ResNet-38 (two 3x3 convolutions at dilation 12).

Backbones by name (``fsae.models.backbones.create_backbone``): ``resnet101_deeplab`` (DeepLab's MSRA
ResNet-101 at output stride 8, the recipes'), a timm model (``resnet101``, ``resnet18``, ``resnet101s``: the
deep-stem ResNet-101 of the PPC authors; timm dilates the last stages), ``resnet38`` (the wide ResNet-38,
stride 8 by dilation), ``torchvision:<name>`` (a dilated torchvision ResNet) or ``tinycnn`` (tests).

Weights (``load_pretrained``): ``imagenet`` (for ``resnet101_deeplab``: the COCO-pretrained init of
deeplab-pytorch, ``deeplabv1_resnet101-coco.pth``, its key names mapped by
``fsae.models.backbones.deeplab_key_map``; see ``fsae.weights.DEEPLAB_COCO``), a local file holding a
backbone state dict (torchvision / timm / deeplab-pytorch key names; classifier ``fc`` dropped) or a
whole fsae DeepLab checkpoint (e.g. one trained on COCO: the backbone is loaded, the head too when its
class count matches), or the library keywords of ``fsae.models.backbones``; a ``resnet38`` backbone reads
``fsae.models.resnet38.load_resnet38_weights``'s files (ImageNet ``.params`` / ``.pth``, or PSA's VOC-trained
``res38_cls.pth``, its classifier ignored). Missing, unexpected or
wrongly shaped tensors are a ``CheckpointError`` naming the file and the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsae.errors import ConfigError
from fsae.models.backbones import (LIBRARY_WEIGHTS, TimmFeatures, create_backbone, load_pretrained as load_backbone,
                                  load_state_strict, resnet_state)
from fsae.models.batchnorm import freeze_batch_norm
from fsae.models.resnet38 import ResNet38, load_resnet38_weights
from fsae.weights import read_weight_file, resolve_weights


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

    ``batch_norm=False``: Chen et al.'s (ReLU and Dropout2d after fc6 and fc7, weights N(0, 0.01)).
    ``batch_norm=True``: the PPC/EPS authors' (YudeWang's codebase, segmentation/lib/net/deeplabv1.py:18-23,
    42-49): fc6 and fc7 without bias, each followed by BatchNorm (``bn_momentum``) and ReLU, one Dropout
    before fc8, Kaiming-normal (fan_out) weights (deeplabv1.py:29-36).
    Shape: (B, D, h, w) -> (B, K, h, w).
    """

    def __init__(self, in_channels: int, num_outputs: int, dilation: int = 12, channels: int = 1024,
                 dropout: float = 0.5, batch_norm: bool = False, bn_momentum: float = 0.1):
        super().__init__()
        self.batch_norm = batch_norm
        self.fc6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=not batch_norm)
        self.fc7 = nn.Conv2d(channels, channels, 1, bias=not batch_norm)
        self.fc8 = nn.Conv2d(channels, num_outputs, 1)
        self.relu = nn.ReLU(inplace=True)
        if batch_norm:
            self.bn6 = nn.BatchNorm2d(channels, momentum=bn_momentum)
            self.bn7 = nn.BatchNorm2d(channels, momentum=bn_momentum)
            self.drop = nn.Dropout(dropout)
            for conv in (self.fc6, self.fc7, self.fc8):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.drop = nn.Dropout2d(dropout)
            for conv in (self.fc6, self.fc7, self.fc8):
                nn.init.normal_(conv.weight, 0.0, 0.01)
                nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.batch_norm:
            x = self.relu(self.bn6(self.fc6(features)))
            x = self.drop(self.relu(self.bn7(self.fc7(x))))
            return self.fc8(x)
        x = self.drop(self.relu(self.fc6(features)))
        x = self.drop(self.relu(self.fc7(x)))
        return self.fc8(x)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int, bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2),
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels, momentum=bn_momentum), nn.ReLU(inplace=True))


class ASPPConcat(nn.Module):
    """The PPC/EPS authors' "deeplabv2" head (YudeWang's codebase, segmentation/lib/net/deeplabv2.py:19-25,
    43-56 and lib/net/operators/ASPP.py:25-79): four 3x3 conv-BN-ReLU branches at ``rates`` and an
    image-pooling branch (global mean -> 1x1 conv-BN-ReLU, broadcast), **concatenated**, then 1x1 conv-BN-ReLU-
    Dropout, Dropout, and a 1x1 conv to the K scores. Convolutions Kaiming-normal (fan_out), BN 1 / 0.

    Shape: (B, D, h, w) -> (B, K, h, w).
    """

    def __init__(self, in_channels: int, num_outputs: int, rates=(6, 12, 18, 24), channels: int = 256,
                 dropout: float = 0.5, bn_momentum: float = 3e-4):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, channels, 3, r, bn_momentum) for r in self.rates)
        self.image_pool = _conv_bn_relu(in_channels, channels, 1, 1, bn_momentum)
        self.fuse = nn.Sequential(_conv_bn_relu(channels * (len(self.rates) + 1), channels, 1, 1, bn_momentum),
                                  nn.Dropout(dropout), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(channels, num_outputs, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(features.mean(dim=(2, 3), keepdim=True))
        maps = [branch(features) for branch in self.branches] + [pooled.expand(-1, -1, *features.shape[-2:])]
        return self.classifier(self.fuse(torch.cat(maps, dim=1)))


class DilatedPairHead(nn.Module):
    """MCTformer's segmentation head on ResNet-38 (xulianuwa/MCTformer seg/network/resnet38_seg.py:12-24):
    3x3 conv (dilation 12) to ``channels`` with bias, ReLU, 3x3 conv (dilation 12) to the K scores; Xavier-
    uniform weights; no dropout (ResNet-38's b6 / b7 carry their own).

    Shape: (B, D, h, w) -> (B, K, h, w).
    """

    def __init__(self, in_channels: int, num_outputs: int, dilation: int = 12, channels: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, num_outputs, 3, padding=dilation, dilation=dilation)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(features)))


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

    def param_groups(self, head_lr_mult: float = 10.0, bias_lr_mult: float = 1.0, bias_weight_decay: bool = True,
                     train_bn_affine: bool = True) -> list[dict]:
        """Backbone at the base LR, the (new) head at ``head_lr_mult`` x; frozen parameters left out.

        With ``bias_lr_mult != 1`` or ``bias_weight_decay=False`` the biases form their own groups (the PPC
        authors' train.py:71-80: weights 1x / 10x, biases 2x / 20x without decay); with
        ``train_bn_affine=False`` BatchNorm weights and biases are in no group (their optimiser holds only
        Conv2d parameters, deeplabv1.py:53-69, deeplabv2.py:61-77), so only the running statistics move.
        A group may carry ``weight_decay: 0``.
        """
        norm = {id(p) for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
        split_bias = bias_lr_mult != 1.0 or not bias_weight_decay
        groups = []
        for part, mult in ((self.backbone, 1.0), (self.head, head_lr_mult)):
            weights, biases = [], []
            for name, p in part.named_parameters():
                if not p.requires_grad or (id(p) in norm and not train_bn_affine):
                    continue
                (biases if split_bias and name.endswith("bias") and id(p) not in norm else weights).append(p)
            groups.append({"params": weights, "lr_mult": mult})
            if split_bias:
                groups.append({"params": biases, "lr_mult": mult * bias_lr_mult,
                               **({} if bias_weight_decay else {"weight_decay": 0.0})})
        return groups


def build_seg_backbone(name: str, output_stride: int = 8, weights: str | None = None, width: int = 32,
                       depth: int = 6, freeze_bn: bool = True, resnet38_width: float = 1.0) -> nn.Module:
    """A backbone by name (module docstring) with ``.out_channels``; only library weights are loaded here.

    ``resnet38``: BatchNorm frozen with ``freeze_bn`` and only ``conv1a`` not trained, as MCTformer's
    segmentation network (seg/network/resnet38d.py:151, 191-211).
    """
    if name == "tinycnn":
        options = {"width": width, "depth": depth}
    elif name == "resnet38":
        options = {"width": resnet38_width, "freeze_bn": freeze_bn, "freeze_stem": False}
    else:
        options = {}
    backbone = create_backbone(name, output_stride, **options)
    if name == "resnet38":
        backbone.conv1a.requires_grad_(False)
    if weights in LIBRARY_WEIGHTS:
        load_backbone(backbone, name, weights)
    return backbone


def build_head(model_cfg, in_channels: int, num_outputs: int) -> nn.Module:
    """The head of ``model_cfg.arch`` in the style ``model_cfg.head`` (deeplab | ppc | mctformer)."""
    arch, style = model_cfg.arch, model_cfg.head
    if arch == "deeplabv2" and style == "deeplab":
        return ASPP(in_channels, num_outputs, model_cfg.aspp_rates)
    if arch == "deeplabv2" and style == "ppc":
        return ASPPConcat(in_channels, num_outputs, model_cfg.aspp_rates, model_cfg.aspp_channels,
                          model_cfg.dropout, model_cfg.bn_momentum)
    if arch == "deeplabv1" and style in ("deeplab", "ppc"):
        return LargeFOV(in_channels, num_outputs, model_cfg.largefov_dilation, model_cfg.largefov_channels,
                        model_cfg.dropout, batch_norm=style == "ppc", bn_momentum=model_cfg.bn_momentum)
    if arch == "deeplabv1" and style == "mctformer":
        return DilatedPairHead(in_channels, num_outputs, model_cfg.largefov_dilation, model_cfg.largefov_channels)
    raise ConfigError(f"unknown model.arch / model.head {arch!r} / {style!r}; expected deeplabv1 or deeplabv2 "
                      f"with deeplab, ppc or mctformer (deeplabv1 only)")


def build_deeplab(model_cfg, num_classes: int) -> DeepLab:
    """DeepLab V1 / V2 for ``num_classes`` foreground classes (C+1 outputs), weights loaded from the config."""
    backbone = build_seg_backbone(model_cfg.backbone, model_cfg.output_stride, model_cfg.weights,
                                  model_cfg.width, model_cfg.depth, model_cfg.freeze_bn, model_cfg.resnet38_width)
    head = build_head(model_cfg, backbone.out_channels, num_classes + 1)
    model = DeepLab(backbone, head, freeze_bn=model_cfg.freeze_bn)
    if model_cfg.weights not in (None, "", *LIBRARY_WEIGHTS):
        load_pretrained(model, resolve_weights(model_cfg.weights, model_cfg.backbone))
    return model


def _is_deeplab_checkpoint(path: Path) -> bool:
    if path.suffix == ".params":  # MXNet ImageNet file
        return False
    state = read_weight_file(path, "weight")
    return isinstance(state, dict) and any(str(k).startswith("backbone.") for k in state)


def _backbone_target(backbone: nn.Module) -> nn.Module:
    """The module whose state dict uses the library's own key names (timm / torchvision)."""
    return backbone.net if isinstance(backbone, TimmFeatures) else backbone


def load_pretrained(model: DeepLab, path: str | Path) -> dict[str, bool]:
    """Load an ImageNet backbone state dict or a whole DeepLab checkpoint from ``path``.

    Returns ``{"backbone": True, "head": bool}`` (the head is loaded only from a DeepLab checkpoint
    whose head has the same shapes, e.g. not from COCO's 81 classes into VOC's 21).
    """
    path = Path(path)
    if isinstance(model.backbone, ResNet38) and not _is_deeplab_checkpoint(path):
        load_resnet38_weights(model.backbone, path)  # ImageNet .params / .pth or PSA's res38_cls.pth
        return {"backbone": True, "head": False}
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
