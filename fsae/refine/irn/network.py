"""IRN's class-boundary network: a frozen torchvision ResNet and the trained boundary (edge) branch.

Backbone: a torchvision ResNet by name (``resnet50`` as IRN; ``resnet18`` etc. for small runs) with the
strides (2, 2, 2, 1) of IRN: the stem (conv1, bn1, relu, maxpool) at stride 4, layer1 4, layer2 8,
layer3 16, layer4 16 (its first block's stride set to 1, no dilation). As in IRN the backbone is frozen:
its features are detached and it stays in eval mode (BatchNorm statistics fixed) while training.
``freeze_backbone=False`` (not IRN) trains it too: for a backbone without pretrained weights, whose
random features carry too little to find class boundaries.

Boundary branch (IRN ``fc_edge1..6``): each of the five stage outputs -> 1x1 conv to 32 channels (no
bias), GroupNorm(4, 32), bilinear upsampling to stride 4, ReLU; the 160 concatenated channels -> 1x1 conv
(bias) -> one boundary logit at stride 4. The boundary map is its sigmoid.

IRN's displacement-field branch serves instance segmentation only and is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.errors import CheckpointError
from fsae.models.backbones import BACKBONES, create_backbone, load_pretrained
from fsae.speed import mixed_forward
from fsae.weights import IMAGENET

FEATURE_STRIDE = 4


def _resnet(name: str, weights: str | None) -> nn.Module:
    """IRN's ResNet (``fsae.models.backbones``: ``resnet50_irn``; a plain torchvision name such as
    ``resnet18`` means its ``_irn`` variant). ``torchvision`` is the old name of ``imagenet``."""
    name = name if name.endswith("_irn") else f"{name}_irn"
    if name not in BACKBONES:
        raise CheckpointError(f"backbone {name!r}: IRN's network takes one of "
                              f"{', '.join(k for k in BACKBONES if k.endswith('_irn'))}")
    net = create_backbone(name)
    load_pretrained(net, name, IMAGENET if weights == "torchvision" else weights)
    return net


class BoundaryNet(nn.Module):
    """Frozen ResNet + IRN boundary branch.

    Shape: images (B, 3, H, W) normalised -> boundary logits (B, 1, ceil(H/4), ceil(W/4)).
    """

    def __init__(self, backbone: str = "resnet50", weights: str | None = None, branch_width: int = 32,
                 freeze_backbone: bool = True):
        super().__init__()
        net = _resnet(backbone, weights)
        self.stages = nn.ModuleList([
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4,
        ])
        self.freeze_backbone = freeze_backbone
        self.stages.requires_grad_(not freeze_backbone)
        with torch.no_grad():
            x, channels = torch.zeros(1, 3, 64, 64), []
            self.stages.eval()
            for stage in self.stages:
                x = stage(x)
                channels.append(x.shape[1])
        strides = (4, 4, 8, 16, 16)
        self.edge_layers = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(c, branch_width, 1, bias=False),
                nn.GroupNorm(4, branch_width),
                *([nn.Upsample(scale_factor=s // FEATURE_STRIDE, mode="bilinear", align_corners=False)]
                  if s > FEATURE_STRIDE else []),
                nn.ReLU(inplace=True),
            )
            for c, s in zip(channels, strides)
        ])
        self.edge_out = nn.Conv2d(5 * branch_width, 1, 1, bias=True)

    def train(self, mode: bool = True) -> "BoundaryNet":
        super().train(mode)
        if self.freeze_backbone:
            self.stages.eval()  # frozen backbone: BatchNorm statistics stay fixed (IRN)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        branch = [*self.edge_layers.parameters(), *self.edge_out.parameters()]
        return branch if self.freeze_backbone else [*self.stages.parameters(), *branch]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = []
        x = images
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            for stage in self.stages:
                x = stage(x)
                feats.append(x.detach() if self.freeze_backbone else x)
        branches = [layer(f) for layer, f in zip(self.edge_layers, feats)]
        h, w = branches[0].shape[-2:]
        return self.edge_out(torch.cat([b[..., :h, :w] for b in branches], dim=1))


@torch.no_grad()
def boundary_map(model: BoundaryNet, image: torch.Tensor, pad_to: int = 0, precision: str = "fp32") -> torch.Tensor:
    """Boundary probabilities of one image, averaged over the image and its flip (IRN ``EdgeDisplacement``).

    Shape: image (3, H, W) normalised -> (ceil(H/4), ceil(W/4)) in [0, 1]. The image is zero-padded on
    the right and bottom to at least ``pad_to`` (IRN pads to its crop size) and to a multiple of 16.
    ``precision`` (``walk.precision``): the autocast dtype of the network pass; the sigmoid runs in fp32.
    """
    _, height, width = image.shape
    h, w = (height - 1) // FEATURE_STRIDE + 1, (width - 1) // FEATURE_STRIDE + 1
    ph = -(-max(height, pad_to) // 16) * 16
    pw = -(-max(width, pad_to) // 16) * 16
    x = torch.stack([image, image.flip(-1)])
    x = F.pad(x, (0, pw - width, 0, ph - height))
    logits = mixed_forward(model, x, precision=precision)[:, 0]
    # IRN crops each output to the feature size first, then flips the second back.
    logits = logits[:, :h, :w]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
