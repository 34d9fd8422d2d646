"""AffinityNet on ResNet-38 (PSA ``network/resnet38_aff.py``).

Backbone: ``fsae.models.resnet38.ResNet38`` (PSA's ``resnet38d``), its three stride-8 maps ``conv4``
(512 channels), ``conv5`` (1024) and ``conv6`` (4096). Head: 1x1 convs without bias ``f8_3`` (512 -> 64),
``f8_4`` (1024 -> 128), ``f8_5`` (4096 -> 256), each followed by ELU; the 448 concatenated channels ->
``f9`` (1x1, 448 -> 448, no bias) -> ELU: the features whose L1 distances give the affinities.
Initialisation: Kaiming normal for ``f8_*``, Xavier uniform with gain 4 for ``f9``. The head layers are
PSA's ``from_scratch_layers`` (10 x the learning rate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.models.backbones import create_backbone, load_pretrained


class AffinityNet(nn.Module):
    """Shape: images (B, 3, H, W) normalised, H and W multiples of 8 -> features (B, sum(feature_channels),
    H/8, W/8)."""

    def __init__(self, width: float = 1.0, weights: str | None = None,
                 feature_channels: tuple[int, int, int] = (64, 128, 256), freeze_bn: bool = True,
                 freeze_stem: bool = True):
        super().__init__()
        self.backbone = create_backbone("resnet38", 8, width=width, freeze_bn=freeze_bn, freeze_stem=freeze_stem)
        load_pretrained(self.backbone, "resnet38", weights)  # local .params / .pth (None: random init)
        c = self.backbone.feature_channels
        c3, c4, c5 = feature_channels
        self.f8_3 = nn.Conv2d(c["conv4"], c3, 1, bias=False)
        self.f8_4 = nn.Conv2d(c["conv5"], c4, 1, bias=False)
        self.f8_5 = nn.Conv2d(c["conv6"], c5, 1, bias=False)
        self.f9 = nn.Conv2d(c3 + c4 + c5, c3 + c4 + c5, 1, bias=False)
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.f8_3.parameters(), *self.f8_4.parameters(), *self.f8_5.parameters(), *self.f9.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        d = self.backbone.forward_features(images)
        x = torch.cat([F.elu(self.f8_3(d["conv4"])), F.elu(self.f8_4(d["conv5"])), F.elu(self.f8_5(d["conv6"]))], 1)
        return F.elu(self.f9(x))
