"""EPS (Lee et al., "Railroad is not a train", CVPR 2021): saliency as pseudo-pixel supervision.

The network predicts C + 1 channels (the C classes and a background channel, LAST); the image-level
scores are the GAP of the C foreground channels (multilabel soft-margin loss). The saliency loss
builds a predicted saliency map from the softmax over the C + 1 channels and regresses it onto an
off-the-shelf saliency map (``eps_saliency_loss``). The (C+1)-channel map is also FSAE's score map S.

CAM inference (``cam``): softmax over the C + 1 channels, the C foreground probabilities are the CAM;
``fsae.infer`` resizes them, flips back, sums over scales and max-normalises the present classes; the
learned background channel is dropped and the background comes from the swept threshold (the
authors' default 0.22).

Optimizer groups (``param_groups``) follow the research code's four groups: backbone weights lr x1,
backbone biases x2 (no weight decay), new layers' weights x10, new biases x20 (no weight decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.errors import ConfigError
from fsae.methods.base import Method, Output, backbone_options
from fsae.models.backbones import build_backbone


def eps_saliency_loss(score_map: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4,
                      alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The EPS saliency loss with its label-aware co-occurrence handling.

    p = softmax(score_map) over the C + 1 channels. For each present class c, its overlap ratio with
    the saliency map is ``sum(round(p_c) * round(sal)) / sum(round(p_c) + 1e-4)`` (computed without
    gradient; the 1e-4 is added per pixel, as in the authors' code). A present class with ratio > tau
    counts as foreground; a present class with ratio <= tau (a co-occurring, non-salient object such
    as the rails of a train) counts as background, together with the background channel. Then

        fg = sum_{c in foreground} p_c,   bg = p_background + sum_{c present, ratio <= tau} p_c,
        predicted saliency = alpha * fg + (1 - alpha) * (1 - bg),
        loss = mean over pixels of (predicted - sal)^2.

    Shape: score_map (B, C+1, h, w) logits, background last; saliency (B, H, W) in [0, 1] (resized to
    (h, w) by nearest neighbour); labels (B, C) multi-hot. Returns (loss, predicted saliency (B, 1, h, w)).
    """
    b, k, h, w = score_map.shape
    num_classes = k - 1
    if labels.shape != (b, num_classes):
        raise ValueError(f"labels must be (B, C) = ({b}, {num_classes}), got {tuple(labels.shape)}")
    sal = F.interpolate(saliency[:, None].to(score_map.dtype), size=(h, w), mode="nearest")
    prob = score_map.softmax(dim=1)
    fg_prob = prob[:, :num_classes]
    with torch.no_grad():
        binary = fg_prob.detach().round()
        overlap = (binary * sal.round()).flatten(2).sum(-1) / (binary + 1e-4).flatten(2).sum(-1)  # (B, C)
        present = labels > 0.5
        salient = present & (overlap > tau)
        co_occurring = present & ~(overlap > tau)
    fg_map = (fg_prob * salient[:, :, None, None]).sum(dim=1, keepdim=True)
    bg_map = (fg_prob * co_occurring[:, :, None, None]).sum(dim=1, keepdim=True) + prob[:, num_classes:]
    predicted = alpha * fg_map + (1 - alpha) * (1 - bg_map)
    return F.mse_loss(predicted, sal), predicted


def batch_saliency(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The batch's saliency maps (B, H, W) in [0, 1] on ``like``'s device; a clear error if absent."""
    if "saliency" not in batch:
        raise ConfigError("this method needs saliency maps: set data.saliency_dir (a folder of <id>.png "
                          "greyscale maps, e.g. data/synthetic/saliency or VOC2012/SALImages)")
    return batch["saliency"].to(device=like.device, dtype=like.dtype)


def reference_param_groups(backbone: nn.Module, new_layers: list[nn.Module]) -> list[dict]:
    """The research code's four groups: backbone weights lr x1, backbone biases x2 (no weight decay), new
    weights x m, new biases x 2m (no weight decay), m = ``optim.new_layer_lr_mult`` (10 in the recipes).

    ``lr_mult`` is the group's factor on top of the ``new`` flag's (``fsae.train.build_optimizer``).
    Frozen tensors are left out.
    """

    def split(modules):
        weights, biases = [], []
        for module in modules:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    (biases if name.endswith("bias") else weights).append(p)
        return weights, biases

    bb_w, bb_b = split([backbone])
    new_w, new_b = split(new_layers)
    groups = [
        {"params": bb_w, "new": False, "lr_mult": 1.0},
        {"params": bb_b, "new": False, "lr_mult": 2.0, "weight_decay": 0.0},
        {"params": new_w, "new": True, "lr_mult": 1.0},
        {"params": new_b, "new": True, "lr_mult": 2.0, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def eps_options(model_cfg) -> dict:
    """The constructor arguments EPS and PPC share: backbone, output stride, weights, tau, alpha."""
    return dict(backbone=model_cfg.backbone, output_stride=model_cfg.output_stride, weights=model_cfg.weights,
                tau=model_cfg.eps.tau, alpha=model_cfg.eps.alpha, **backbone_options(model_cfg))


class EPS(Method):
    """Backbone -> 1x1 conv (no bias) to C + 1 channels; logits = GAP of the C foreground channels."""

    needs_saliency = True

    def __init__(self, num_classes: int, backbone: str = "resnet38", output_stride: int = 8,
                 weights: str | None = None, tau: float = 0.4, alpha: float = 0.5, **backbone_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.tau = tau
        self.alpha = alpha
        self.backbone = build_backbone(backbone, output_stride, weights, **backbone_kwargs)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "EPS":
        return cls(num_classes, **eps_options(model_cfg))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        cams = self.classifier(self.features(images))  # (B, C+1, h, w), background last
        logits = cams[:, :self.num_classes].mean(dim=(2, 3))
        return Output(logits=logits, score_map=cams, extras={"cams": cams})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(output.logits)
        saliency = batch_saliency(batch, output.score_map)
        sal, _ = eps_saliency_loss(output.score_map, saliency, labels, self.tau, self.alpha)
        return {"cls": F.multilabel_soft_margin_loss(output.logits, labels), "sal": sal}

    @torch.no_grad()
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground softmax probabilities over the C + 1 channels: (B, C, h, w) in [0, 1]."""
        cams = self.classifier(self.features(images))
        return cams.softmax(dim=1)[:, :self.num_classes]

    def new_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def param_groups(self) -> list[dict]:
        return reference_param_groups(self.backbone, self.new_layers())
