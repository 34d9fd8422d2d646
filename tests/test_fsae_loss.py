"""Independent tests of the FSAE online pseudo-labels and loss (fsae/fsae.py, paper eq. 5-9).

Layout under test: score maps (B, C+1, H, W) raw logits, foreground channels 0..C-1 first, the
background channel LAST (index C). Expected values are written out by hand or recomputed by a plain
per-pixel Python reference (math.exp / math.log, explicit neighbourhood loops), never by the code
under test or by torch's own cross-entropy.
"""

from __future__ import annotations

import math

import pytest
import torch

from fsae.fsae import fsae_loss, mask_absent_classes, online_pseudo_label, pseudo_label_parts
from fsae.labels import IGNORE_INDEX, channel_to_label, label_to_channel

# ----------------------------------------------------------------------------------------------
# Hand-worked 1 x 3 x 4 x 4 case (C = 2: channels fg0, fg1, bg)
# ----------------------------------------------------------------------------------------------
# Pixel types (logits fg0, fg1, bg) and their softmax maxima, worked out by hand:
#   A = (5, 0, 0)   fg0 p = e^5 / (e^5 + 2) = 0.98670  -> confident, fg-confident, label 0
#   F = (0, 5, 0)   fg1 p = 0.98670                     -> confident, fg-confident, label 1
#   B = (0, 0, 5)   bg  p = 0.98670                     -> confident (bg), NOT fg-confident, label 2
#   C = (0, 3, 0)   fg1 p = e^3 / (e^3 + 2) = 0.90941  -> passes tau_sae=0.8 only, label 1
#   M = (3, 0, 0)   fg0 p = 0.90941                     -> passes tau_sae only, label 0
#   E = (0, 0, 3)   bg  p = 0.90941                     -> passes tau_sae only, label 2
#   H = (0, 2, 0)   fg1 p = e^2 / (e^2 + 2) = 0.78699  -> just BELOW tau_sae, label 1
#   D = (0.1, 0, 0) fg0 p = e^.1 / (e^.1 + 2) = 0.35591 -> nothing, label 0
A = (5.0, 0.0, 0.0)
F_ = (0.0, 5.0, 0.0)
B_ = (0.0, 0.0, 5.0)
C_ = (0.0, 3.0, 0.0)
M_ = (3.0, 0.0, 0.0)
E_ = (0.0, 0.0, 3.0)
H_ = (0.0, 2.0, 0.0)
D_ = (0.1, 0.0, 0.0)

HAND_GRID = [
    [A, C_, C_, B_],
    [D_, E_, H_, B_],
    [D_, M_, F_, D_],
    [E_, B_, C_, H_],
]

# eq. 5: argmax channel (bg = 2)
HAND_LABELS = [
    [0, 1, 1, 2],
    [0, 2, 1, 2],
    [0, 0, 1, 0],
    [2, 2, 1, 1],
]
# eq. 6: max softmax (bg included) >= 0.95 -> A, F and every B
HAND_CONFIDENT = [
    [1, 0, 0, 1],
    [0, 0, 0, 1],
    [0, 0, 1, 0],
    [0, 1, 0, 0],
]
# max FOREGROUND softmax >= 0.95 -> only A at (0,0) and F at (2,2); bg-confident B is not dilated
HAND_FG_CONFIDENT = [
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
]
# 3x3 dilation of {(0,0), (2,2)} clipped to the image:
#   (0,0) -> rows 0-1, cols 0-1 ; (2,2) -> rows 1-3, cols 1-3 ; minus the two seeds
HAND_RING_K3 = [
    [0, 1, 0, 0],
    [1, 1, 1, 1],
    [0, 1, 0, 1],
    [0, 1, 1, 1],
]
# ring pixels with max softmax >= 0.8: C(0,1) E(1,1) B(1,3) M(2,1) B(3,1) C(3,2);
# D(1,0), H(1,2), D(2,3), H(3,3) fail. C(0,2) and E(3,0) pass 0.8 but are outside the ring.
HAND_BOUNDARY_K3 = [
    [0, 1, 0, 0],
    [0, 1, 0, 1],
    [0, 1, 0, 0],
    [0, 1, 1, 0],
]
# eq. 8: confident OR boundary (9 pixels)
HAND_MASK_K3 = [
    [1, 1, 0, 1],
    [0, 1, 0, 1],
    [0, 1, 1, 0],
    [0, 1, 1, 0],
]
# 5x5 dilation: (2,2) reaches the whole 4x4 image, so the ring is every non-seed pixel.
HAND_RING_K5 = [
    [0, 1, 1, 1],
    [1, 1, 1, 1],
    [1, 1, 0, 1],
    [1, 1, 1, 1],
]
HAND_BOUNDARY_K5 = [  # every non-seed pixel of types B, C, M, E
    [0, 1, 1, 1],
    [0, 1, 0, 1],
    [0, 1, 0, 0],
    [1, 1, 1, 0],
]
HAND_MASK_K5 = [
    [1, 1, 1, 1],
    [0, 1, 0, 1],
    [0, 1, 1, 0],
    [1, 1, 1, 0],
]


