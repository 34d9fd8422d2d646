"""Inter-pixel affinities on the stride-4 feature grid: pair directions, affinity labels, affinity from
the class-boundary map, and the affinity loss (IRN, Ahn et al., CVPR 2019, Sec. 3.3 and eq. 2-5).

Pairs. A pixel ``p`` is paired with ``p + d`` for every offset ``d = (dy, dx)`` with
``0 < dy^2 + dx^2 < radius^2`` in one half plane (``dy > 0``, or ``dy == 0`` and ``dx > 0``): each
unordered pair appears once. Maps of pair values are ``(B, D, h, w)``: entry ``[b, k, y, x]`` belongs to
the pair ``((y, x), (y + dy_k, x + dx_k))``; ``pair_valid`` marks the pairs whose second pixel lies in
the map. (IRN keeps a fixed index set for its fixed crop: only sources whose whole neighbourhood lies
inside; here every pair with both ends inside is used, the same pairs in the interior plus the border.)

Path. The pixels "on the line" between ``p`` and ``p + d`` are the grid points of the bounding box of
``0`` and ``d`` whose distance to the line through ``0`` and ``d`` is below 1 (IRN's ``PathIndex``); both
ends are on the path.

Affinity from the boundary map ``B`` (IRN eq. 2): ``a(p, q) = 1 - max_{k on path(p, q)} B(k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fsae.labels import IGNORE_INDEX

AFFINITY_EPS = 1e-5  # IRN: -log(a + 1e-5), -log(1 + 1e-5 - a), sums divided by (count + 1e-5)


def search_directions(radius: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2`` in the half plane ``dy > 0 or (dy == 0 and dx > 0)``,
    in IRN's order (row 0 first, then row by row, left to right)."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (at least the 4 nearest neighbours), got {radius}")
    dirs = [(0, dx) for dx in range(1, radius)]
    dirs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius**2]
    return dirs


def line_path(dy: int, dx: int) -> np.ndarray:
    """Grid points between ``(0, 0)`` and ``(dy, dx)``: (L, 2) int64, ``(dy, dx)`` first.

    The points of the bounding box whose squared distance to the line through ``0`` and ``(dy, dx)``,
    ``(dy x - dx y)^2 / (dy^2 + dx^2)``, is below 1; ordered by decreasing ``|y| + |x|``.
    """
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 / length_sq < 1
    ]
    points.sort(key=lambda p: -abs(p[0]) - abs(p[1]))
    return np.asarray(points, dtype=np.int64)


@dataclass(frozen=True)
class PairSet:
    """The pair directions of one radius, grouped by path length (one gather per group).

    ``directions`` (D, 2): offsets in the order of the ``D`` axis of every pair map;
    ``groups``: per path length ``L``, an array (n, L, 2) of the path points of ``n`` consecutive directions.
    """

    radius: int
    directions: np.ndarray
    groups: tuple[np.ndarray, ...]


@lru_cache(maxsize=None)
def pair_set(radius: int) -> PairSet:
    by_length: dict[int, list[np.ndarray]] = {}
    for d in search_directions(radius):
        path = line_path(*d)
        by_length.setdefault(len(path), []).append(path)
    groups = tuple(np.stack(by_length[n]) for n in sorted(by_length))
    directions = np.concatenate([g[:, 0] for g in groups])
    return PairSet(radius, directions, groups)


def _gather_offsets(x: torch.Tensor, offsets: np.ndarray, fill: float) -> torch.Tensor:
    """``out[b, ..., y, x] = x[b, y + oy, x + ox]`` (``fill`` outside the map).

    Shape: x (B, h, w), offsets (..., 2) -> (B, ..., h, w).
    """
    b, h, w = x.shape
    pad = int(np.abs(offsets).max()) if offsets.size else 0
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    off = torch.as_tensor(offsets, device=x.device)
    ys = torch.arange(h, device=x.device).view(h, 1) + pad + off[..., 0, None, None]  # (..., h, 1)
    xs = torch.arange(w, device=x.device).view(1, w) + pad + off[..., 1, None, None]  # (..., 1, w)
    return padded[:, ys, xs]


def pair_valid(size: tuple[int, int], radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """True where the pair's second pixel lies inside an (h, w) map. Shape: (D, h, w) bool."""
    ones = torch.ones((1, *size), device=device)
    return _gather_offsets(ones, pair_set(radius).directions, 0.0)[0] > 0


def affinity_from_boundary(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN eq. 2: ``a(p, p + d) = 1 - max`` of the boundary map along the path from ``p`` to ``p + d``.

    Shape: boundary (B, h, w) in [0, 1] -> (B, D, h, w). Path points outside the map count as boundary 1
    (affinity 0); such pairs are also outside ``pair_valid``.
    """
    pairs = pair_set(radius)
    out = [1 - _gather_offsets(boundary, g, 1.0).amax(dim=2) for g in pairs.groups]  # (B, n, h, w) each
    return torch.cat(out, dim=1)


def affinity_labels(labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels from an IR label map (IRN Sec. 3.3): background-positive, foreground-positive, negative.

    Shape: labels (B, h, w) int, label space (255 ignore) -> three (B, D, h, w) float {0, 1} maps.
    A pair counts only when both pixels are inside the map and neither is ignored; it is positive when the
    two labels are equal (background-positive when that label is 0) and negative otherwise.
    """
    labels = labels.long()
    src = labels[:, None]
    dst = _gather_offsets(labels, pair_set(radius).directions, IGNORE_INDEX)
    valid = (src != IGNORE_INDEX) & (dst != IGNORE_INDEX)
    equal = src == dst
    bg_pos = valid & equal & (src == 0)
    fg_pos = valid & equal & (src > 0)
    neg = valid & ~equal
    return bg_pos.float(), fg_pos.float(), neg.float()


def affinity_loss(
    affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> dict[str, torch.Tensor]:
    """IRN's affinity loss (eq. 3-5): cross-entropy of the pair affinities against the pair labels.

    Shape: all (B, D, h, w) -> scalars ``bg_pos``, ``fg_pos``, ``neg`` and ``total``::

        L_bg  = sum(bg_pos * -log(a + eps))     / (sum(bg_pos) + eps)
        L_fg  = sum(fg_pos * -log(a + eps))     / (sum(fg_pos) + eps)
        L_neg = sum(neg    * -log(1 + eps - a)) / (sum(neg) + eps)
        total = (L_bg / 2 + L_fg / 2 + L_neg) / 2

    (IRN's training step without its displacement terms, eps = 1e-5.)
    """
    pos_term = -torch.log(affinity + AFFINITY_EPS)
    neg_term = -torch.log(1.0 + AFFINITY_EPS - affinity)
    bg = (bg_pos * pos_term).sum() / (bg_pos.sum() + AFFINITY_EPS)
    fg = (fg_pos * pos_term).sum() / (fg_pos.sum() + AFFINITY_EPS)
    ng = (neg * neg_term).sum() / (neg.sum() + AFFINITY_EPS)
    return {"bg_pos": bg, "fg_pos": fg, "neg": ng, "total": (bg / 2 + fg / 2 + ng) / 2}
