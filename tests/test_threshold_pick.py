"""Each protocol's threshold pick (fsae.evaluate ``pick_best`` / ``SeedEvaluator`` / ``evaluate_seeds``, fsae.sweep)
on one hand-worked seed whose mIoU is worked out for every threshold.

fixed (IRN's CAM, EPS): the one threshold ``Protocol.threshold``; sweep (PPC, the FSAE authors' EPS copy): the first
maximum of the sweep (0.00 .. 0.49, their --max_th 50);
first_drop (MCTformer): the sweep in order, stopping at the first threshold not strictly above the best so far;
argmax (SIPE): the seed's own background plane, no threshold.

The seed: one class (K = 2: background, class 1), six pixels (cam value, GT label), in a 1 x 6 image:
    A (0.105, 0)  B (0.205, 1)  C (0.305, 0)  D (0.505, 0)  E (0.605, 1)  F (0.605, 1)
A pixel is class 1 iff its cam value is above the threshold t (a tie goes to background). The values sit
between grid points, so float16 rounding of the seed decides nothing. IoU = TP / (TP + FP + FN) per class:
    t < 0.105          all class 1   bg 0 / 3            fg 3 / 6             mIoU 1/4
    0.105 <= t < 0.205 A bg          bg 1 / 3            fg 3 / 5             mIoU 7/15
    0.205 <= t < 0.305 A B bg        bg 1 / 4 (FP B)     fg 2 / 5 (FP C D)    mIoU 13/40   <- a dip
    0.305 <= t < 0.505 A B C bg      bg 2 / 4            fg 2 / 4             mIoU 1/2
    0.505 <= t < 0.605 A-D bg        bg 3 / 4            fg 2 / 3             mIoU 17/24   <- the peak
    t >= 0.605         all bg        bg 3 / 6            fg 0 / 3             mIoU 1/4
"""

from __future__ import annotations

import numpy as np
import pytest

from fsae.evaluate import SeedEvaluator, evaluate_seeds, pick_best
from fsae.io import write_mask
from fsae.protocol import PROTOCOLS
from fsae.seeds import save_seed

KEYS = np.array([1])
CAMS = np.array([[[0.105, 0.205, 0.305, 0.505, 0.605, 0.605]]], dtype=np.float32)  # (K=1, H=1, W=6)
GT = np.array([[0, 1, 0, 0, 1, 1]])
# SIPE's own background plane per pixel (test_argmax_uses_the_seeds_background_plane_at_every_threshold)
BACKGROUND = np.array([[0.2, 0.1, 0.4, 0.3, 0.5, 0.7]], dtype=np.float32)
# the hand table above, by interval: (lowest threshold of the interval, mIoU)
CURVE = [(0.0, 1 / 4), (0.105, 7 / 15), (0.205, 13 / 40), (0.305, 1 / 2), (0.505, 17 / 24), (0.605, 1 / 4)]


def hand_miou(t: float) -> float:
    return [m for low, m in CURVE if t >= low][-1]


def evaluate(thresholds, mode, background=None) -> dict:
    ev = SeedEvaluator(1, thresholds, mode)
    ev.update(KEYS, CAMS, GT, background)
    return ev.result()


def test_the_hand_curve_at_every_threshold_of_the_sweep():
    # PPC: 0.00 .. 0.49 (obeychoi0120/wseg@ssl script/voc_ppc1.sh:86 --max_th 50); MCTformer 0.00 .. 0.59
    assert PROTOCOLS["ppc"].thresholds() == [i / 100 for i in range(50)]
    thresholds = PROTOCOLS["mctformer"].thresholds()
    assert thresholds == [i / 100 for i in range(60)]  # the stop included
    result = evaluate(thresholds, "sweep")
    assert result["miou"] == pytest.approx([hand_miou(t) for t in thresholds], abs=1e-12)
    assert result["miou"][thresholds.index(0.20)] == pytest.approx(7 / 15)
    assert result["miou"][thresholds.index(0.21)] == pytest.approx(13 / 40)