def _hand_source(dtype=torch.float32) -> torch.Tensor:
    s = torch.zeros(1, 3, 4, 4, dtype=dtype)
    for i in range(4):
        for j in range(4):
            for c in range(3):
                s[0, c, i, j] = HAND_GRID[i][j][c]
    return s


def _hand_target(dtype=torch.float32) -> torch.Tensor:
    """Target logits at pixel (i, j): (fg0, fg1, bg) = (i, j, 1)."""
    t = torch.zeros(1, 3, 4, 4, dtype=dtype)
    for i in range(4):
        for j in range(4):
            t[0, 0, i, j] = float(i)
            t[0, 1, i, j] = float(j)
            t[0, 2, i, j] = 1.0
    return t


def _grid(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)[None]


def _ce_by_hand(logits, label) -> float:
    """-log softmax(logits)[label], written out with math.exp / math.log."""
    denom = sum(math.exp(v) for v in logits)
    return -math.log(math.exp(logits[label]) / denom)


def test_hand_case_probabilities_are_what_the_comments_say():
    # Sanity of the construction itself (so the literal grids below are justified).
    p5 = math.exp(5) / (math.exp(5) + 2)
    p3 = math.exp(3) / (math.exp(3) + 2)
    p2 = math.exp(2) / (math.exp(2) + 2)
    pd = math.exp(0.1) / (math.exp(0.1) + 2)
    assert p5 >= 0.95
    assert 0.8 <= p3 < 0.95
    assert p2 < 0.8
    assert pd < 0.8
    prob = _hand_source().softmax(1)[0]
    assert abs(prob[0, 0, 0].item() - p5) < 1e-6
    assert abs(prob[1, 0, 1].item() - p3) < 1e-6
    assert abs(prob[1, 1, 2].item() - p2) < 1e-6


def test_hand_case_parts_k3():
    parts = pseudo_label_parts(_hand_source(), tau_fae=0.95, tau_sae=0.8, kernel_size=3, use_sae=True)
    assert parts["labels"].dtype == torch.long
    assert torch.equal(parts["labels"], torch.tensor(HAND_LABELS)[None]), "eq. 5 argmax labels wrong"
    assert torch.equal(parts["confident"], _grid(HAND_CONFIDENT)), "eq. 6 confident mask wrong"
    assert torch.equal(parts["fg_confident"], _grid(HAND_FG_CONFIDENT)), (
        "fg_confident must use the max over FOREGROUND channels only"
    )
    assert torch.equal(parts["ring"], _grid(HAND_RING_K3)), (
        "ring must be dilate(fg_confident) - fg_confident (3x3, clipped at the border)"
    )
    assert torch.equal(parts["boundary"], _grid(HAND_BOUNDARY_K3)), "eq. 7 boundary wrong"
    assert torch.equal(parts["mask"], _grid(HAND_MASK_K3)), "eq. 8 mask wrong"


def test_hand_case_online_pseudo_label_k3_and_no_sae():
    labels, mask = online_pseudo_label(_hand_source(), tau_fae=0.95, tau_sae=0.8, kernel_size=3)
    assert labels.dtype == torch.long and mask.dtype == torch.bool
    assert labels.shape == (1, 4, 4) and mask.shape == (1, 4, 4)
    assert torch.equal(labels, torch.tensor(HAND_LABELS)[None])
    assert torch.equal(mask, _grid(HAND_MASK_K3))

    labels, mask = online_pseudo_label(_hand_source(), tau_fae=0.95, tau_sae=0.8, use_sae=False)
    assert torch.equal(labels, torch.tensor(HAND_LABELS)[None])
    assert torch.equal(mask, _grid(HAND_CONFIDENT)), "without SAE the mask is exactly M (eq. 6)"

    # defaults are tau_fae=0.95, tau_sae=0.8, k=3, use_sae=True
    labels, mask = online_pseudo_label(_hand_source())
    assert torch.equal(mask, _grid(HAND_MASK_K3))


def test_hand_case_parts_k5():
    parts = pseudo_label_parts(_hand_source(), tau_fae=0.95, tau_sae=0.8, kernel_size=5, use_sae=True)
    assert torch.equal(parts["ring"], _grid(HAND_RING_K5))
    assert torch.equal(parts["boundary"], _grid(HAND_BOUNDARY_K5))
    assert torch.equal(parts["mask"], _grid(HAND_MASK_K5))


