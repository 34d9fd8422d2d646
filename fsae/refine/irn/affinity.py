"""IRN's affinity from the class-boundary map (IRN, Ahn et al., CVPR 2019, Sec. 3.3, eq. 2) on the stride-4
feature grid.

``a(p, q) = 1 - max_{k on path(p, q)} B(k)`` for every pair of ``fsae.refine.affinity.pair_set`` (the pairs,
their paths, the pair labels and the loss are shared with PSA there). IRN keeps a fixed index set for its
fixed crop: only sources whose whole neighbourhood lies inside; here every pair with both ends inside
(``pair_valid``) is used, the same pairs in the interior plus the border.
"""

from __future__ import annotations

import torch

from fsae.refine.affinity import gather_offsets, pair_set


def affinity_from_boundary(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN eq. 2: ``a(p, p + d) = 1 - max`` of the boundary map along the path from ``p`` to ``p + d``.

    Shape: boundary (B, h, w) in [0, 1] -> (B, D, h, w). Path points outside the map count as boundary 1
    (affinity 0); such pairs are also outside ``pair_valid``.
    """
    pairs = pair_set(radius)
    out = [1 - gather_offsets(boundary, g, 1.0).amax(dim=2) for g in pairs.groups]  # (B, n, h, w) each
    return torch.cat(out, dim=1)
