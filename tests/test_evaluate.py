import json
import math

import numpy as np
import pytest
import torch

from fsae.errors import DataError
from fsae.evaluate import (
    SeedEvaluator,
    confusion_matrix,
    default_thresholds,
    evaluate_masks,
    evaluate_seeds,
    format_scores_table,
    load_seed,
    save_eval,
    seed_to_mask,
    segmentation_scores,
    sweep_confusions,
)
from fsae.io import read_mask, write_mask

# 2 x 3 image, C = 2 (K = 3 labels), one ignored pixel whose prediction (7) is out of range on purpose.
GT = np.array([[0, 1, 1], [2, 2, 255]])
PRED = np.array([[0, 1, 2], [2, 0, 7]])


def test_confusion_matrix_hand_worked():
    conf = confusion_matrix(PRED, GT, num_classes=2)
    # pixels (gt, pred): (0,0) (1,1) (1,2) (2,2) (2,0); the ignored pixel is skipped
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    # torch input, any (same) shape, gives the same matrix; different shapes are refused
    pred_t, gt_t = torch.from_numpy(PRED).reshape(3, 2), torch.from_numpy(GT).reshape(3, 2)
    assert torch.equal(confusion_matrix(pred_t, gt_t, 2), conf)
    with pytest.raises(ValueError, match=r"pred shape \(3, 2\) does not match gt shape \(2, 3\)"):
        confusion_matrix(PRED.reshape(3, 2), GT, 2)


def test_scores_hand_worked():
    s = segmentation_scores(confusion_matrix(PRED, GT, num_classes=2))
    # class 0: TP 1 FP 1 FN 0 (union 2); class 1: TP 1 FP 0 FN 1 (union 2);
    # class 2: TP 1 FP 1 FN 1 (union 3)
    assert s["iou"] == pytest.approx([1 / 2, 1 / 2, 1 / 3])
    assert s["fpr_per_class"] == pytest.approx([1 / 2, 0, 1 / 3])
    assert s["fnr_per_class"] == pytest.approx([0, 1 / 2, 1 / 3])
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["fpr"] == pytest.approx(5 / 18)
    assert s["fnr"] == pytest.approx(5 / 18)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)


def test_empty_union_class_is_nan_and_left_out_of_means():
    s = segmentation_scores(confusion_matrix(PRED, GT, num_classes=3))
    assert all(math.isnan(s[key][3]) for key in ("iou", "fpr_per_class", "fnr_per_class"))
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["fpr"] == pytest.approx(5 / 18)


def test_bad_pred_value_is_named():
    with pytest.raises(ValueError, match=r"pred values \[9\]"):
        confusion_matrix(np.array([0, 9, 1]), np.array([0, 1, 1]), num_classes=2)
    with pytest.raises(ValueError, match=r"gt values \[5\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), num_classes=2)


def _reference_iou(pred, gt, num_classes):
    """Plain per-class loop over the definition; NaN for empty union."""
    valid = gt != 255
    out = []
    for c in range(num_classes + 1):
        p, g = (pred == c) & valid, (gt == c) & valid
        inter, union = int((p & g).sum()), int((p | g).sum())
        out.append(inter / union if union else float("nan"))
    return out


def test_scores_match_reference_loop_and_sum_to_one():
    rng = np.random.default_rng(0)
    for trial in range(5):
        c = 6
        gt = rng.integers(0, c + 1, size=(40, 50))
        gt[rng.random(gt.shape) < 0.1] = 255
        gt[gt == 4] = 0  # class 4 absent from GT ...
        noise = rng.integers(0, c + 1, gt.shape)
        pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), noise)
        if trial % 2:
            pred[pred == 4] = 3  # ... and sometimes never predicted: NaN
        s = segmentation_scores(confusion_matrix(pred, gt, c))
        ref = _reference_iou(pred, gt, c)
        np.testing.assert_allclose(s["iou"], ref, rtol=0, atol=1e-12, equal_nan=True)
        assert s["miou"] == pytest.approx(np.nanmean(ref), abs=1e-12)
        assert s["miou"] + s["fpr"] + s["fnr"] == pytest.approx(1.0, abs=1e-12)
        assert math.isnan(s["iou"][4]) == bool(trial % 2)