# The 9 masked pixels of the k=3 case: (target logits (i, j, 1), pseudo-label), written out.
HAND_MASKED_K3 = [
    ((0.0, 0.0, 1.0), 0),  # (0,0) A
    ((0.0, 1.0, 1.0), 1),  # (0,1) C boundary
    ((0.0, 3.0, 1.0), 2),  # (0,3) B confident
    ((1.0, 1.0, 1.0), 2),  # (1,1) E boundary
    ((1.0, 3.0, 1.0), 2),  # (1,3) B
    ((2.0, 1.0, 1.0), 0),  # (2,1) M boundary
    ((2.0, 2.0, 1.0), 1),  # (2,2) F
    ((3.0, 1.0, 1.0), 2),  # (3,1) B
    ((3.0, 2.0, 1.0), 1),  # (3,2) C boundary
]
HAND_CONFIDENT_ONLY = [HAND_MASKED_K3[k] for k in (0, 2, 4, 6, 7)]


def test_hand_case_loss_values_both_reductions():
    total = sum(_ce_by_hand(t, y) for t, y in HAND_MASKED_K3)
    # explicit spot check of one term: pixel (2,1), logits (2,1,1), label 0
    assert abs(_ce_by_hand((2.0, 1.0, 1.0), 0) - (math.log(math.exp(2) + 2 * math.e) - 2.0)) < 1e-12

    src, tgt = _hand_source(), _hand_target()
    loss, stats = fsae_loss(src, tgt, tau_fae=0.95, tau_sae=0.8, kernel_size=3, weight=1.0,
                            reduction="mean")
    assert loss.dim() == 0
    assert abs(loss.item() - total / 16) < 1e-6, "reduction='mean' must divide by all B*H*W = 16 pixels"

    loss, _ = fsae_loss(src, tgt, tau_fae=0.95, tau_sae=0.8, kernel_size=3, weight=1.0,
                        reduction="masked_mean")
    assert abs(loss.item() - total / 9) < 1e-6, "reduction='masked_mean' must divide by 9 masked pixels"

    loss, _ = fsae_loss(src, tgt, tau_fae=0.95, tau_sae=0.8, kernel_size=3, weight=0.25,
                        reduction="mean")
    assert abs(loss.item() - 0.25 * total / 16) < 1e-6, "weight lambda must scale the loss"

    conf_total = sum(_ce_by_hand(t, y) for t, y in HAND_CONFIDENT_ONLY)
    loss, _ = fsae_loss(src, tgt, use_sae=False, reduction="mean")
    assert abs(loss.item() - conf_total / 16) < 1e-6
    loss, _ = fsae_loss(src, tgt, use_sae=False, reduction="masked_mean")
    assert abs(loss.item() - conf_total / 5) < 1e-6

    # stats, counted by hand from the literal grids
    assert stats["mask_ratio"] == pytest.approx(9 / 16)
    assert stats["confident_ratio"] == pytest.approx(5 / 16)
    assert stats["fg_confident_ratio"] == pytest.approx(2 / 16)
    assert stats["ring_ratio"] == pytest.approx(10 / 16)
    assert stats["boundary_ratio"] == pytest.approx(6 / 16)
    assert stats["sae_added_ratio"] == pytest.approx(4 / 16)  # mask 9 minus the 5 already confident
    for key in ("mask_ratio", "confident_ratio", "fg_confident_ratio", "ring_ratio", "boundary_ratio"):
        # statistics stay 0-dim tensors (numbers only at log steps, fsae/train.py)
        assert isinstance(stats[key], torch.Tensor) and stats[key].dim() == 0
    assert "pl_accuracy" not in stats and "pl_count" not in stats


def test_thresholds_are_inclusive():
    # C = 1: logits (0, 0) give softmax exactly 0.5 in both channels.
    s = torch.zeros(1, 2, 1, 1)
    parts = pseudo_label_parts(s, tau_fae=0.5, tau_sae=0.5, kernel_size=1)
    assert parts["confident"].all(), "M_i uses >= tau_FAE"
    assert parts["fg_confident"].all()
    parts = pseudo_label_parts(s, tau_fae=0.5 + 1e-6, tau_sae=0.5, kernel_size=1)
    assert not parts["confident"].any()
    # boundary threshold is inclusive too: fg seed (0,0) with p>=0.95, neighbour at exactly 0.5
    s = torch.zeros(1, 2, 1, 2)
    s[0, 0, 0, 0] = 10.0
    parts = pseudo_label_parts(s, tau_fae=0.95, tau_sae=0.5, kernel_size=3)
    assert parts["ring"].tolist() == [[[False, True]]]
    assert parts["boundary"].tolist() == [[[False, True]]], "M_bdry uses >= tau_SAE"
    assert parts["mask"].tolist() == [[[True, True]]]


def test_kernel_size_one_means_no_expansion():
    parts = pseudo_label_parts(_hand_source(), kernel_size=1, use_sae=True)
    assert not parts["ring"].any()
    assert torch.equal(parts["mask"], _grid(HAND_CONFIDENT))


