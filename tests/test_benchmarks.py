"""The benchmarks on tiny sizes: the fsae way and the reference way must agree (no timing asserted)."""

import math
import re

import pytest
import torch

from benchmarks import (bench_cam_inference, bench_crf, bench_data_loading, bench_fsae_step, bench_scale,
                        bench_seed_sweep)
from benchmarks.common import BenchResult, MismatchError, Row, render_markdown
from fsae.io import write_mask
import fsae.train


def test_seed_sweep_same_miou_every_threshold(tmp_path):
    result = bench_seed_sweep.run(num_images=3, height=40, width=60, workdir=tmp_path, fsae_every=30, workers=2)
    ref, ours = result.numbers["miou_reference"], result.numbers["miou_fsae"]
    assert len(ref) == len(ours) == 61
    assert ref == ours and not any(math.isnan(v) for v in ref)
    assert max(ref) > min(ref)  # the generated GT makes the threshold matter
    assert result.rows[0].check.startswith("passed")
    numbers = result.numbers
    assert numbers["miou_workers"] == ours and numbers["workers"] == 2 and numbers["workers_torch"] is False
    assert numbers["miou_uint8"] == numbers["miou_float32"] != ours  # uint8 = float32 CAMs; float16 rounds
    assert numbers["bytes"]["uint8"] < numbers["bytes"]["float16"]
    assert 0 < numbers["read_s"] and numbers["floor_ratio"] == numbers["fsae_s"] / numbers["floor_s"]
    assert all(result.rows[i].check.startswith("passed") for i in (0, 2, 4, 6))  # sweep, floor, workers, uint8


def test_seed_sweep_raises_when_the_ways_disagree(tmp_path, monkeypatch):
    real = bench_seed_sweep.evaluate_seeds

    def off_by_one_threshold(*args, **kwargs):
        out = real(*args, **kwargs)
        if len(out["miou"]) > 7:  # the sweep, not the single-threshold floor
            out["miou"][7] += 1e-12
        return out

    monkeypatch.setattr(bench_seed_sweep, "evaluate_seeds", off_by_one_threshold)
    with pytest.raises(MismatchError, match="first differing threshold 0.07"):
        bench_seed_sweep.run(num_images=2, height=24, width=32, workdir=tmp_path, fsae_every=61)


def test_cam_inference_maps_equal_within_tolerance():
    result = bench_cam_inference.run(num_images=3, image_size=32, batch_sizes=(2,), repeats=1)
    assert result.numbers["tinycnn"]["batch2"]["max_rel_diff"] <= bench_cam_inference.TOLERANCE
    # the reference itself: each image alone gives what the batch gives
    torch.manual_seed(0)
    model = bench_cam_inference.CAM(4, backbone="tinycnn", output_stride=8).eval()
    images = bench_cam_inference.make_images(2, 32)
    ref = bench_cam_inference.reference_cams(model, images)
    assert ref.shape == (2, 4, 32, 32) and ref.min() >= 0 and ref.max() > 0
    # without the flip the maps differ: the check would catch a missing flip
    no_flip = bench_cam_inference.fsae_cams(model, images, 2, flip=False)
    assert (no_flip - ref).abs().max() > 1e-3 * ref.abs().max()


def test_cam_inference_raises_when_the_ways_disagree(monkeypatch):
    real = bench_cam_inference.multiscale_cam
    monkeypatch.setattr(bench_cam_inference, "multiscale_cam", lambda *a, **k: real(*a, **k) * 1.001)
    with pytest.raises(MismatchError, match="CAM inference"):
        bench_cam_inference.run(num_images=2, image_size=32, batch_sizes=(2,), repeats=1)


def test_fsae_step_is_train_step_and_modes_agree(tmp_path):
    result = bench_fsae_step.run(batch_size=4, repeats=1, workdir=tmp_path)
    first = result.numbers["first"]
    assert first["base"]["cls"] == first["reuse"]["cls"] == first["separate"]["cls"]
    assert first["reuse"]["fsae"] == pytest.approx(first["separate"]["fsae"], rel=1e-6)
    assert first["reuse"]["loss"] == pytest.approx(first["reuse"]["cls"] + first["reuse"]["fsae"], rel=1e-6)
    assert "fsae" not in first["base"]
    assert bench_fsae_step.train_step is fsae.train.train_step  # the timed step is the training loop's own
    assert set(result.numbers["ratios"]) == {"reuse", "separate"}


def test_data_loading_workers_give_the_same_batches(tmp_path):
    result = bench_data_loading.run(num_images=8, batch_size=4, workers=2, repeats=1, step_images_per_s=1.0,
                                    workdir=tmp_path)
    assert result.numbers["images"] == 8
    assert set(result.numbers["images_per_s"]) == {0, 2}
    assert all(row.check.startswith("passed (same batches") for row in result.rows)


