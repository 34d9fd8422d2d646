"""PPC (Du et al., "Weakly supervised semantic segmentation by pixel-to-prototype contrast", CVPR 2022)
on EPS, with SEAM's pixel correlation module and equivariance terms, as the authors' EPS-branch code.

The network (``PPC.forward``), on top of EPS's C + 1 channel CAM ``cams`` (background LAST):
- a projection head ``proj`` = ReLU(1x1 conv to 128 channels) of the last features;
- SEAM's PCM: a refined CAM ``cams_rv = PCM(seed, f)``: the seed is the max-normalised CAM with
  background 1 - max foreground and only the top foreground class kept per pixel (no gradient); f is a
  1x1 conv of [the image resized to the feature map, ReLU(1x1(conv4)), ReLU(1x1(conv5))] (conv4/conv5
  detached); the affinity ReLU(cos(f_i, f_j)) normalised over i propagates the seed.

``losses`` runs the network on a second view, the crop resized bilinearly to 128 x 128 (so FSAE's
strong view costs only one forward), and returns, as the authors' code sums them:
- ``cls``: (MLSM(view 1) + MLSM(view 2)) / 2 + (minpool(cams_rv 1) + minpool(cams_rv 2)) / 2
  (``adaptive_min_pooling_loss``);
- ``sal``: EPS on cams and on cams_rv of both views, (s(cam1) + s(cam2)) / 2 + (s(rv1) + s(rv2)) / 2;
- ``er``, ``ecr``: SEAM's equivariant regularisation and equivariant cross regularisation on the top
  20 % pixels (``equivariance_losses``);
- ``contrast``: the pixel-to-prototype contrast (``pixel_prototype_contrast``): cross-prototype,
  cross-pseudo-label and intra-view hard-sampled terms, each weighted 0.1, temperature 0.1.
FSAE's score map S is ``cams`` (C + 1 channels); inference uses ``cams`` as EPS does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.config import PPCConfig
from fsae.methods.base import Output
from fsae.methods.eps import EPS, batch_saliency, eps_options, eps_saliency_loss
from fsae.models.resnet38 import ResNet38


def with_background_label(labels: torch.Tensor) -> torch.Tensor:
    """(B, C) multi-hot -> (B, C+1, 1, 1) with a 1 for the background channel (last)."""
    return torch.cat([labels, labels.new_ones(labels.shape[0], 1)], dim=1)[:, :, None, None]


def adaptive_min_pooling_loss(fg_cams: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Mean of ReLU over the k = int(h w fraction) lowest values of the per-pixel max over classes.

    Pushes the least activated quarter of each image towards no class. Shape: (B, C, h, w) -> scalar.
    """
    b, _, h, w = fg_cams.shape
    k = max(1, int(h * w * fraction))
    lowest = fg_cams.max(dim=1).values.flatten(1).topk(k, dim=1, largest=False).values
    return F.relu(lowest).sum() / (k * b)