# ----------------------------------------------------------------------------------------------
# Plain per-pixel reference
# ----------------------------------------------------------------------------------------------
def _ref_softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _ref_pseudo_label(src, tau_fae, tau_sae, k, use_sae):
    """src: nested python lists [b][c][i][j]. Returns dict of nested lists [b][i][j]."""
    B, C1, H, W = len(src), len(src[0]), len(src[0][0]), len(src[0][0][0])
    C = C1 - 1
    out = {key: [[[None] * W for _ in range(H)] for _ in range(B)]
           for key in ("labels", "confident", "fg_confident", "ring", "boundary", "mask", "maxp")}
    for b in range(B):
        for i in range(H):
            for j in range(W):
                p = _ref_softmax([src[b][c][i][j] for c in range(C1)])
                best = 0
                for c in range(1, C1):
                    if p[c] > p[best]:
                        best = c
                out["labels"][b][i][j] = best
                out["maxp"][b][i][j] = p[best]
                out["confident"][b][i][j] = p[best] >= tau_fae
                out["fg_confident"][b][i][j] = max(p[:C]) >= tau_fae
        r = k // 2
        for i in range(H):
            for j in range(W):
                dil = False
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        ii, jj = i + di, j + dj
                        if 0 <= ii < H and 0 <= jj < W and out["fg_confident"][b][ii][jj]:
                            dil = True
                ring = use_sae and dil and not out["fg_confident"][b][i][j]
                bdry = ring and out["maxp"][b][i][j] >= tau_sae
                out["ring"][b][i][j] = ring
                out["boundary"][b][i][j] = bdry
                out["mask"][b][i][j] = out["confident"][b][i][j] or bdry
    return out


def _ref_loss(src, tgt, tau_fae, tau_sae, k, weight, use_sae, reduction, valid=None):
    pl = _ref_pseudo_label(src, tau_fae, tau_sae, k, use_sae)
    B, C1, H, W = len(src), len(src[0]), len(src[0][0]), len(src[0][0][0])
    total, count = 0.0, 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                m = pl["mask"][b][i][j] and (valid is None or valid[b][i][j])
                if not m:
                    continue
                pt = _ref_softmax([tgt[b][c][i][j] for c in range(C1)])
                total += -math.log(pt[pl["labels"][b][i][j]])
                count += 1
    denom = B * H * W if reduction == "mean" else max(count, 1)
    return weight * total / denom, pl, count


def _random_scores(seed, B=2, C=3, H=6, W=6, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, C + 1, H, W, generator=g, dtype=torch.float64) * scale
    tgt = torch.randn(B, C + 1, H, W, generator=g, dtype=torch.float64) * 2.0
    return src, tgt


def _bool_list(t):
    return [[[bool(x) for x in row] for row in img] for img in t.tolist()]


