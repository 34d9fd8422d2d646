"""Seed storage: float16 and the quantised uint8 grid (fsae.seeds), read alike by load_seed."""

import math

import numpy as np
import pytest
import torch

from fsae.errors import DataError
from fsae.evaluate import default_thresholds, evaluate_seeds, segmentation_scores
from fsae.io import write_mask
from fsae.seeds import QUANT_MAX_ERROR, load_seed, save_seed
from fsae.sweep import sweep_counts


def _cams(rng, k, h, w):
    """(k, h, w) float32 in [0, 1]: smooth-ish maps, exact zeros, a 1.0, and values on the 0.005 grid."""
    cams = rng.random((k, h, w)).astype(np.float32) ** 3
    cams[:, 0, :3] = [0.0, 1.0, 0.35]  # 0.35 as the float32 a sweep compares against
    cams[:, 1, :2] = [np.float32(0.25), np.nextafter(np.float32(0.35), np.float32(1))]
    return cams


def _reference_stored(x: float, wins: bool) -> float:
    """The value a uint8 seed reads back for ``x``, written plainly from the module docstring: q = the number
    of grid points j / 200 (as float32) below x, read as (q - 0.5) / 200 (0 for q = 0), plus 1e-4 for the
    pixel's winning plane."""
    q = sum(1 for j in range(201) if float(np.float32(j / 200)) < x)
    return 0.0 if q == 0 else (q - 0.5) / 200 + (1e-4 if wins else 0.0)


def test_uint8_storage_error_bound_and_reference(tmp_path):
    rng = np.random.default_rng(0)
    cams, background = _cams(rng, 3, 20, 30), rng.random((20, 30)).astype(np.float32)
    save_seed(tmp_path / "u.npz", np.array([2, 5, 9]), cams, background, dtype="uint8")
    keys, back, bg_back = load_seed(tmp_path / "u.npz", with_background=True)
    assert keys.tolist() == [2, 5, 9] and back.dtype == np.float32 and back.shape == cams.shape
    error = np.abs(back - cams)
    assert error.max() <= QUANT_MAX_ERROR + 1e-7 and QUANT_MAX_ERROR == pytest.approx(0.0026)
    assert error.max() > 0.0025  # the bound is reached: the values really are quantised
    assert np.abs(bg_back - background).max() <= QUANT_MAX_ERROR + 1e-7
    winner = np.argmax(np.concatenate([background[None], cams]), 0)
    for k in range(3):
        for y, x in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (5, 7), (19, 29)]:
            expected = _reference_stored(float(cams[k, y, x]), winner[y, x] == k + 1)
            assert back[k, y, x] == pytest.approx(expected, abs=1e-7)
    assert back[0, 0, 0] == 0.0  # an exact zero stays zero


def test_uint8_storage_keeps_every_grid_thresholds_background_split(tmp_path):
    rng = np.random.default_rng(1)
    cams = _cams(rng, 2, 16, 16)
    save_seed(tmp_path / "u.npz", np.array([1, 2]), cams, dtype="uint8")
    back = load_seed(tmp_path / "u.npz")[1]
    for t in [j / 200 for j in range(201)] + default_thresholds():
        t32 = np.float32(t)
        assert np.array_equal(t32 >= cams.max(0), t32 >= back.max(0)), t


def test_uint8_sweep_equals_the_float32_cams_sweep(tmp_path):
    """Every threshold's confusion of the uint8 seeds is that of the float32 CAMs they were made from, with
    several classes sharing cells (and with SIPE's background plane); float16 differs."""
    rng = np.random.default_rng(2)
    thresholds, c = default_thresholds(), 4
    conf = {"float32": 0, "uint8": 0, "float16": 0}
    for i in range(8):
        keys = np.sort(rng.choice(np.arange(1, c + 1), size=1 + i % 4, replace=False))
        cams = np.round(_cams(rng, len(keys), 24, 32), 3)  # many values share a 0.005 cell
        cams[:, 2] = cams[0, 2]  # and exact ties between classes (the first key wins)
        background = rng.random((24, 32)).astype(np.float32) if i == 5 else None
        gt = rng.integers(0, c + 1, (24, 32)).astype(np.uint8)
        for dtype in ("float16", "uint8"):
            save_seed(tmp_path / f"{i}.npz", keys, cams, background, dtype=dtype)
            _, stored, stored_bg = load_seed(tmp_path / f"{i}.npz", with_background=True)
            conf[dtype] = conf[dtype] + sweep_counts(keys, stored, gt, thresholds, c, stored_bg)
        conf["float32"] = conf["float32"] + sweep_counts(keys, cams, gt, thresholds, c, background)
    assert np.array_equal(conf["uint8"], conf["float32"])
    assert not np.array_equal(conf["float16"], conf["float32"])  # the data can tell storages apart


def test_uint8_sweep_against_float16_on_benchmark_seeds(tmp_path):
    """On benchmark 1's seeds (small): the uint8 sweep is the float32 one, and float16's differs from it by
    its own rounding only, well under 0.1 points of mIoU at every threshold."""
    from benchmarks.bench_seed_sweep import make_seed_set

    results = {}
    for dtype in ("float32", "float16", "uint8"):
        seed_dir, gt_dir, ids = make_seed_set(tmp_path / dtype, 4, 120, 160, seed_dtype=dtype)
        results[dtype] = evaluate_seeds(seed_dir, gt_dir, ids, 20, progress=False)
    f32, f16, u8 = results["float32"], results["float16"], results["uint8"]
    assert u8["miou"] == f32["miou"]
    diff = [abs(a - b) * 100 for a, b in zip(u8["miou"], f16["miou"])]
    assert 0 < max(diff) < 0.1 and abs(u8["best"]["miou"] - f16["best"]["miou"]) * 100 < 0.01