def test_seed_to_mask_hand_worked():
    keys = np.array([3, 7])
    cams = np.array([[[0.75, 0.25, 0.5, 0.375]], [[0.125, 0.625, 0.5, 0.375]]], dtype=np.float16)
    # t = 0.4: argmax fg, fg tie (pixel 2) -> first key 3, 0.375 < t -> background
    assert seed_to_mask(keys, cams, 0.4).tolist() == [[3, 7, 3, 0]]
    # t = 0.5: tie between background and the CAM max -> background
    assert seed_to_mask(keys, cams, 0.5).tolist() == [[3, 7, 0, 0]]
    assert seed_to_mask(keys, cams, 0.75).tolist() == [[0, 0, 0, 0]]
    assert seed_to_mask(keys, cams, 0.4).dtype == np.uint8
    empty = seed_to_mask(np.zeros(0, np.int64), np.zeros((0, 2, 3), np.float16), 0.0)
    assert empty.tolist() == [[0, 0, 0], [0, 0, 0]]


def _random_seed(rng, num_classes, h, w, k=None):
    k = int(rng.integers(0, 4)) if k is None else k
    keys = np.sort(rng.choice(np.arange(1, num_classes + 1), size=k, replace=False)).astype(np.int64)
    grid = rng.integers(0, 9, size=(k, h, w)) / 8  # exact: ties with thresholds and between classes
    cams = np.where(rng.random((k, h, w)) < 0.5, grid, rng.random((k, h, w))).astype(np.float16)
    return keys, cams


def _random_gt(rng, num_classes, h, w):
    gt = rng.integers(0, num_classes + 1, size=(h, w)).astype(np.uint8)
    gt[rng.random((h, w)) < 0.1] = 255
    return gt


def test_sweep_equals_per_threshold_loop():
    rng = np.random.default_rng(1)
    c = 5
    # unsorted, duplicated, below and above the CAM range, and exact ties with k/8 CAM values
    thresholds = default_thresholds() + [0.125, 0.375, 1.0, -0.1, 0.5, 0.5, 0.05]
    for k in (0, 1, 2, 3, None, None):
        keys, cams = _random_seed(rng, c, 17, 23, k)
        gt = _random_gt(rng, c, 17, 23)
        got = sweep_confusions(keys, cams, gt, thresholds, c)
        ref = torch.stack([confusion_matrix(seed_to_mask(keys, cams, t), gt, c) for t in thresholds])
        assert got.shape == (len(thresholds), c + 1, c + 1)
        assert torch.equal(got, ref)
        if k == 0:  # all background
            assert int(got[:, :, 1:].sum()) == 0


def test_sweep_rejects_keys_above_num_classes():
    with pytest.raises(ValueError, match="num_classes = 2"):
        sweep_confusions(np.array([3]), np.ones((1, 2, 2), np.float16), np.zeros((2, 2)), [0.1], 2)


def test_default_thresholds():
    t = default_thresholds()
    assert len(t) == 61 and t[0] == 0.0 and t[30] == 0.3 and t[-1] == 0.6
    assert default_thresholds(0.2, 0.3, 0.05) == [0.2, 0.25, 0.3]


def _write_seed(path, keys, cams):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, keys=keys, cams=cams)


def test_evaluate_seeds_equals_reload_loop(tmp_path):
    rng = np.random.default_rng(2)
    c, ids = 4, ["a", "b", "c", "d"]
    for i, image_id in enumerate(ids):
        h, w = 12 + i, 15
        keys, cams = _random_seed(rng, c, h, w, k=0 if image_id == "c" else None)
        _write_seed(tmp_path / "seeds" / f"{image_id}.npz", keys, cams)
        write_mask(tmp_path / "gt" / f"{image_id}.png", _random_gt(rng, c, h, w))
    thresholds = default_thresholds(0.0, 0.6, 0.05)
    result = evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ids, c, thresholds, progress=False)

    ref_miou = []
    for t in thresholds:  # reference: reload every file for every threshold
        conf = torch.zeros(c + 1, c + 1, dtype=torch.long)
        for image_id in ids:
            keys, cams = load_seed(tmp_path / "seeds" / f"{image_id}.npz")
            gt = read_mask(tmp_path / "gt" / f"{image_id}.png")
            conf += confusion_matrix(seed_to_mask(keys, cams, t), gt, c)
        ref_miou.append(segmentation_scores(conf)["miou"])
    assert result["thresholds"] == thresholds
    assert result["miou"] == ref_miou
    assert result["count"] == 4
    best = int(np.argmax(ref_miou))
    assert result["best"]["threshold"] == thresholds[best]
    assert result["best"]["miou"] == max(ref_miou)
    assert result["best"]["miou"] + result["best"]["fpr"] + result["best"]["fnr"] == pytest.approx(1.0)

    # sharded: two evaluators merged give the same sums
    shards = [SeedEvaluator(c, thresholds), SeedEvaluator(c, thresholds)]
    for i, image_id in enumerate(ids):
        seed_path, gt_path = tmp_path / "seeds" / f"{image_id}.npz", tmp_path / "gt" / f"{image_id}.png"
        shards[i % 2].add_files(seed_path, gt_path)
    assert shards[0].merge(shards[1]).result() == result


