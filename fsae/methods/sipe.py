"""SIPE (Chen et al., CVPR 2022): self-supervised image-specific prototype exploration.

A ResNet at output stride 16 (``resnet50_irn``: SIPE's strides (2, 2, 2, 1), no dilation,
network/resnet50_SIPE.py:16; or a timm name) gives four stage features x1..x4. Then:

1. CAM: ``cams = classifier(x4)`` (1x1, no bias), class scores by GAP (as the plain CAM);
   ``norm_cam = [ReLU(cam_c) / (max_hw cam_c + 1e-5) * y_c, 1 - max_c norm_c]`` (C + 1 channels; the
   background is 1 - the max over ALL classes' normalised CAMs, then the foreground is gated by the
   image label y), the general (class-level) localisation map (``sipe_norm_cam``);
2. hierarchical features: a 1x1 "side" conv on each stage output (detached: the side layers do not
   train the backbone), each L2-normalised over channels and resized to x3's grid, concatenated
   (``hierarchical_features``);
3. seeds (``structure_seeds``): the cosine correlation of pixel features, ReLU'd, ``corr`` (hw, hw);
   for every channel k the soft IoU of each pixel's correlation row with norm_cam_k,
   ``inter = corr @ m_k``, ``union = corr.sum(-1) + m_k.sum() - inter``; the background IoU is halved;
   a pixel's seed is the argmax channel, gated by the label after the argmax (the background is always
   present); in training the map is label-gated before as well (SIPE's ``valid_mask``), at inference
   it is not (SIPE ``network/resnet50_SIPE.py:143-149``);
4. prototypes: the mean hierarchical feature under each seed (``seed_prototypes``; mean over all
   h*w pixels, the cosine below does not care about the scale);
5. IS-CAM: ``ReLU(cos(feature, prototype_k))`` for every channel (``is_cam``);
6. losses: multi-label soft margin on the GAP scores, and the general-specific consistency (GSC)
   ``mean |norm_cam - IS_cam / max_hw IS_cam|`` (the max not detached, SIPE
   ``train_resnet50_SIPE.py:151-152``), on valid (non-padding) pixels.

SIPE's own layout puts the background at channel 0; here it is LAST everywhere (``fsae.labels``), so
no conversion is needed. SIPE computes the training seeds from the last stage feature x4 and the
inference seeds from the hierarchical features; both are kept. At inference SIPE sums the CAMs and the
hierarchical features of an image and its flip before the seeds and prototypes (network/resnet50_SIPE.py:
140-141): ``cam_with_background(x, labels, flip_pairs=True)`` does the same for a batch laid out as
``[views, flipped views]`` (``fuses_flips``: ``fsae.infer`` passes it and skips its own flip sum).
Difference from SIPE's code: crop padding is left out of the GSC mean (the seeds may include it, as
``Method.forward`` does not see the valid mask).

Training recipe (SIPE's ``train_resnet50_SIPE.py``): frozen BatchNorm (``freeze_bn``), the stem and
stages 1-2 without gradient (``freeze_low_stages``: SIPE detaches stage 2's output, so those layers
never change), the classifier and side convs as the 10x-lr "new" layers, gradient-norm clipping 1.

Inference (SIPE's ``make_cam.py``): ``cam_with_background(images, labels)`` gives the IS-CAM's C
foreground channels and its background plane; at scales 1.0/0.5/1.5/2.0 + flip, summed, every channel
max-normalised, evaluated by argmax with no threshold. ``seed_background = True`` makes ``fsae.infer``
call it and store the background plane in the seed file. ``cam(images, labels)`` is the C foreground
channels of the IS-CAM, like every method's ``cam``; ``cam(images)`` without labels is the plain
ReLU'd classifier CAM (used for the in-training held-out evaluation, which sweeps a threshold).

FSAE's (C + 1)-channel score map (the FSAE authors did not publish their SIPE code):
``S = score_scale * norm_cam``, the CAM with SIPE's 1 - max background, gradient through the classifier
and the backbone. docs/decisions.md has the measurement that chose it over the normalised IS-CAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.methods.base import Method, Output
from fsae.models.backbones import create_backbone, load_pretrained
from fsae.models.backbones import freeze_low_stages as freeze_low_stages_
from fsae.models.batchnorm import freeze_batch_norm

EPS = 1e-5


def sipe_norm_cam(cams: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """SIPE's general localisation map, background LAST: (B, C, h, w) -> (B, C+1, h, w).

    Foreground ``ReLU(cam) / (max_hw + 1e-5)`` gated by ``labels`` (B, C) when given; background
    ``1 - max_c`` of the normalised CAMs of all classes (before the gate, as SIPE does).
    """
    norm = F.relu(cams)
    norm = norm / (F.adaptive_max_pool2d(norm, 1) + EPS)
    background = 1.0 - norm.max(dim=1, keepdim=True).values
    if labels is not None:
        norm = norm * labels[:, :, None, None].to(norm.dtype)
    return torch.cat([norm, background], dim=1)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / (||x||_2 over channels + 1e-5). Shape: (B, D, h, w)."""
    return x / (torch.norm(x, dim=1, keepdim=True) + EPS)