def test_load_seed_reads_float16_and_uint8_files_alike(tmp_path):
    rng = np.random.default_rng(3)
    cams = _cams(rng, 2, 8, 10)
    save_seed(tmp_path / "h.npz", np.array([4, 7]), cams)
    save_seed(tmp_path / "u.npz", np.array([4, 7]), cams, dtype="uint8")
    keys_h, half = load_seed(tmp_path / "h.npz")
    keys_u, quant = load_seed(tmp_path / "u.npz")
    assert keys_h.tolist() == keys_u.tolist() == [4, 7]
    assert np.array_equal(half, cams.astype(np.float16).astype(np.float32))
    assert np.abs(quant - half).max() <= QUANT_MAX_ERROR + 2 ** -11
    with np.load(tmp_path / "u.npz") as data:
        assert data["cams"].dtype == np.uint8 and int(data["levels"]) == 200 and data["argmax"].shape == (8, 10)
    smooth = np.stack([np.outer(np.linspace(0, 1, 120), np.linspace(1, 0, 160)) ** p for p in (1, 3)])
    save_seed(tmp_path / "h.npz", np.array([4, 7]), smooth)
    save_seed(tmp_path / "u.npz", np.array([4, 7]), smooth, dtype="uint8")
    assert (tmp_path / "u.npz").stat().st_size < 0.5 * (tmp_path / "h.npz").stat().st_size


def test_uint8_storage_refuses_values_outside_0_1(tmp_path):
    for bad in (1.5, -0.1, math.nan):
        cams = np.full((1, 2, 2), bad, np.float32)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            save_seed(tmp_path / "x.npz", np.array([1]), cams, dtype="uint8")
    with pytest.raises(ValueError, match="seed dtype"):
        save_seed(tmp_path / "x.npz", np.array([1]), np.zeros((1, 2, 2)), dtype="int4")


def test_corrupt_uint8_seed_files_give_a_clear_error(tmp_path):
    save_seed(tmp_path / "u.npz", np.array([1]), np.full((1, 30, 30), 0.5, np.float32), dtype="uint8")
    data = (tmp_path / "u.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.npz: cannot read seed file .*corrupt or truncated"):
        load_seed(tmp_path / "cut.npz")
    np.savez_compressed(tmp_path / "nolevels.npz", keys=np.array([1]), cams=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"nolevels.npz: 'cams' is uint8 \(quantised\) but 'levels' is None"):
        load_seed(tmp_path / "nolevels.npz")
    np.savez_compressed(tmp_path / "big.npz", keys=np.array([1]), cams=np.full((1, 2, 2), 201, np.uint8),
                        levels=np.array(200))
    with pytest.raises(DataError, match=r"big.npz: quantised 'cams' has values above 200"):
        load_seed(tmp_path / "big.npz")
    np.savez_compressed(tmp_path / "top.npz", keys=np.array([1, 2]), cams=np.zeros((2, 2, 2), np.uint8),
                        levels=np.array(200), argmax=np.full((2, 2), 2, np.uint8))
    with pytest.raises(DataError, match=r"top.npz: 'argmax' must be a \(H, W\) uint8 index into the 2"):
        load_seed(tmp_path / "top.npz")
    # through evaluation, the error names the file
    write_mask(tmp_path / "gt" / "cut.png", np.zeros((30, 30), np.uint8))
    with pytest.raises(DataError, match="cut.npz"):
        evaluate_seeds(tmp_path, tmp_path / "gt", ["cut"], 1, [0.3], progress=False)


class _TwoImages:
    ids = ["a", "b"]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {"id": self.ids[i], "image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                "label": np.array([1.0, 0.0, 1.0], np.float32)}


def test_infer_writes_stamped_uint8_seeds(tmp_path):
    from fsae.infer import infer_seeds
    from fsae.methods import CAM
    from fsae.stamps import StaleOutputError, read_stamp

    torch.manual_seed(0)
    model = CAM(3, backbone="tinycnn", output_stride=8)
    infer_seeds(model, _TwoImages(), tmp_path / "u8", (1.0,), True, 2, progress=False, seed_dtype="uint8")
    infer_seeds(model, _TwoImages(), tmp_path / "f16", (1.0,), True, 2, progress=False)
    with np.load(tmp_path / "u8" / "a.npz") as data:
        assert data["cams"].dtype == np.uint8 and data["keys"].tolist() == [1, 3]
    assert "uint8" in str(read_stamp(tmp_path / "u8")) and "uint8" not in str(read_stamp(tmp_path / "f16"))
    quant, half = load_seed(tmp_path / "u8" / "a.npz")[1], load_seed(tmp_path / "f16" / "a.npz")[1]
    assert np.abs(quant - half).max() <= QUANT_MAX_ERROR + 2 ** -11
    with pytest.raises(StaleOutputError):  # float16 seeds asked of a uint8 folder: made otherwise
        infer_seeds(model, _TwoImages(), tmp_path / "u8", (1.0,), True, 2, progress=False)
