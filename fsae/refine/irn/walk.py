"""Random-walk propagation of CAMs with the affinities of the class-boundary map (IRN Sec. 3.4, eq. 6).

On the stride-4 grid of ``N = h * w`` pixels:

1. ``A`` (N, N): the affinity of every pair within ``radius`` (5 at inference in IRN), from the boundary
   map (``affinity_from_boundary``), symmetric, ``A[p, p] = 1``, zero beyond the radius.
2. ``P = D^-1 A^beta`` with ``D = diag(row sums of A^beta)``: the row-stochastic transition matrix
   (``A^beta`` element-wise, beta = 10; ``fsae.refine.affinity.transition_matrix``, shared with PSA).
3. ``P^(2^exp_times)`` by squaring ``exp_times`` times (IRN: exp_times = 8, a walk of 256 steps).
4. The CAMs, multiplied by ``1 - boundary`` (IRN), propagate: ``v = P^(2^exp_times) x`` per class.

The walk starts from IRN's stride-4 ``cam`` (``step/make_cam.py:32,38-49``): every scale's CAM resized
to the stride-4 grid and summed, max-normalised; ``fsae cam`` stores it as the seed's ``strided`` array
(``irn_start_cams``). Seeds without it (written before, or by a protocol without ``strided_cam``) start
from the full-resolution CAM resized down (``strided_cams``, an approximation).

Pseudo-mask (``walk_to_mask``): the propagated maps are upsampled x4 (bilinear), divided by their global
maximum, a constant background plane ``bg_threshold`` (IRN's sem_seg_bg_thres = 0.25) goes in front, and
the argmax is mapped to the label space ``[0, keys...]``.

SIPE's variant (``make_seg_labels.py:44-54``), for seeds with their own background plane: the walk runs
on ``[background, cams...]`` resized (bilinear) to the stride-4 grid and raised to the power 1.5
(``sipe_start_cams``), background included; the pseudo-mask is the plain argmax, no threshold
(``walk_to_mask(..., own_background=True)``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsae.refine.affinity import dense_pair_matrix, pair_valid, random_walk, transition_matrix
from fsae.refine.irn.affinity import affinity_from_boundary


def dense_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """Affinity matrix of all pixel pairs within ``radius``: symmetric, ones on the diagonal.

    Shape: boundary (h, w) in [0, 1] -> (h*w, h*w); pixels are numbered row-major.
    """
    aff = affinity_from_boundary(boundary[None], radius)[0]  # (D, h, w)
    return dense_pair_matrix(aff, pair_valid(tuple(boundary.shape), radius, boundary.device), radius)


@torch.no_grad()
def propagate(cams: torch.Tensor, boundary: torch.Tensor, radius: int = 5, beta: float = 10.0,
              exp_times: int = 8) -> torch.Tensor:
    """Random walk of the CAMs on the boundary map's affinities (module docstring, steps 1-4).

    Shape: cams (K, h, w), boundary (h, w) in [0, 1] -> (K, h, w).
    """
    k, h, w = cams.shape
    if boundary.shape != (h, w):
        raise ValueError(f"boundary {tuple(boundary.shape)} and CAMs {tuple(cams.shape)} differ in size")
    transition = transition_matrix(dense_affinity(boundary, radius), beta)
    values = (cams * (1 - boundary)).reshape(k, h * w)
    return random_walk(values, transition, exp_times).reshape(k, h, w)


def strided_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Full-resolution seed CAMs -> the stride-4 grid, each class max-normalised again (an approximation
    of IRN's 'cam' for seeds that do not store it, ``irn_start_cams``).

    Shape: (K, H, W) -> (K, h, w) with (h, w) = ``size``; bilinear, area-antialiased.
    """
    if cams.shape[0] == 0:
        return cams.new_zeros((0, *size))
    small = F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return small / (small.flatten(1).amax(dim=1)[:, None, None] + 1e-5)


SIPE_WALK_POWER = 1.5  # SIPE make_seg_labels.py:47


def irn_start_cams(cams: torch.Tensor, strided: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """The walk's start: the seed's stored stride-4 CAM (IRN's ``cam``) when it has one and it fits
    ``size``, else ``strided_cams(cams, size)``. Shape: (K, H, W), (K, h, w) or None -> (K, h, w)."""
    if strided is not None and tuple(strided.shape[-2:]) == tuple(size):
        return strided
    return strided_cams(cams, size)


def load_strided(seed_path) -> np.ndarray | None:
    """The seed file's ``strided`` (K, h, w) stride-4 CAM (``fsae.infer``), float32, or None."""
    with np.load(seed_path, allow_pickle=False) as data:
        return data["strided"].astype(np.float32) if "strided" in data.files else None


def sipe_start_cams(cams: torch.Tensor, background: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """SIPE's walk start: ``[background, cams...]`` bilinear to ``size``, to the power 1.5
    (``make_seg_labels.py:46-47``). Shape: (K, H, W), (H, W) -> (K+1, h, w), background first."""
    maps = torch.cat([background[None], cams])
    small = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return small.pow(SIPE_WALK_POWER)


def walk_to_mask(walked: torch.Tensor, keys: np.ndarray, image_size: tuple[int, int], bg_threshold: float,
                 stride: int = 4, own_background: bool = False) -> np.ndarray:
    """Propagated CAMs -> label-space pseudo-mask (IRN's make_sem_seg_labels).

    Shape: walked (K, h, w) (K+1 with ``own_background``: background first), keys (K,) in 1..C -> (H, W)
    uint8 with values in {0} U keys. Upsampled by ``stride`` (bilinear) and cropped to ``image_size``,
    divided by the global maximum, background plane ``bg_threshold`` in front (with
    ``own_background``: the walked background itself, SIPE), argmax (ties to background).
    """
    height, width = image_size
    if walked.shape[0] == 0:
        return np.zeros(image_size, dtype=np.uint8)
    up = F.interpolate(walked[None], scale_factor=stride, mode="bilinear", align_corners=False)[0, :, :height, :width]
    peak = up.max()
    if not bool(peak > 0):
        return np.zeros(image_size, dtype=np.uint8)
    if own_background:
        scores = up / peak
    else:
        scores = torch.cat([torch.full_like(up[:1], bg_threshold), up / peak])
    labels = np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)
    return labels[scores.argmax(dim=0).cpu().numpy()]
