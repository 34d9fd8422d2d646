"""Dense-CRF refinement: moves a spilled seed to the image edge, matches seed_to_mask at 0 iterations,
folder runs are worker-independent, resumable and name missing files."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf", reason="dense CRF needs `pip install pydensecrf2==1.1`")

from fsae.errors import DataError
from fsae.evaluate import evaluate_masks, seed_to_mask
from fsae.infer import save_seed
from fsae.io import read_mask, write_image, write_mask
from fsae.refine.crf import crf_inference, refine_dir, refine_seed, seed_to_probs


def edge_scene(n=48, edge=24):
    """Left half dark, right half a bright textured object (GT label 1); the CAM ramps from 0 at x=6
    to 1 at x=26, so at threshold 0.25 the seed spills 12 px over the object edge at x=24."""
    rng = np.random.default_rng(0)
    image = np.full((n, n, 3), 40, np.int16)
    image[:, edge:] = 200
    image += rng.integers(-15, 16, (n, n, 1))  # texture on both sides
    image = np.clip(image, 0, 255).astype(np.uint8)
    gt = np.zeros((n, n), np.uint8)
    gt[:, edge:] = 1
    cam = np.clip((np.arange(n) - 6) / 20, 0, 1).astype(np.float32)
    cams = np.broadcast_to(cam, (n, n))[None].copy()
    return image, gt, np.array([1]), cams


def iou(pred, gt):
    return ((pred == 1) & (gt == 1)).sum() / ((pred == 1) | (gt == 1)).sum()


def test_crf_moves_spilled_seed_to_object_edge():
    image, gt, keys, cams = edge_scene()
    before = iou(seed_to_mask(keys, cams, 0.25), gt)
    after = iou(refine_seed(image, keys, cams, 0.25), gt)
    assert before == pytest.approx(24 / 36)  # seed covers x in [12, 48), object x in [24, 48)
    assert after > 0.95  # measured 1.0: the boundary lands on the colour edge


def test_crf_inference_is_a_distribution():
    image, _, keys, cams = edge_scene()
    probs, labels = seed_to_probs(keys, cams, 0.25)
    q = crf_inference(image, probs, iterations=5)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert labels.tolist() == [0, 1]


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7])
def test_zero_iterations_equals_seed_to_mask(threshold):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for k in (0, 1, 3):
        keys = rng.choice(np.arange(1, 21), size=k, replace=False)
        cams = rng.random((k, 20, 24), dtype=np.float32)
        expected = seed_to_mask(keys, cams, threshold)
        probs, labels = seed_to_probs(keys, cams, threshold)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(labels[probs.argmax(0)], expected)
        np.testing.assert_array_equal(refine_seed(image, keys, cams, threshold, iterations=0), expected)


def make_dir_data(root, n=5, size=(40, 52)):
    rng = np.random.default_rng(2)
    ids = [f"img{i}" for i in range(n)]
    for i in ids:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        keys = np.sort(rng.choice(np.arange(1, 6), size=2, replace=False))
        cams = rng.random((2, *size), dtype=np.float32)
        gt = rng.choice(np.concatenate([[0], keys]), size=size).astype(np.uint8)
        write_image(root / "images" / f"{i}.png", image)
        save_seed(root / "seeds" / f"{i}.npz", keys, cams.astype(np.float16))
        write_mask(root / "gt" / f"{i}.png", gt)
    return ids


def test_refine_dir_workers_resume_and_evaluate(tmp_path):
    ids = make_dir_data(tmp_path)
    kw = dict(threshold=0.4, progress=False, image_ext=".png")
    one = refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "w1", ids, workers=1, **kw)
    two = refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "w2", ids, workers=2, **kw)
    assert one["refined"] == two["refined"] == len(ids) and one["skipped"] == 0
    for i in ids:
        assert (tmp_path / "w1" / f"{i}.png").read_bytes() == (tmp_path / "w2" / f"{i}.png").read_bytes()
        assert read_mask(tmp_path / "w1" / f"{i}.png").shape == (40, 52)

    # Resume: finished PNGs are skipped; a partial temp file left by a killed run does not count.
    (tmp_path / "w1" / f"{ids[0]}.png").unlink()
    (tmp_path / "w1" / f".{ids[0]}.png.abc123.tmp.png").write_bytes(b"\x89PNG half")
    again = refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "w1", ids, workers=1, **kw)
    assert again == {"total": 5, "refined": 1, "skipped": 4, "out_dir": str(tmp_path / "w1"), "warnings": []}
    assert (tmp_path / "w1" / f"{ids[0]}.png").read_bytes() == (tmp_path / "w2" / f"{ids[0]}.png").read_bytes()

    result = evaluate_masks(tmp_path / "w1", tmp_path / "gt", ids, num_classes=5, progress=False)
    assert result["count"] == 5 and 0.0 <= result["miou"] <= 1.0


def test_refine_dir_errors_name_the_file(tmp_path):
    ids = make_dir_data(tmp_path, n=2)
    kw = dict(threshold=0.4, progress=False, workers=1)
    (tmp_path / "images" / f"{ids[1]}.png").unlink()
    with pytest.raises(DataError, match=f"{ids[1]}.png: image file not found"):
        refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "out", ids, image_ext=".png", **kw)
    with pytest.raises(DataError, match=f"{ids[0]}.jpg: image file not found"):  # default VOC .jpg
        refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "out2", ids, **kw)

    write_image(tmp_path / "images" / f"{ids[1]}.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match=f"{ids[1]}.npz: CAM size .* does not match image"):
        refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "out", ids, image_ext=".png", **kw)
    (tmp_path / "seeds" / f"{ids[1]}.npz").unlink()  # the seed folder changed: out/ is refused, so a new folder
    with pytest.raises(DataError, match=f"{ids[1]}.npz: seed file not found"):
        refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "out3", ids, image_ext=".png", **kw)
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        refine_dir(tmp_path / "seeds", tmp_path / "images", tmp_path / "out", ids, iters=3, **kw)


def test_missing_package_error_says_how_to_install(monkeypatch):
    from fsae.refine.crf import CrfDependencyError

    monkeypatch.setitem(__import__("sys").modules, "pydensecrf.densecrf", None)
    image, _, keys, cams = edge_scene()
    with pytest.raises(CrfDependencyError, match="pip install pydensecrf2"):
        refine_seed(image, keys, cams, 0.25)


def test_crf_module_imports_without_torch():
    # The worker processes import fsae.refine.crf; importing torch there cost ~5 s per worker (bench_crf).
    code = "import sys, fsae.refine.crf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