def test_evaluate_seeds_picks_known_best_threshold(tmp_path):
    # object CAM 0.75, background CAM 0.25: perfect from t = 0.25 (tie -> background) to t < 0.75
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 2
    cams = np.where(gt == 2, 0.75, 0.25)[None].astype(np.float16)
    _write_seed(tmp_path / "seeds" / "x.npz", np.array([2]), cams)
    write_mask(tmp_path / "gt" / "x.png", gt)
    result = evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ["x"], 2, progress=False)  # default sweep
    assert result["best"]["threshold"] == 0.25
    assert result["best"]["miou"] == 1.0 and result["best"]["fpr"] == 0.0
    assert result["miou"][24] < 1.0  # t = 0.24: background pixels still predicted as class 2
    assert result["miou"][25] == 1.0 and result["miou"][60] == 1.0
    assert math.isnan(result["best"]["iou"][1])  # class 1 never present nor predicted


def test_seed_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.npz"):
        load_seed(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        load_seed(tmp_path / "bad.npz")
    np.savez_compressed(tmp_path / "nokeys.npz", cams=np.zeros((1, 2, 2), np.float16))
    with pytest.raises(DataError, match=r"nokeys.npz.*lacks \['keys'\]"):
        load_seed(tmp_path / "nokeys.npz")
    _write_seed(tmp_path / "k.npz", np.array([1, 2]), np.zeros((3, 2, 2), np.float16))
    with pytest.raises(DataError, match="k.npz.*K = len\\(keys\\) = 2"):
        load_seed(tmp_path / "k.npz")

    _write_seed(tmp_path / "seeds" / "x.npz", np.array([1]), np.zeros((1, 4, 5), np.float16))
    write_mask(tmp_path / "gt" / "x.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DataError, match=r"seeds/x.npz.*gt/x.png"):
        evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ["x"], 2, [0.1], progress=False)
    with pytest.raises(DataError, match=r"seeds/y.npz: seed file not found"):
        evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ["y"], 2, [0.1], progress=False)


def test_evaluate_masks_and_outputs(tmp_path):
    write_mask(tmp_path / "gt" / "a.png", GT.astype(np.uint8))
    write_mask(tmp_path / "masks" / "a.png", np.where(PRED == 7, 0, PRED).astype(np.uint8))
    s = evaluate_masks(tmp_path / "masks", tmp_path / "gt", ["a"], 3, progress=False)
    assert s["miou"] == pytest.approx(4 / 9) and s["count"] == 1
    assert math.isnan(s["iou"][3])

    write_mask(tmp_path / "masks" / "b.png", np.full((2, 3), 255, np.uint8))
    write_mask(tmp_path / "gt" / "b.png", GT.astype(np.uint8))
    with pytest.raises(DataError, match="masks/b.png.*ignore_as"):
        evaluate_masks(tmp_path / "masks", tmp_path / "gt", ["b"], 3, progress=False)
    s_b = evaluate_masks(tmp_path / "masks", tmp_path / "gt", ["b"], 3, progress=False, ignore_as=0)
    assert s_b["iou"][0] == pytest.approx(1 / 5)  # all 5 valid pixels predicted background, 1 is

    save_eval(tmp_path / "out" / "eval.json", s)
    back = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert back["iou"][3] is None and back["miou"] == pytest.approx(4 / 9)

    text = format_scores_table(s, class_names=["cat", "dog", "cow"])
    assert "mIoU 44.4" in text and "FPR 27.8" in text
    assert "dog" in text and "50.0" in text and "n/a" in text