CONFIGS = [
    # (tau_fae, tau_sae, k, use_sae, reduction, weight)
    (0.95, 0.8, 3, True, "mean", 1.0),
    (0.95, 0.8, 3, True, "masked_mean", 1.0),
    (0.95, 0.8, 5, True, "mean", 0.5),
    (0.95, 0.8, 5, True, "masked_mean", 2.0),
    (0.95, 0.8, 3, False, "mean", 1.0),
    (0.95, 0.8, 3, False, "masked_mean", 0.3),
    (0.9, 0.6, 3, True, "mean", 1.5),
    (0.85, 0.5, 5, True, "masked_mean", 1.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_plain_reference(seed):
    src, tgt = _random_scores(seed)
    src_l, tgt_l = src.tolist(), tgt.tolist()
    for tau_fae, tau_sae, k, use_sae, reduction, weight in CONFIGS:
        ref, pl, _ = _ref_loss(src_l, tgt_l, tau_fae, tau_sae, k, weight, use_sae, reduction)
        loss, stats = fsae_loss(src, tgt, tau_fae=tau_fae, tau_sae=tau_sae, kernel_size=k,
                                weight=weight, use_sae=use_sae, reduction=reduction)
        cfg = (seed, tau_fae, tau_sae, k, use_sae, reduction, weight)
        assert abs(loss.item() - ref) <= 1e-6 * max(1.0, abs(ref)), f"loss {loss.item()} != ref {ref} for {cfg}"

        labels, mask = online_pseudo_label(src, tau_fae=tau_fae, tau_sae=tau_sae, kernel_size=k,
                                           use_sae=use_sae)
        assert labels.tolist() == pl["labels"], cfg
        assert _bool_list(mask) == pl["mask"], cfg

        parts = pseudo_label_parts(src, tau_fae, tau_sae, k, use_sae)
        for key in ("confident", "fg_confident", "ring", "boundary", "mask"):
            assert _bool_list(parts[key]) == pl[key], (key, cfg)

        n = src.shape[0] * src.shape[2] * src.shape[3]

        def ratio(key):
            return sum(v for img in pl[key] for row in img for v in row) / n

        assert stats["mask_ratio"] == pytest.approx(ratio("mask"))
        assert stats["confident_ratio"] == pytest.approx(ratio("confident"))
        assert stats["fg_confident_ratio"] == pytest.approx(ratio("fg_confident"))
        assert stats["ring_ratio"] == pytest.approx(ratio("ring"))
        assert stats["boundary_ratio"] == pytest.approx(ratio("boundary"))
        assert stats["sae_added_ratio"] == pytest.approx(ratio("mask") - ratio("confident"))


def test_reference_inputs_exercise_every_branch():
    """The random inputs above are not degenerate: they contain confident, fg-confident, bg-confident,
    ring pixels that pass and that fail tau_sae, and expansions that differ between k=3 and k=5."""
    seen = {"bg_conf": 0, "ring_pass": 0, "ring_fail": 0, "outside_ring_pass": 0, "k5_diff": 0}
    for seed in range(4):
        src, _ = _random_scores(seed)
        s = src.tolist()
        p3 = _ref_pseudo_label(s, 0.95, 0.8, 3, True)
        p5 = _ref_pseudo_label(s, 0.95, 0.8, 5, True)
        for b in range(2):
            for i in range(6):
                for j in range(6):
                    if p3["confident"][b][i][j] and not p3["fg_confident"][b][i][j]:
                        seen["bg_conf"] += 1
                    if p3["ring"][b][i][j] and p3["boundary"][b][i][j] and not p3["confident"][b][i][j]:
                        seen["ring_pass"] += 1
                    if p3["ring"][b][i][j] and not p3["boundary"][b][i][j]:
                        seen["ring_fail"] += 1
                    if (not p3["ring"][b][i][j] and not p3["confident"][b][i][j]
                            and p3["maxp"][b][i][j] >= 0.8):
                        seen["outside_ring_pass"] += 1
                    if p3["mask"][b][i][j] != p5["mask"][b][i][j]:
                        seen["k5_diff"] += 1
    for key, v in seen.items():
        assert v > 0, f"random reference inputs never exercise {key}"


def test_float32_inputs_match_reference():
    src, tgt = _random_scores(7)
    src32, tgt32 = src.float(), tgt.float()
    ref, _, _ = _ref_loss(src32.double().tolist(), tgt32.double().tolist(), 0.95, 0.8, 3, 1.0, True,
                          "mean")
    loss, _ = fsae_loss(src32, tgt32)
    assert abs(loss.item() - ref) < 1e-5


def test_batch_items_do_not_dilate_into_each_other():
    # image 0: a single fg-confident pixel in a corner; image 1: all pixels at 0.9 confidence for fg0
    s = torch.zeros(2, 2, 3, 3)
    s[0, 1] = 0.0
    s[0, 0] = -10.0
    s[0, 0, 0, 0] = 10.0  # fg-confident seed in image 0 only
    s[0, 1, 2, 2] = 0.0
    s[1, 0] = math.log(9.0)  # p(fg0) = 0.9 everywhere in image 1, no seed
    parts = pseudo_label_parts(s, tau_fae=0.95, tau_sae=0.8, kernel_size=3)
    assert not parts["ring"][1].any(), "dilation must not leak across batch items"
    assert parts["ring"][0].tolist() == [[False, True, False], [True, True, False], [False, False, False]]


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
def test_gradient_only_target_and_only_masked_pixels():
    src = _hand_source().requires_grad_(True)
    tgt = _hand_target().requires_grad_(True)
    loss, _ = fsae_loss(src, tgt, reduction="mean", weight=0.5)
    assert loss.requires_grad
    loss.backward()
    assert src.grad is None or torch.count_nonzero(src.grad) == 0, "source scores must get no gradient"
    assert tgt.grad is not None
    mask = _grid(HAND_MASK_K3)[0]
    per_pixel = tgt.grad[0].abs().sum(0)  # (4, 4)
    assert (per_pixel[mask] > 0).all(), "every masked pixel must get gradient"
    assert (per_pixel[~mask] == 0).all(), "unmasked pixels must get exactly zero gradient"
    # analytic gradient: weight / N * (softmax(t) - onehot(label)) on masked pixels
    labels = torch.tensor(HAND_LABELS)
    for i in range(4):
        for j in range(4):
            t = [float(i), float(j), 1.0]
            p = _ref_softmax(t)
            for c in range(3):
                expected = 0.5 / 16 * (p[c] - (1.0 if c == labels[i, j] else 0.0)) if mask[i, j] else 0.0
                assert abs(tgt.grad[0, c, i, j].item() - expected) < 1e-6, (i, j, c)


def test_gradient_masked_mean_and_random():
    src, tgt = _random_scores(3)
    src.requires_grad_(True)
    tgt.requires_grad_(True)
    loss, _ = fsae_loss(src, tgt, reduction="masked_mean")
    loss.backward()
    assert src.grad is None or torch.count_nonzero(src.grad) == 0
    _, mask = online_pseudo_label(src.detach())
    assert mask.any() and (~mask).any()
    per_pixel = tgt.grad.abs().sum(1)
    assert (per_pixel[mask] > 0).all()
    assert (per_pixel[~mask] == 0).all()


def test_online_pseudo_label_has_no_grad():
    src = _hand_source().requires_grad_(True)
    labels, mask = online_pseudo_label(src)
    assert not labels.requires_grad and not mask.requires_grad


# ----------------------------------------------------------------------------------------------
# No confident pixel
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "masked_mean"])
@pytest.mark.parametrize("use_sae", [True, False])
def test_nothing_confident_gives_finite_zero_with_grad(reduction, use_sae):
    src = torch.zeros(2, 4, 5, 5)  # softmax 0.25 everywhere
    tgt = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    loss, stats = fsae_loss(src, tgt, reduction=reduction, use_sae=use_sae)
    assert torch.isfinite(loss)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert tgt.grad is not None
    assert torch.isfinite(tgt.grad).all()
    assert torch.count_nonzero(tgt.grad) == 0
    assert stats["mask_ratio"] == 0.0
    assert stats["confident_ratio"] == 0.0


