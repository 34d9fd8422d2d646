"""AffinityNet's pairs, affinities and pair labels on the stride-8 grid (PSA, Ahn & Kwak, CVPR 2018,
Sec. 3.3, eq. 1-7).

Pairs. The directions are IRN's (``fsae.refine.affinity.pair_set``; PSA's ``get_indices_of_pairs``
lists the same offsets ``0 < dy^2 + dx^2 < radius^2`` in the half plane ``dy > 0 or (dy == 0, dx > 0)``).
PSA keeps only pairs whose *source* ``(y, x)`` has its whole half-plane neighbourhood inside the map:
``y < h - (radius - 1)`` and ``radius - 1 <= x < w - (radius - 1)`` (tool/pyutils.py:137-157,
voc12/data.py:138-147); ``pair_window`` marks them. It decides both the training pairs and the walk's
affinity matrix, so pixels in the bottom rows and the side columns are reached only as targets.

Affinity (eq. 3, network/resnet38_aff.py:58): ``a(p, q) = exp(-mean_c |f_c(p) - f_c(q)|)`` of the
AffinityNet features ``f`` (the L1 distance averaged over the channels).

Loss: ``fsae.refine.affinity.affinity_loss``, IRN's and PSA's (train_aff.py:105-113: ``bg/4 + fg/4 + neg/2``),
on the pair labels of ``fsae.refine.affinity.affinity_labels`` restricted to ``pair_window``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsae.refine.affinity import affinity_labels, pair_set


def pair_window(size: tuple[int, int], radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """PSA's pairs: True where the source lies in PSA's window (module docstring). Shape: (D, h, w) bool."""
    h, w = size
    r = radius - 1
    if h <= r or w <= 2 * r:
        raise ValueError(f"a {h} x {w} feature map is too small for PSA's pairs of radius {radius}: it needs at "
                         f"least {r + 1} rows and {2 * r + 1} columns "
                         f"(an image of {8 * (r + 1)} x {8 * (2 * r + 1)} px)")
    inside = torch.zeros((h, w), dtype=torch.bool, device=device)
    inside[: h - r, r: w - r] = True
    return inside.expand(len(pair_set(radius).directions), h, w)


def pair_affinity(features: torch.Tensor, radius: int) -> torch.Tensor:
    """``exp(-mean_c |f(p) - f(p + d)|)`` for every pixel ``p`` and direction ``d`` (eq. 3).

    Shape: features (B, C, h, w) -> (B, D, h, w), directions in ``pair_set(radius)`` order. Pairs whose
    second pixel is outside the map get a meaningless value (the map is zero-padded); ``pair_window``
    excludes them.
    """
    _, _, h, w = features.shape
    r = radius - 1
    padded = F.pad(features, (r, r, 0, r))
    out = []
    for dy, dx in pair_set(radius).directions:
        shifted = padded[:, :, dy:dy + h, r + dx:r + dx + w]
        out.append(torch.exp(-(shifted - features).abs().mean(dim=1)))
    return torch.stack(out, dim=1)


def psa_affinity_labels(labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PSA's pair labels (voc12/data.py:144-173): background-positive, foreground-positive, negative.

    Shape: labels (B, h, w) label space (255 ignore) -> three (B, D, h, w) float {0, 1} maps, zero outside
    ``pair_window``.
    """
    window = pair_window(tuple(labels.shape[-2:]), radius, labels.device).float()
    return tuple(label * window for label in affinity_labels(labels, radius))