@pytest.mark.parametrize("method, threshold, miou", [("cam", 0.15, 7 / 15), ("eps", 0.20, 7 / 15)])
def test_fixed_scores_the_protocol_threshold_only(method, threshold, miou):
    protocol = PROTOCOLS[method]  # IRN step/eval_cam.py: cam_eval_thres 0.15; EPS coco_eps.sh:43 --thr 0.20
    assert protocol.eval_mode == "fixed" and protocol.thresholds() == [threshold]
    result = evaluate(protocol.thresholds(), protocol.eval_mode)
    assert result["thresholds"] == [threshold]
    assert result["best"]["threshold"] == threshold and result["best"]["miou"] == pytest.approx(miou)
    # the threshold a fixed protocol scores is the one given, whatever the others would score
    result = evaluate([0.55], "fixed")
    assert result["best"]["threshold"] == 0.55 and result["best"]["miou"] == pytest.approx(17 / 24)


@pytest.mark.parametrize("method", ["ppc", "eps_wseg"])
def test_sweep_picks_the_first_maximum(method):
    protocol = PROTOCOLS[method]  # obeychoi0120/wseg eval.py:155-157: max over 0.00..0.49 (--max_th 50)
    assert protocol.eval_mode == "sweep"
    result = evaluate(protocol.thresholds(), protocol.eval_mode)
    # up to 0.49 the best is 1/2 for t = 0.31 .. 0.49 (0.305 <= t < 0.505): the first of them is reported; at
    # 0.31 B is a false background and D a false object: each class has TP 2 of union 4, FP 1, FN 1
    assert result["best"]["threshold"] == 0.31 and result["best"]["miou"] == pytest.approx(1 / 2)
    assert result["best"]["iou"] == pytest.approx([1 / 2, 1 / 2])
    assert result["best"]["fpr"] == pytest.approx(1 / 4) and result["best"]["fnr"] == pytest.approx(1 / 4)
    # on the 0.00 .. 0.59 grid the peak holds for t = 0.51 .. 0.59 (0.505 <= t < 0.605): the first is reported
    result = evaluate(PROTOCOLS["mctformer"].thresholds(), "sweep")
    assert result["best"]["threshold"] == 0.51 and result["best"]["miou"] == pytest.approx(17 / 24)
    assert result["best"]["iou"][0] == pytest.approx(3 / 4) and result["best"]["iou"][1] == pytest.approx(2 / 3)
    # at 0.51 pixel B is the one error: bg FP 1 of union 4, fg FN 1 of union 3; FPR, FNR are means over both classes
    assert result["best"]["fpr"] == pytest.approx((1 / 4 + 0) / 2) and result["best"]["fnr"] == pytest.approx((0 + 1 / 3) / 2)

def test_first_drop_stops_at_the_first_threshold_not_above_the_best():
    protocol = PROTOCOLS["mctformer"]  # MCTformer evaluation.py:136-148
    assert protocol.eval_mode == "first_drop"
    # its own grid 0.00 .. 0.59: 0.00 and 0.01 both score 1/4, 0.01 is not strictly above: it stops at once
    result = evaluate(protocol.thresholds(), protocol.eval_mode)
    assert result["best"]["threshold"] == 0.0 and result["best"]["miou"] == pytest.approx(1 / 4)
    # a coarse grid 0.05, 0.15, ..., 0.65: 1/4, 7/15, then 13/40 is a drop: 0.15, before the later peak (0.55)
    coarse = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65]
    result = evaluate(coarse, "first_drop")
    assert result["best"]["threshold"] == 0.15 and result["best"]["miou"] == pytest.approx(7 / 15)
    assert evaluate(coarse, "sweep")["best"]["threshold"] == 0.55