def test_nothing_confident_with_gt_gives_nan_accuracy_and_zero_count():
    src = torch.zeros(1, 3, 2, 2)
    gt = torch.zeros(1, 2, 2, dtype=torch.long)
    _, stats = fsae_loss(src, torch.zeros(1, 3, 2, 2), gt=gt)
    assert stats["pl_count"] == 0
    assert math.isnan(stats["pl_accuracy"])


# ----------------------------------------------------------------------------------------------
# valid and gt
# ----------------------------------------------------------------------------------------------
def test_valid_excludes_pixels_from_loss_and_mask():
    src, tgt = _hand_source(), _hand_target()
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, :] = False  # drop row 0: masked pixels (0,0), (0,1), (0,3)
    kept = [(t, y) for (t, y) in HAND_MASKED_K3 if t[0] != 0.0]  # target fg0 logit == row index
    assert len(kept) == 6
    total = sum(_ce_by_hand(t, y) for t, y in kept)

    loss, stats = fsae_loss(src, tgt, valid=valid, reduction="mean")
    assert abs(loss.item() - total / 16) < 1e-6, "'mean' still divides by all B*H*W pixels"
    assert stats["mask_ratio"] == pytest.approx(6 / 16)
    loss, _ = fsae_loss(src, tgt, valid=valid, reduction="masked_mean")
    assert abs(loss.item() - total / 6) < 1e-6

    # a uint8/float valid map works the same
    loss2, _ = fsae_loss(src, tgt, valid=valid.float(), reduction="masked_mean")
    assert abs(loss2.item() - total / 6) < 1e-6

    # all invalid -> zero, finite, gradient-carrying
    t = tgt.clone().requires_grad_(True)
    loss, _ = fsae_loss(src, t, valid=torch.zeros(1, 4, 4, dtype=torch.bool), reduction="masked_mean")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(t.grad) == 0


def test_valid_matches_reference():
    src, tgt = _random_scores(11)
    g = torch.Generator().manual_seed(5)
    valid = torch.rand(2, 6, 6, generator=g) > 0.3
    for reduction in ("mean", "masked_mean"):
        ref, _, _ = _ref_loss(src.tolist(), tgt.tolist(), 0.95, 0.8, 3, 1.0, True, reduction,
                              valid=valid.tolist())
        loss, _ = fsae_loss(src, tgt, valid=valid, reduction=reduction)
        assert abs(loss.item() - ref) <= 1e-6 * max(1.0, abs(ref))