def min_max_norm(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SEAM's max_norm: p = ReLU(x); ReLU(p - min - eps) / (max - min + eps) per channel. (B, K, h, w)."""
    p = F.relu(cams)
    flat = p.flatten(2)
    mx = flat.max(dim=-1).values[:, :, None, None]
    mn = flat.min(dim=-1).values[:, :, None, None]
    return F.relu(p - mn - eps) / (mx - mn + eps)


def top_class_onehot(maps: torch.Tensor) -> torch.Tensor:
    """Keep each pixel's largest foreground channel (ties kept), zero the other foreground channels; the
    background channel (last) is kept. Shape: (B, C+1, h, w).

    The authors' EPS-branch code zeroes channels 1..C (SEAM's background-first indexing) although its
    background is last; this is the intended operation for the background-last layout.
    """
    fg = maps[:, :-1]
    fg = torch.where(fg < fg.max(dim=1, keepdim=True).values, torch.zeros_like(fg), fg)
    return torch.cat([fg, maps[:, -1:]], dim=1)


def equivariance_losses(cams1: torch.Tensor, cams2: torch.Tensor, rv1: torch.Tensor, rv2: torch.Tensor,
                        labels: torch.Tensor, fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """SEAM's ER and ECR between view 1 (the crop) and view 2 (its resized copy).

    All maps are min-max normalised (``min_max_norm``), view 1 resized bilinearly (align_corners) to
    view 2's size (h, w), multiplied by the label (background channel always kept). Then
        ER  = mean |cam1_c - cam2_c| over the C foreground channels and all pixels;
        the background channel of cam1, cam2 becomes 1 - max over foreground channels;
        ECR = sum over v of mean of the top k = int((C+1) h w fraction) values of
              |onehot(cam_{other view}).detach() - rv_v| per image (``top_class_onehot``).
    Shape: cams1, rv1 (B, C+1, H1, W1); cams2, rv2 (B, C+1, h, w); labels (B, C). Returns (er, ecr).
    """
    size = cams2.shape[-2:]
    num_classes = cams2.shape[1] - 1
    gate = with_background_label(labels.to(cams2))
    up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    c1 = up(min_max_norm(cams1)) * gate
    c2 = min_max_norm(cams2) * gate
    er = (c1[:, :num_classes] - c2[:, :num_classes]).abs().mean()
    c1 = torch.cat([c1[:, :num_classes], 1 - c1[:, :num_classes].max(dim=1, keepdim=True).values], dim=1)
    c2 = torch.cat([c2[:, :num_classes], 1 - c2[:, :num_classes].max(dim=1, keepdim=True).values], dim=1)
    r1 = up(min_max_norm(rv1)) * gate
    r2 = min_max_norm(rv2) * gate
    b = c2.shape[0]
    k = max(1, int(c2[0].numel() * fraction))
    ecr1 = (top_class_onehot(c2.detach()) - r1).abs().reshape(b, -1).topk(k, dim=-1).values.mean()
    ecr2 = (top_class_onehot(c1.detach()) - r2).abs().reshape(b, -1).topk(k, dim=-1).values.mean()
    return er, ecr1 + ecr2


@torch.no_grad()
def pseudo_labels_and_prototypes(cams_rv: torch.Tensor, proj: torch.Tensor, labels: torch.Tensor,
                                 bg_score: float = 0.1, divisor: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel pseudo-labels and L2-normalised class prototypes of one view (no gradient).

    n = min-max normalised ReLU(cams_rv) per channel (values below min + 1e-5 zeroed first, as in the
    authors' code), the background channel set to ``bg_score``; pseudo-label = argmax_k(n_k * label_k).
    Prototype k = normalise(sum_{top i} n_ki f_i / sum n_ki) over the top h*w/divisor pixels of n_k in
    the whole batch (f: projected features, not normalised).
    Shape: cams_rv (B, K, h, w), proj (B, D, h, w), labels (B, K-1) -> ((B*h*w,) long, (K, D)).
    """
    b, k, h, w = cams_rv.shape
    c = F.relu(cams_rv)
    flat = c.flatten(2)
    mx = flat.max(dim=-1).values[:, :, None, None]
    mn = flat.min(dim=-1).values[:, :, None, None]
    c = torch.where(c < mn + 1e-5, torch.zeros_like(c), c)
    norm = (c - mn - 1e-5) / (mx - mn + 1e-5)
    norm[:, -1] = bg_score
    pseudo = (norm * with_background_label(labels.to(norm))).argmax(dim=1).reshape(-1)
    feats = proj.permute(0, 2, 3, 1).reshape(-1, proj.shape[1])  # (B*h*w, D)
    values, indices = norm.transpose(0, 1).reshape(k, -1).topk(max(1, h * w // divisor), dim=-1)
    weighted = (values[:, :, None] * feats[indices]).sum(dim=1)  # (K, D)
    # normalise(weighted / sum(values)) = sign(sum(values)) * normalise(weighted), without 0/0
    prototypes = F.normalize(weighted, dim=-1) * values.sum(dim=1, keepdim=True).sign()
    return pseudo, prototypes


def intra_view_contrast(feats: torch.Tensor, prototypes: torch.Tensor, pseudo: torch.Tensor,
                        temperature: float = 0.1, skip: int = 3, count: int = 10,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """PPC's intra-view term with hard prototype and hard pixel sampling.

    Per pixel i with pseudo-label y: loss_i = -log(exp(f_i.p_y / T) / (exp(f_i.p_y / T) + sum_{n in N_i}
    exp(f_i.p_n / T))), N_i = the prototypes ranked skip+1 .. skip+count by similarity to f_i (the
    authors' ranks 4..13 of 21). Per pseudo-class with n >= 2 pixels: the mean of loss_i over n // 2
    random pixels plus the n // 2 pixels ranked int(0.6 n) - n // 2 .. int(0.6 n) - 1 by ascending
    similarity to their own prototype (semi-hard). The sum over classes is divided by the number of
    classes present (classes with one pixel count but add nothing).
    Shape: feats (P, D) L2-normalised, prototypes (K, D), pseudo (P,) long -> scalar.
    """
    sims = feats @ prototypes.t()  # (P, K)
    positive = sims.gather(1, pseudo[:, None])  # (P, 1)
    k = prototypes.shape[0]
    with torch.no_grad():
        ranked = sims.topk(min(skip + count, k), dim=-1).indices[:, min(skip, k):]
    logits = torch.cat([positive, sims.gather(1, ranked)], dim=1) / temperature
    per_pixel = torch.logsumexp(logits, dim=1) - logits[:, 0]
    similarity = ((positive[:, 0] + 1) / 2).detach()
    total = feats.new_zeros(())
    classes = pseudo.unique()
    for cls in classes.tolist():
        idx = torch.nonzero(pseudo == cls).flatten()
        n = idx.numel()
        if n < 2:
            continue
        random_half = idx[torch.randperm(n, generator=generator)[: n // 2].to(idx.device)]
        top = int(n * 0.6)
        semi_hard = idx[similarity[idx].argsort()[:top][top - n // 2:]]
        total = total + per_pixel[torch.cat([random_half, semi_hard])].mean()
    return total / max(len(classes), 1)


def pixel_prototype_contrast(rv1: torch.Tensor, rv2: torch.Tensor, proj1: torch.Tensor, proj2: torch.Tensor,
                             labels: torch.Tensor, bg_score: float = 0.1, temperature: float = 0.1,
                             weight: float = 0.1, divisor: int = 16,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """PPC's pixel-to-prototype contrast between view 1 and view 2.

    View 1's refined CAM and projection are resized bilinearly (align_corners) to view 2's (h, w).
    Pseudo-labels y_v and prototypes P_v per view (``pseudo_labels_and_prototypes``, no gradient); f_v
    the L2-normalised projected pixels; CE(f P^T / T, y) the mean cross-entropy over pixels.
        cross_prototype = w (CE(f1 P2^T / T, y1) + CE(f2 P1^T / T, y2)) / 2
        cross_label     = w (CE(f1 P1^T / T, y2) + CE(f2 P2^T / T, y1)) / 2
        intra           = w (intra(f1, P1, y1) + intra(f2, P2, y2)) / 2   (``intra_view_contrast``)
    Shape: rv (B, C+1, h_v, w_v), proj (B, D, h_v, w_v), labels (B, C). Returns the three terms and
    their sum under "contrast".
    """
    size = rv2.shape[-2:]
    rv1 = F.interpolate(rv1, size=size, mode="bilinear", align_corners=True)
    proj1 = F.interpolate(proj1, size=size, mode="bilinear", align_corners=True)
    y1, p1 = pseudo_labels_and_prototypes(rv1.detach(), proj1.detach(), labels, bg_score, divisor)
    y2, p2 = pseudo_labels_and_prototypes(rv2.detach(), proj2.detach(), labels, bg_score, divisor)
    f1 = F.normalize(proj1.permute(0, 2, 3, 1).reshape(-1, proj1.shape[1]), dim=-1)
    f2 = F.normalize(proj2.permute(0, 2, 3, 1).reshape(-1, proj2.shape[1]), dim=-1)
    ce = lambda f, p, y: F.cross_entropy(f @ p.t() / temperature, y)  # noqa: E731
    cross_prototype = weight * (ce(f1, p2, y1) + ce(f2, p1, y2)) / 2
    cross_label = weight * (ce(f1, p1, y2) + ce(f2, p2, y1)) / 2
    intra = weight * (intra_view_contrast(f1, p1, y1, temperature, generator=generator)
                      + intra_view_contrast(f2, p2, y2, temperature, generator=generator)) / 2
    return {"cross_prototype": cross_prototype, "cross_label": cross_label, "intra": intra,
            "contrast": cross_prototype + cross_label + intra}


@torch.no_grad()
def pcm_seed(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The PCM's input: ReLU(cam - eps) / (max + eps) per channel, background = 1 - max foreground,
    foreground channels below the pixel's foreground max zeroed. Shape: (B, C+1, h, w), no gradient."""
    c = F.relu(cams.detach())
    norm = F.relu(c - eps) / (c.flatten(2).max(dim=-1).values[:, :, None, None] + eps)
    fg = norm[:, :-1]
    top = fg.max(dim=1, keepdim=True).values
    return torch.cat([torch.where(fg < top, torch.zeros_like(fg), fg), 1 - top], dim=1)


def pcm_propagate(seed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """cam_rv[:, :, j] = sum_i seed[:, :, i] a_ij / (sum_i a_ij + 1e-5), a_ij = ReLU(cos(f_i, f_j)).

    Shape: seed (B, K, h, w), features (B, D, h, w) -> (B, K, h, w).
    """
    b, k, h, w = seed.shape
    f = features.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
    affinity = F.relu(f.transpose(1, 2) @ f)  # (B, hw, hw)
    affinity = affinity / (affinity.sum(dim=1, keepdim=True) + 1e-5)
    return (seed.flatten(2) @ affinity).view(b, k, h, w)


class PPC(EPS):
    """EPS + projection head + PCM; ``losses`` adds the second view, SEAM terms and the contrast."""

    def __init__(self, num_classes: int, backbone: str = "resnet38", output_stride: int = 8,
                 weights: str | None = None, tau: float = 0.4, alpha: float = 0.5, ppc: PPCConfig | None = None,
                 **backbone_kwargs):
        super().__init__(num_classes, backbone, output_stride, weights, tau, alpha, **backbone_kwargs)
        self.cfg = ppc if ppc is not None else PPCConfig()
        dim = self.backbone.out_channels
        self.proj = nn.Conv2d(dim, self.cfg.proj_dim, 1, bias=False)
        if isinstance(self.backbone, ResNet38):  # conv4, conv5 as in SEAM/PPC
            aux_channels = [self.backbone.feature_channels["conv4"], self.backbone.feature_channels["conv5"]]
            pcm_dims = list(self.cfg.pcm_dims)
        else:  # any other backbone: its last feature map
            aux_channels, pcm_dims = [dim], [sum(self.cfg.pcm_dims)]
        self.pcm_proj = nn.ModuleList(nn.Conv2d(c, d, 1, bias=False) for c, d in zip(aux_channels, pcm_dims))
        self.pcm_fuse = nn.Conv2d(sum(pcm_dims) + 3, sum(self.cfg.pcm_dims), 1, bias=False)
        nn.init.xavier_uniform_(self.proj.weight)
        for conv in self.pcm_proj:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.pcm_fuse.weight, gain=4)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "PPC":
        return cls(num_classes, ppc=model_cfg.ppc, **eps_options(model_cfg))

    def feature_levels(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if isinstance(self.backbone, ResNet38):
            d = self.backbone.forward_features(images)
            return d["conv6"], [d["conv4"], d["conv5"]]
        x = self.backbone(images)
        return x, [x]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        x, aux = self.feature_levels(images)
        cams = self.classifier(x)  # (B, C+1, h, w)
        size = cams.shape[-2:]
        proj = F.relu(self.proj(x))
        parts = [F.interpolate(images, size=size, mode="bilinear", align_corners=True)]
        for conv, a in zip(self.pcm_proj, aux):
            a = a.detach()
            if a.shape[-2:] != size:
                a = F.interpolate(a, size=size, mode="bilinear", align_corners=True)
            parts.append(F.relu(conv(a)))
        cams_rv = pcm_propagate(pcm_seed(cams), self.pcm_fuse(torch.cat(parts, dim=1)))
        logits = cams[:, :self.num_classes].mean(dim=(2, 3))
        return Output(logits=logits, score_map=cams,
                      extras={"cams": cams, "cams_rv": cams_rv, "proj": proj, "images": images})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        labels = batch["label"].to(output.logits)
        sal1 = batch_saliency(batch, output.score_map)
        size = (cfg.view_size, cfg.view_size)
        view2 = F.interpolate(output.extras["images"], size=size, mode="bilinear", align_corners=True)
        sal2 = F.interpolate(sal1[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        out2 = self.forward(view2, labels)
        cam1, rv1, cam2, rv2 = output.extras["cams"], output.extras["cams_rv"], out2.extras["cams"], out2.extras["cams_rv"]
        c = self.num_classes
        gate = labels[:, :, None, None]
        cls = (F.multilabel_soft_margin_loss(output.logits, labels)
               + F.multilabel_soft_margin_loss(out2.logits, labels)) / 2
        cls = cls + (adaptive_min_pooling_loss(rv1[:, :c] * gate, cfg.min_pool_fraction)
                     + adaptive_min_pooling_loss(rv2[:, :c] * gate, cfg.min_pool_fraction)) / 2
        s = lambda m, sal: eps_saliency_loss(m, sal, labels, self.tau, self.alpha)[0]  # noqa: E731
        sal = (s(cam1, sal1) + s(cam2, sal2)) / 2 + (s(rv1, sal1) + s(rv2, sal2)) / 2
        er, ecr = equivariance_losses(cam1, cam2, rv1, rv2, labels, cfg.ecr_fraction)
        contrast = pixel_prototype_contrast(rv1, rv2, output.extras["proj"], out2.extras["proj"], labels,
                                            cfg.bg_score, cfg.temperature, cfg.contrast_weight,
                                            cfg.prototype_divisor)["contrast"]
        return {"cls": cls, "sal": sal, "er": er, "ecr": ecr, "contrast": contrast}

    def new_layers(self) -> list[nn.Module]:
        return [self.classifier, self.proj, self.pcm_proj, self.pcm_fuse]