def test_best_result_reports_object_coverage():
    # One image, class 1 over 4 pixels of which the CAM passes the threshold on 3, plus 4 background pixels.
    gt = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8)
    cams = np.array([[[0.9, 0.8, 0.7, 0.1], [0.0, 0.0, 0.0, 0.0]]], dtype=np.float32)
    ev = SeedEvaluator(num_classes=1, thresholds=[0.5])
    ev.update(np.array([1]), cams, gt)
    assert ev.result()["best"]["coverage"] == pytest.approx(3 / 4)


def _seed_folder(root, c, n, rng):
    """``n`` random seeds (one without classes, one with SIPE's background plane) and GT under ``root``."""
    ids = [f"s{i:02d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        keys, cams = _random_seed(rng, c, 9 + i % 3, 11, k=0 if i == 1 else None)
        extra = {"background": rng.random(cams.shape[1:]).astype(np.float16)} if i == 2 else {}
        (root / "seeds").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(root / "seeds" / f"{image_id}.npz", keys=keys, cams=cams, **extra)
        write_mask(root / "gt" / f"{image_id}.png", _random_gt(rng, c, *cams.shape[1:]))
    return ids


def test_evaluate_seeds_with_workers_sums_to_the_one_process_result(tmp_path, monkeypatch):
    import fsae.evaluate

    monkeypatch.setattr(fsae.evaluate, "EVAL_CHUNK", 3)  # 10 images: 4 jobs over the 2 workers
    c, thresholds = 3, default_thresholds(0.0, 0.6, 0.1)
    ids = _seed_folder(tmp_path, c, 10, np.random.default_rng(5))
    one = evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ids, c, thresholds, progress=False)
    two = evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ids, c, thresholds, progress=False, workers=2)
    # reference: every file through SeedEvaluator.add_files in this process
    ev = SeedEvaluator(c, thresholds)
    for image_id in ids:
        ev.add_files(tmp_path / "seeds" / f"{image_id}.npz", tmp_path / "gt" / f"{image_id}.png")
    assert not any(math.isnan(v) for v in ev.result()["miou"])
    assert one == two == ev.result() and two["count"] == 10
    # the worker's own sums: the chunks add up to the evaluator's confusions exactly
    from fsae.sweep import count_files

    pairs = [(tmp_path / "seeds" / f"{i}.npz", tmp_path / "gt" / f"{i}.png") for i in ids]
    parts = [count_files((pairs[j:j + 4], c, thresholds, "fsae", "sweep")) for j in (0, 4, 8)]
    assert np.array_equal(sum(p[0] for p in parts), ev.confusions.numpy()) and sum(p[1] for p in parts) == 10


def test_evaluate_seeds_workers_name_the_bad_file(tmp_path, monkeypatch):
    import fsae.evaluate

    monkeypatch.setattr(fsae.evaluate, "EVAL_CHUNK", 1)
    ids = _seed_folder(tmp_path, 3, 4, np.random.default_rng(6))
    (tmp_path / "seeds" / f"{ids[3]}.npz").write_bytes(b"truncated")
    with pytest.raises(DataError, match=f"seeds/{ids[3]}.npz: cannot read seed file"):
        evaluate_seeds(tmp_path / "seeds", tmp_path / "gt", ids, 3, [0.2], progress=False, workers=2)


def test_evaluation_workers_start_without_torch():
    import subprocess
    import sys

    code = "import sys, fsae.sweep; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_eval_workers(tmp_path, monkeypatch, capsys):
    import fsae.evaluate
    from fsae.cli import main as cli

    monkeypatch.setattr(fsae.evaluate, "EVAL_CHUNK", 2)
    _seed_folder(tmp_path, 3, 6, np.random.default_rng(7))
    base = ["eval", "--seeds", str(tmp_path / "seeds"), "--gt", str(tmp_path / "gt"), "--num-classes", "3",
            "--sweep", "0", "0.6", "0.1"]
    assert cli(base + ["--out", str(tmp_path / "one.json")]) == 0
    assert cli(base + ["--workers", "2", "--out", str(tmp_path / "two.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one == two and one["count"] == 6
    capsys.readouterr()
    assert cli(base + ["--workers", "0"]) == 2
    assert "--workers 0 is not allowed" in capsys.readouterr().err