def test_gt_accuracy_by_hand():
    # Masked pixels (k=3) and their pseudo-labels in CHANNEL space (bg = 2):
    #   (0,0)->0, (0,1)->1, (0,3)->2, (1,1)->2, (1,3)->2, (2,1)->0, (2,2)->1, (3,1)->2, (3,2)->1
    # in LABEL space (bg = 0, channel c -> c + 1):
    #   (0,0)->1, (0,1)->2, (0,3)->0, (1,1)->0, (1,3)->0, (2,1)->1, (2,2)->2, (3,1)->0, (3,2)->2
    gt = torch.tensor([[
        [1, 2, 9, 0],      # (0,0) ok, (0,1) ok, (0,2) unmasked, (0,3) ok
        [7, 2, 7, 255],    # (1,1) WRONG (gt 2, pl bg), (1,3) ignored
        [7, 1, 2, 7],      # (2,1) ok, (2,2) ok
        [7, 255, 1, 7],    # (3,1) ignored, (3,2) WRONG (gt 1, pl 2)
    ]])
    # counted: 9 masked - 2 ignored = 7; correct: (0,0) (0,1) (0,3) (2,1) (2,2) = 5
    _, stats = fsae_loss(_hand_source(), _hand_target(), gt=gt)
    assert stats["pl_count"] == 7
    assert stats["pl_accuracy"] == pytest.approx(5 / 7), (
        "pl_accuracy must compare channel_to_label(pseudo-label) with gt (bg channel C <-> label 0)"
    )

    # a gt equal to the pseudo-labels in label space -> accuracy 1 on all 9 masked pixels
    gt_perfect = channel_to_label(torch.tensor(HAND_LABELS)[None], 2)
    _, stats = fsae_loss(_hand_source(), _hand_target(), gt=gt_perfect)
    assert stats["pl_count"] == 9 and stats["pl_accuracy"] == 1.0
    # the raw channel indices (bg = 2, no +1 shift) must NOT score perfectly
    _, stats = fsae_loss(_hand_source(), _hand_target(), gt=torch.tensor(HAND_LABELS)[None])
    assert stats["pl_accuracy"] == 0.0

    # valid also restricts what is counted
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 1, 1] = False  # drop the wrong (1,1)
    _, stats = fsae_loss(_hand_source(), _hand_target(), gt=gt, valid=valid)
    assert stats["pl_count"] == 6
    assert stats["pl_accuracy"] == pytest.approx(5 / 6)

    with pytest.raises(ValueError):
        fsae_loss(_hand_source(), _hand_target(), gt=torch.zeros(1, 4, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# mask_absent_classes
# ----------------------------------------------------------------------------------------------
def test_mask_absent_classes_by_hand():
    scores = torch.tensor([
        [[[2.0, -3.0]], [[-1.5, 4.0]], [[0.5, -0.7]]],   # image 0: fg0, fg1, bg
        [[[1.0, 1.0]], [[-2.0, 3.0]], [[-4.0, 6.0]]],    # image 1
    ])  # (2, 3, 1, 2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = mask_absent_classes(scores, labels)
    expected = torch.tensor([
        [[[2.0, -3.0]], [[0.0, 0.0]], [[0.5, -0.7]]],    # fg1 absent -> 0 (not -inf); bg kept
        [[[0.0, 0.0]], [[-2.0, 3.0]], [[-4.0, 6.0]]],    # fg0 absent -> 0; bg kept
    ])
    assert out.shape == scores.shape
    assert torch.equal(out, expected)
    assert torch.isfinite(out).all(), "absent classes become 0, not -inf"

    # integer / bool labels work the same
    assert torch.equal(mask_absent_classes(scores, labels.long()), expected)
    assert torch.equal(mask_absent_classes(scores, labels.bool()), expected)
    # all classes present -> unchanged; softmax then runs over all C+1 channels
    assert torch.equal(mask_absent_classes(scores, torch.ones(2, 2)), scores)
    # gradient flows through present channels only
    s = scores.clone().requires_grad_(True)
    mask_absent_classes(s, labels).sum().backward()
    assert torch.equal(s.grad, torch.tensor([
        [[[1.0, 1.0]], [[0.0, 0.0]], [[1.0, 1.0]]],
        [[[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]],
    ]))


@pytest.mark.parametrize("bad_shape", [(2, 3), (2,), (1, 2), (2, 2, 1), (2, 1)])
def test_mask_absent_classes_wrong_label_shape(bad_shape):
    scores = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError):
        mask_absent_classes(scores, torch.ones(bad_shape))


def test_mask_absent_then_pseudo_label():
    # a strongly activated but absent class must not become the pseudo-label
    s = torch.zeros(1, 3, 1, 1)
    s[0, 0, 0, 0] = 10.0  # fg0 (absent)
    s[0, 2, 0, 0] = 4.0  # bg
    masked = mask_absent_classes(s, torch.tensor([[0.0, 1.0]]))
    labels, mask = online_pseudo_label(masked)
    assert labels.item() == 2  # bg: logits (0, 0, 4) -> p_bg = e^4 / (e^4 + 2) = 0.9647
    assert mask.item() is True


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------
def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        fsae_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError):
        fsae_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError):
        fsae_loss(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("k", [0, 2, 4, -1, -3])
def test_bad_kernel_size_raises(k):
    with pytest.raises(ValueError):
        fsae_loss(_hand_source(), _hand_target(), kernel_size=k, use_sae=True)
    with pytest.raises(ValueError):
        online_pseudo_label(_hand_source(), kernel_size=k, use_sae=True)


@pytest.mark.parametrize("reduction", ["sum", "none", "MEAN", ""])
def test_bad_reduction_raises(reduction):
    with pytest.raises(ValueError):
        fsae_loss(_hand_source(), _hand_target(), reduction=reduction)


def test_non_4d_source_raises():
    with pytest.raises(ValueError):
        online_pseudo_label(torch.zeros(3, 4, 4))


# ----------------------------------------------------------------------------------------------
# Label-space conversions
# ----------------------------------------------------------------------------------------------
def test_channel_label_conversions_by_hand():
    C = 3
    channels = torch.tensor([0, 1, 2, 3, IGNORE_INDEX])
    labels = torch.tensor([1, 2, 3, 0, IGNORE_INDEX])
    assert torch.equal(channel_to_label(channels, C), labels)
    assert torch.equal(label_to_channel(labels, C), channels)


@pytest.mark.parametrize("C", [1, 2, 20])
def test_channel_label_round_trip(C):
    channels = torch.tensor(list(range(C + 1)) + [IGNORE_INDEX]).reshape(1, 1, -1)
    labels = torch.tensor(list(range(C + 1)) + [IGNORE_INDEX]).reshape(1, 1, -1)
    assert torch.equal(label_to_channel(channel_to_label(channels, C), C), channels)
    assert torch.equal(channel_to_label(label_to_channel(labels, C), C), labels)
    assert channel_to_label(torch.tensor([C]), C).item() == 0, "bg channel C -> label 0"
    assert label_to_channel(torch.tensor([0]), C).item() == C, "label 0 -> bg channel C"
    for c in range(C):
        assert channel_to_label(torch.tensor([c]), C).item() == c + 1


def test_two_term_loss_form_counts_the_overlap_twice():
    # The FSAE authors' loss (obeychoi0120/wseg ssl, module/train.py:396-403), written plainly:
    # mean(CE * M) + lambda * mean(CE * M_bdry), means over all pixels. C = 1, background last, 1 x 3 pixels:
    # pixel 0 foreground-confident, pixel 1 background-confident AND in the SAE ring of pixel 0 (M and
    # M_bdry overlap there), pixel 2 a tie (in no mask).
    source = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]]).view(1, 2, 1, 3)
    target = torch.tensor([[1.0, 0.5, 3.0], [2.0, -1.0, 3.0]]).view(1, 2, 1, 3)
    parts = pseudo_label_parts(source, kernel_size=3)
    assert parts["confident"].flatten().tolist() == [True, True, False]
    assert parts["boundary"].flatten().tolist() == [False, True, False]

    def ce(fg, bg, channel):  # -log softmax([fg, bg])[channel]
        return -math.log(math.exp((fg, bg)[channel]) / (math.exp(fg) + math.exp(bg)))

    ce0, ce1 = ce(1.0, 2.0, 0), ce(0.5, -1.0, 1)  # pseudo-labels: pixel 0 class, pixel 1 background
    lam = 0.5
    two_term, _ = fsae_loss(source, target, weight=lam, form="two_term")
    assert two_term.item() == pytest.approx((ce0 + ce1) / 3 + lam * ce1 / 3, rel=1e-6)
    union, _ = fsae_loss(source, target, weight=lam)  # the default, eq. 9: one mean over M u M_bdry
    assert union.item() == pytest.approx(lam * (ce0 + ce1) / 3, rel=1e-6)
    # crop padding removed from both masks when a valid map is given (fsae.mask_padding)
    valid = torch.tensor([[[True, False, True]]])
    padded, _ = fsae_loss(source, target, weight=lam, form="two_term", valid=valid)
    assert padded.item() == pytest.approx(ce0 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="two_term"):
        fsae_loss(source, target, form="two_term", reduction="masked_mean")