def test_results_markdown_has_machine_and_tables():
    result = BenchResult("1. x", "setup", [Row("w", "1 s", "0.1 s", 10.0, ">= 20x", "passed")])
    text = render_markdown([result], {"torch": "9.9", "cores available": "2"}, "python -m benchmarks.run", 3.0)
    assert "- torch: 9.9" in text and "- cores available: 2" in text
    assert "| w | 1 s | 0.1 s | 10.00x | >= 20x | passed |" in text


def test_crf_workers_give_identical_masks(tmp_path):
    result = bench_crf.run(num_images=3, height=32, width=40, workers=2, workdir=tmp_path, measure_startup=False)
    numbers = result.numbers
    assert numbers["differ"] == [] and numbers["workers"] == 2 and numbers["images"] == 3
    assert len(numbers["labels"]) > 2  # background and several classes: the masks are not trivial
    assert numbers["goal_s"] == pytest.approx(1.05 * numbers["single_s"] / 3 * 3 / 2)
    assert result.rows[0].check.startswith("passed (all 3 pseudo-masks identical")
    assert numbers["torch"] is False  # the timed processes and their workers start without torch
    assert all(len(numbers[k]) == 3 for k in ("load_before", "load_after"))
    assert "Load average (1, 5, 15 min" in result.notes[-1]


def test_crf_pool_start_up_is_timed_without_torch(tmp_path):
    result = bench_crf.run(num_images=2, height=16, width=20, workers=2, workdir=tmp_path)
    assert result.numbers["startup_s"] > 0 and result.numbers["torch"] is False
    assert "pool start-up (2 spawn workers" in result.rows[2].what


def test_crf_raises_when_the_worker_run_differs(tmp_path, monkeypatch):
    real = bench_crf.timed_refine

    def one_pixel_off_with_workers(seed_dir, image_dir, out, ids, threshold, workers, startup=False):
        result = real(seed_dir, image_dir, out, ids, threshold, 1)  # no pool: fast
        if workers > 1:
            mask = bench_crf.read_mask(out / f"{ids[1]}.png")
            mask[0, 0] = 255 - mask[0, 0]
            write_mask(out / f"{ids[1]}.png", mask)
        return result

    monkeypatch.setattr(bench_crf, "timed_refine", one_pixel_off_with_workers)
    with pytest.raises(MismatchError, match="1 of 3 masks differ, first img_00001"):
        bench_crf.run(num_images=3, height=24, width=32, workers=2, workdir=tmp_path, measure_startup=False)


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    from benchmarks import gpu

    out = tmp_path / "results_gpu.md"
    assert gpu.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "NO GPU WAS MEASURED" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "passed" in line]
    assert len(rows) == 3 * 4 + 2  # 3 recipes x (fp32 -> bf16, base and FSAE; FSAE / base, fp32 and bf16) + CAM
    cam = [r for r in rows if r.startswith("| CAM inference (PPC w/ EPS net), (32, 48), 4 scales + flip")]
    # batched and one-at-a-time CAMs agree to float32 rounding (oneDNN may block a batch of 2 differently)
    assert len(cam) == 1 and float(re.search(r"max rel. diff ([0-9.e+-]+)\)", cam[0]).group(1)) <= 1e-6


def test_gpu_benchmark_refuses_a_bf16_step_outside_the_tolerance(monkeypatch):
    from benchmarks import gpu

    monkeypatch.setattr(gpu, "BF16_TOLERANCE", 0.0)
    monkeypatch.setattr(gpu, "RECIPES", {"PPC w/ EPS, ResNet-38": "ppc_eps"})
    with pytest.raises(MismatchError, match="PPC w/ EPS, ResNet-38 bf16"):
        gpu.run(tiny=True, device="cpu", steps=1, repeats=1)


def test_scale_projection_at_tiny_sizes(tmp_path):
    result = bench_scale.run(num_images=2, workers=2, workdir=tmp_path, sets=("COCO train",), size_scale=0.08)
    m = result.numbers["measured"]["COCO train"]
    assert len(result.rows) == 4 and all(row.check.startswith(("passed", "full set")) for row in result.rows)
    assert m["bytes"]["uint8"] < m["bytes"]["float16"] and m["torch_in_workers"] is False
    assert all(v >= 0 for v in (*m["eval_s"].values(), *m["crf_s"].values()))
    full_f16 = m["bytes"]["float16"] * 82_081 / 1e9
    assert f"full set: {full_f16:.1f} GB" in result.rows[0].check  # the projection is per file x set size