def test_first_drop_by_hand_curves():
    # a curve that only rises: its last threshold
    assert pick_best([0.1, 0.2, 0.3], "first_drop") == 2
    # a tie is not a rise (MCTformer's `>`): the first of the two
    assert pick_best([0.1, 0.3, 0.3, 0.5], "first_drop") == 1
    # MCTformer starts from max_mIoU = 0.0 and best_thr = the first threshold: a zero first score stops it there
    assert pick_best([0.0, 0.4, 0.6], "first_drop") == 0
    # sweep: the first maximum, NaN left out; all NaN: the first threshold
    assert pick_best([0.2, float("nan"), 0.5, 0.5, 0.1], "sweep") == 2
    assert pick_best([float("nan"), float("nan")], "sweep") == 0


def test_argmax_uses_the_seeds_background_plane_at_every_threshold():
    protocol = PROTOCOLS["sipe"]  # SIPE eval_cam.py:18-21: argmax over [background, cams]
    assert protocol.eval_mode == "argmax" and protocol.thresholds() == [0.0]
    # background per pixel; class 1 iff cam > background:
    #   A .105 < .2 bg (right)  B .205 > .1 fg (right)  C .305 < .4 bg (right)  D .505 > .3 fg (wrong)
    #   E .605 > .5 fg (right)  F .605 < .7 bg (wrong)
    # bg: TP 2 (A, C), FP 1 (F), FN 1 (D) -> 2/4; fg: TP 2 (B, E), FP 1 (D), FN 1 (F) -> 2/4; mIoU 1/2
    background = BACKGROUND
    result = evaluate(protocol.thresholds(), protocol.eval_mode, background)
    assert result["best"]["threshold"] == 0.0 and result["best"]["miou"] == pytest.approx(1 / 2)
    # the constant-threshold plane would give 1/4 at t = 0.0; a background plane makes every threshold alike
    assert evaluate([0.0], "sweep")["best"]["miou"] == pytest.approx(1 / 4)
    assert evaluate([0.0, 0.3, 0.55], "argmax", background)["miou"] == pytest.approx([1 / 2] * 3)


def test_each_pick_from_seed_files(tmp_path):
    """evaluate_seeds on the seed written to disk (float16) and its GT PNG: the same picks."""
    seeds, gt = tmp_path / "seeds", tmp_path / "gt"
    seeds.mkdir(), gt.mkdir()
    write_mask(gt / "a.png", GT)
    picks = {}
    for method in ("cam", "ppc", "eps", "mctformer", "sipe"):
        protocol = PROTOCOLS[method]
        # SIPE's seed carries its background plane (the argmax protocol needs one); the others' do not
        save_seed(seeds / "a.npz", KEYS, CAMS, background=BACKGROUND if method == "sipe" else None)
        result = evaluate_seeds(seeds, gt, ["a"], 1, protocol.thresholds(), progress=False, mode=protocol.eval_mode)
        picks[method] = (result["best"]["threshold"], round(result["best"]["miou"], 6))
    assert picks == {"cam": (0.15, round(7 / 15, 6)), "ppc": (0.31, 0.5), "eps": (0.2, round(7 / 15, 6)),
                     "mctformer": (0.0, 0.25), "sipe": (0.0, 0.5)}


def test_a_tie_goes_to_background_for_the_threshold_and_the_plane():
    # 0.25 and 0.5 are exact in float16 and float32: pixel (0.25, class 1) is background at t = 0.25, class 1 at 0.24
    keys, cams, gt = np.array([1]), np.array([[[0.25, 0.5]]], dtype=np.float32), np.array([[1, 0]])
    ev = SeedEvaluator(1, [0.24, 0.25], "sweep")
    ev.update(keys, cams, gt)
    # t = 0.24: both class 1: bg 0 / 1, fg 1 / 2 -> 1/4; t = 0.25: the first background (wrong), the second class 1
    # (wrong): bg 0 / 2, fg 0 / 2 -> 0
    assert ev.result()["miou"] == pytest.approx([1 / 4, 0.0])
    # a background plane equal to the cam (0.5 = 0.5) makes the pixel background: bg 1 / 1, fg 1 / 1 -> mIoU 1
    ev = SeedEvaluator(1, [0.0], "argmax")
    ev.update(keys, cams, gt, np.array([[0.0, 0.5]], dtype=np.float32))
    assert ev.result()["miou"] == [1.0]