class _DropoutScores(torch.nn.Module):
    """A method whose score map is a 1x1 conv after Dropout2d(0.5): ``model(x, labels).score_map``."""

    def __init__(self):
        super().__init__()
        self.drop, self.conv = torch.nn.Dropout2d(0.5), torch.nn.Conv2d(3, 5, 1)

    def forward(self, x, labels):
        return type("Out", (), {"score_map": self.conv(self.drop(x))})()


def test_ema_teacher_runs_in_eval_mode_or_as_the_authors_in_train_mode():
    """ema_mode eval: the EMA copy without dropout; train (wseg ssl module/train.py:355-361: the EMA weights
    in the model in train mode): with dropout, the same draws as the model itself under that RNG state."""
    from fsae.config import FSAEConfig
    from fsae.two_view import TwoViewFSAE, update_ema

    torch.manual_seed(0)
    model, x, labels = _DropoutScores().train(), torch.rand(2, 3, 4, 4), torch.ones(2, 4)
    for mode in ("eval", "train"):
        fs = TwoViewFSAE(FSAEConfig(enabled=True, teacher="ema", ema_mode=mode, ema_decay=0.5), model)
        with torch.no_grad():
            model.conv.weight.add_(1.0)
        update_ema(fs.ema, model, 0.5)  # the EMA weights: halfway between the start and the model's
        ema_weight = fs.ema.conv.weight.clone()
        torch.testing.assert_close(ema_weight, model.conv.weight - 0.5)
        torch.manual_seed(1)
        got = fs.teacher_scores(model, x, labels, None)
        torch.manual_seed(1)
        dropped = torch.nn.functional.dropout2d(x, 0.5, training=mode == "train")
        want = torch.nn.functional.conv2d(dropped, ema_weight, fs.ema.conv.bias)
        torch.testing.assert_close(got, want)
        plain = torch.nn.functional.conv2d(x, ema_weight, fs.ema.conv.bias)
        assert torch.allclose(got, plain) == (mode == "eval")  # train: some channels dropped (and x2 the rest)
        assert model.training  # the student stays in train mode
        with torch.no_grad():
            model.conv.weight.sub_(1.0)
