"""PSA's random walk (Sec. 3.4, eq. 8-10; ``infer_aff.py``, ``network/resnet38_aff.py`` ``to_dense``).

On the stride-8 grid of ``N = h * w`` pixels of the image padded to a multiple of 8:

1. ``A`` (N, N): the AffinityNet affinity of every pair in ``pair_window`` (radius 5), symmetric, ones on
   the diagonal, zero elsewhere.
2. ``T = A^beta / column sums`` (element-wise power, beta 8) and ``T^(2^logt)`` by ``logt`` squarings.
   This is IRN's walk (``fsae.refine.affinity``, shared): with ``A`` symmetric, ``T = P^T`` for its
   row-stochastic ``P = D^-1 A^beta`` and ``x T^n = (P^n x^T)^T``.
3. The scores ``[background, cams...]`` at full resolution, zero-padded to the padded size and 8 x 8
   average-pooled, walk: ``v = x T^(2^logt)``. The background plane is ``(1 - max cams)^alpha`` (PSA,
   alpha 16) or the constant ``bg_threshold`` (MCTformer, 0.39).
4. ``v`` is upsampled to the padded size (bilinear), cropped to the image, and the argmax over
   ``[background, keys...]`` is the pseudo-mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsae.augment import normalize
from fsae.infer import to_tensor_image
from fsae.refine.affinity import dense_pair_matrix, random_walk, transition_matrix
from fsae.refine.psa.affinity import pair_affinity, pair_window
from fsae.refine.psa.config import FEATURE_STRIDE, PSAWalkConfig
from fsae.refine.psa.network import AffinityNet
from fsae.speed import mixed_forward


def dense_affinity(pair_aff: torch.Tensor, radius: int) -> torch.Tensor:
    """PSA's ``to_dense``: the (N, N) affinity matrix of the ``pair_window`` pairs, symmetric, ones on the
    diagonal. Shape: pair_aff (D, h, w) -> (h*w, h*w); pixels numbered row-major."""
    return dense_pair_matrix(pair_aff, pair_window(tuple(pair_aff.shape[1:]), radius, pair_aff.device), radius)


def walk_scores(cams: torch.Tensor, cfg: PSAWalkConfig) -> torch.Tensor:
    """``[background, cams...]`` at full resolution (step 3). Shape: cams (K, H, W) -> (K+1, H, W)."""
    if cfg.background == "constant":
        background = cams.new_full((1, *cams.shape[1:]), cfg.bg_threshold)
    elif len(cams):
        background = (1 - cams.amax(dim=0, keepdim=True)).pow(cfg.alpha)
    else:
        background = cams.new_ones(1, *cams.shape[1:])
    return torch.cat([background, cams])


def propagate(scores: torch.Tensor, features: torch.Tensor, cfg: PSAWalkConfig) -> torch.Tensor:
    """Steps 1-4 up to the upsampled walk. Shape: scores (K+1, H, W), features (C, h, w) of the image padded
    to (8h, 8w) -> (K+1, 8h, 8w)."""
    k1, height, width = scores.shape
    _, h, w = features.shape
    ph, pw = FEATURE_STRIDE * h, FEATURE_STRIDE * w
    transition = transition_matrix(dense_affinity(pair_affinity(features[None], cfg.radius)[0], cfg.radius), cfg.beta)
    padded = F.pad(scores, (0, pw - width, 0, ph - height))
    pooled = F.avg_pool2d(padded[None], FEATURE_STRIDE, FEATURE_STRIDE)[0]  # (K+1, h, w)
    walked = random_walk(pooled.reshape(k1, h * w), transition, cfg.logt).reshape(1, k1, h, w)
    return F.interpolate(walked, size=(ph, pw), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def psa_mask(model: AffinityNet, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, cfg: PSAWalkConfig,
             device: str | torch.device = "cpu") -> np.ndarray:
    """One image's PSA pseudo-mask. Shape: image (H, W, 3) uint8, keys (K,), cams (K, H, W) -> (H, W) uint8
    in {0} U keys."""
    height, width = image.shape[:2]
    if cams.shape[1:] != (height, width):
        raise ValueError(f"CAM size {cams.shape[1:]} does not match image size {(height, width)}")
    if len(keys) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    ph, pw = -(-height // FEATURE_STRIDE) * FEATURE_STRIDE, -(-width // FEATURE_STRIDE) * FEATURE_STRIDE
    x = F.pad(normalize(to_tensor_image(image)).to(device), (0, pw - width, 0, ph - height))  # infer_aff.py:86-89
    features = mixed_forward(model, x[None], precision=cfg.precision)[0]  # the affinities and the walk in fp32
    scores = walk_scores(torch.from_numpy(np.asarray(cams, np.float32)).to(device), cfg)
    walked = propagate(scores, features, cfg)[:, :height, :width]
    labels = np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)
    return labels[walked.argmax(dim=0).cpu().numpy()]