def hierarchical_features(sides: list[torch.Tensor], size) -> torch.Tensor:
    """Concatenate the channel-normalised side features resized (bilinear) to ``size``: (B, sum D_i, h, w)."""
    return torch.cat([F.interpolate(l2_normalise(s), size=size, mode="bilinear", align_corners=False)
                      for s in sides], dim=1)


def structure_seeds(norm_cam: torch.Tensor, gate: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """One-hot seeds from the soft IoU of feature correlation rows with each map.

    Shape: norm_cam (B, K, h, w) (background LAST), gate (B, K) (1 for the background and present
    classes), feature (B, D, h, w) -> seeds (B, K, h, w) in {0, 1}. No gradient.
    """
    with torch.no_grad():
        b, k, h, w = norm_cam.shape
        f = feature.detach().flatten(2)  # (B, D, hw)
        f = f / (torch.norm(f, dim=1, keepdim=True) + EPS)
        corr = F.relu(f.transpose(1, 2) @ f)  # (B, hw, hw): pixel i's correlation row
        m = norm_cam.detach().flatten(2)  # (B, K, hw)
        inter = torch.einsum("bij,bkj->bki", corr, m)  # sum_j corr[i, j] m_k[j]
        union = corr.sum(-1)[:, None, :] + m.sum(-1, keepdim=True) - inter
        iou = inter / union
        iou[:, -1] = iou[:, -1] * 0.5  # SIPE halves the background IoU
        seeds = F.one_hot(iou.argmax(1), k).permute(0, 2, 1).to(norm_cam.dtype)  # (B, K, hw)
        return (seeds * gate[:, :, None].to(seeds.dtype)).view(b, k, h, w)


def seed_prototypes(seeds: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Prototype k = mean over all h*w pixels of seed_k * feature. Shape: (B, K, h, w), (B, D, h, w) -> (B, K, D)."""
    seeds = F.interpolate(seeds, size=feature.shape[-2:], mode="nearest")
    return torch.einsum("bkhw,bdhw->bkd", seeds, feature) / (feature.shape[-2] * feature.shape[-1])


def is_cam(prototypes: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """ReLU(cosine(feature pixel, prototype k)). Shape: (B, K, D), (B, D, h, w) -> (B, K, h, w)."""
    return F.relu(F.cosine_similarity(feature[:, None], prototypes[:, :, :, None, None], dim=2))


def gsc_loss(norm_cam: torch.Tensor, is_cams: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """General-specific consistency: mean |norm_cam - IS_cam / (max_hw IS_cam + 1e-5)|, the max not
    detached (SIPE ``train_resnet50_SIPE.py:151-152``).

    Shape: (B, K, h, w) both; optional ``valid`` (B, h, w) bool restricts the mean to valid pixels.
    """
    target = is_cams / (F.adaptive_max_pool2d(is_cams, 1) + EPS)
    diff = (norm_cam - target).abs()
    if valid is None:
        return diff.mean()
    weight = valid[:, None].to(diff.dtype).expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp(min=1)


def fuse_flips(x: torch.Tensor) -> torch.Tensor:
    """``[views, flipped views]`` -> view + its flip flipped back. Shape: (2B, ...) -> (B, ...)."""
    b = x.shape[0] // 2
    return x[:b] + x[b:].flip(-1)


class SIPE(Method):
    seed_background = True  # cam_with_background(images, labels) scores the background itself (fsae.infer)
    fuses_flips = True  # cam_with_background(..., flip_pairs=True) fuses an image and its flip itself

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = None,
                 side_channels=(128, 128, 256, 256), channels=None, freeze_bn: bool = True,
                 freeze_low_stages: bool = True, score_scale: float = 10.0):
        super().__init__()
        self.num_classes = num_classes
        self.score_scale = score_scale
        self.freeze_bn = freeze_bn
        extra = {"channels": tuple(channels), "stem_width": channels[0]} if channels else {}
        self.features = create_backbone(backbone, output_stride=16, out_indices=(1, 2, 3, 4), **extra)
        load_pretrained(self.features, backbone, weights)
        dims = self.features.feature_channels
        if len(side_channels) != 4:
            raise ValueError(f"sipe.side_channels needs 4 widths (one per stage), got {side_channels}")
        self.sides = nn.ModuleList(nn.Conv2d(d, s, 1, bias=False) for d, s in zip(dims, side_channels))
        self.classifier = nn.Conv2d(dims[-1], num_classes, 1, bias=False)
        if freeze_bn:  # SIPE's FixedBatchNorm: running statistics, in training too
            freeze_batch_norm(self.features)
        if freeze_low_stages:  # SIPE: stage 2's output is detached, the stem and stages 1-2 never train
            freeze_low_stages_(self.features)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "SIPE":
        s = model_cfg.sipe
        return cls(num_classes, backbone=model_cfg.backbone, weights=model_cfg.weights,
                   side_channels=s.side_channels, channels=s.channels, freeze_bn=s.freeze_bn,
                   freeze_low_stages=s.freeze_low_stages, score_scale=model_cfg.score_scale)

    def _trunk(self, images: torch.Tensor):
        x1, x2, x3, x4 = self.features(images)
        sides = [side(x.detach()) for side, x in zip(self.sides, (x1, x2, x3, x4))]
        return x4, hierarchical_features(sides, x3.shape[-2:])

    def _maps(self, images: torch.Tensor, labels: torch.Tensor, training: bool, flip_pairs: bool = False):
        """-> cams (B, C, h, w), norm_cam (B, C+1, h, w), IS-CAM (B, C+1, h, w). ``flip_pairs``: ``images``
        (2B, ...) are ``[views, flipped views]``, whose CAMs and hierarchical features are summed first (SIPE
        network/resnet50_SIPE.py:140-141); the maps are then (B, ...) and ``labels`` the views' (B, C)."""
        x4, hie = self._trunk(images)
        cams = self.classifier(x4)
        if flip_pairs:
            cams, hie = fuse_flips(cams), fuse_flips(hie)
        # SIPE gates the map by the label before the seeds in training only (valid_mask), after the argmax always
        norm_cam = F.interpolate(sipe_norm_cam(cams, labels if training else None), size=hie.shape[-2:],
                                 mode="bilinear", align_corners=True)
        gate = torch.cat([labels, labels.new_ones(labels.shape[0], 1)], dim=1)
        seeds = structure_seeds(norm_cam, gate, x4 if training else hie)  # SIPE: x4 in training
        return cams, norm_cam, is_cam(seed_prototypes(seeds, hie), hie)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        if labels is None:
            raise ValueError("SIPE's forward needs the image-level labels (B, C) for its seeds")
        cams, norm_cam, is_cams = self._maps(images, labels.to(images.dtype), training=True)
        logits = cams.mean(dim=(2, 3))  # GAP of the class score map
        return Output(logits=logits, score_map=self.score_scale * norm_cam,  # FSAE's S: CAM, 1 - max background
                      extras={"norm_cam": norm_cam, "is_cam": is_cams})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        norm_cam = output.extras["norm_cam"]
        valid = batch.get("valid")
        if valid is not None:
            valid = F.interpolate(valid[:, None].float(), size=norm_cam.shape[-2:], mode="nearest")[:, 0] > 0
            valid = valid.to(norm_cam.device)
        return {"cls": F.multilabel_soft_margin_loss(output.logits, batch["label"].to(output.logits)),
                "gsc": gsc_loss(norm_cam, output.extras["is_cam"], valid)}

    @torch.no_grad()
    def cam(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Without labels: ReLU'd classifier CAM (B, C, h, w). With labels (B, C): the IS-CAM's C
        foreground channels (B, C, h, w), absent classes zero."""
        if labels is None:
            x4, _ = self._trunk(images)
            return F.relu(self.classifier(x4))
        return self.cam_with_background(images, labels)[0]

    @torch.no_grad()
    def cam_with_background(self, images: torch.Tensor, labels: torch.Tensor,
                            flip_pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The IS-CAM: foreground (B, C, h, w), absent classes zero, and SIPE's background plane (B, h, w).
        ``flip_pairs``: images (2B, ...) = ``[views, flipped views]``, labels (2B, C) or (B, C); the maps
        are of the fused pairs (B, ...), oriented as the views (``_maps``)."""
        labels = labels.to(images.dtype)
        if flip_pairs:
            labels = labels[: images.shape[0] // 2]
        _, _, is_cams = self._maps(images, labels, training=False, flip_pairs=flip_pairs)
        return is_cams[:, :-1] * labels[:, :, None, None], is_cams[:, -1]

    def param_groups(self) -> list[dict]:
        new = list(self.classifier.parameters()) + list(self.sides.parameters())
        return [{"params": [p for p in self.features.parameters() if p.requires_grad], "new": False},
                {"params": new, "new": True}]
