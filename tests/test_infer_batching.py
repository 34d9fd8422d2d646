"""CAM inference batching (infer.batch_size, auto) changes speed only."""

import numpy as np
import pytest
import torch

import fsae.infer as infer
from fsae.config import load_config
from fsae.data.voc import VOCDataset
from fsae.errors import ConfigError
from fsae.infer import (BATCH_CANDIDATES, batches_by_size, group_tensors, infer_seeds, largest_fitting,
                        multiscale_maps, pick_batch_size)
from fsae.methods import build_method
from fsae.protocol import Protocol

SCALES = (1.0, 0.5, 1.5)
FP16_STEP = 2.0**-11  # one float16 step in [0.5, 1): the rounding of the seed files


@pytest.fixture(scope="module")
def model_and_set(tiny_synthetic):
    root, _ = tiny_synthetic
    torch.manual_seed(0)
    model = build_method(load_config(None, ["model.width=8"]).model, 4).eval()
    return model, VOCDataset(root, "train", num_classes=4)


def seeds(path):
    out = {}
    for f in sorted(path.glob("*.npz")):
        with np.load(f) as data:
            out[f.name] = {k: data[k] for k in data.files}
    return out


PIL_STRIDED = Protocol("cam", resize="pil_bicubic", upsample="strided_up", strided_cam=True)


@pytest.mark.parametrize("protocol", [None, PIL_STRIDED], ids=["bilinear", "pil_strided"])
def test_seeds_do_not_depend_on_the_batch(model_and_set, tmp_path, protocol):
    model, dataset = model_and_set
    made = {}
    for batch in (1, 5, 24, "auto"):
        result = infer_seeds(model, dataset, tmp_path / str(batch), SCALES, True, batch, progress=False,
                             protocol=protocol)
        assert result["written"] == len(dataset) == 24
        assert result["batch_size"] == batch if batch != "auto" else result["batch_size"] in BATCH_CANDIDATES
        made[batch] = seeds(tmp_path / str(batch))
    reference = made[1]
    for batch, files in made.items():
        assert files.keys() == reference.keys()
        worst, differ = 0.0, 0
        for name, arrays in files.items():
            assert arrays.keys() == reference[name].keys()
            np.testing.assert_array_equal(arrays["keys"], reference[name]["keys"])
            for key in set(arrays) - {"keys"}:
                d = np.abs(arrays[key].astype(np.float64) - reference[name][key].astype(np.float64))
                worst, differ = max(worst, float(d.max(initial=0.0))), differ + bool(d.any())
        print(f"batch {batch}: {differ} arrays differ from batch 1, at most {worst:.1e}")
        assert worst <= FP16_STEP  # at most the last bit of a float16 (measured: 0, or 4.9e-4 = 2^-11)


def test_the_unrounded_maps_of_a_batch_equal_those_of_its_images_one_by_one(model_and_set):
    model, dataset = model_and_set
    model.eval()
    group = [dataset[i] for i in range(6)]
    images, labels = group_tensors(group, "bilinear", "cpu")
    together = multiscale_maps(model, images, SCALES, True)["cams"]
    alone = torch.cat([multiscale_maps(model, images[i:i + 1], SCALES, True)["cams"] for i in range(6)])
    diff = ((together - alone).abs().max() / alone.abs().max()).item()
    print(f"batch of 6 vs one by one: max difference / max CAM {diff:.1e}")
    assert diff <= 1e-5


def test_auto_keeps_the_fastest_candidate_on_cpu(monkeypatch):
    """A fake clock: a pass of b images takes b x (1 + (b - 4)^2 / 8) ms, fastest per image at b = 4."""
    now, calls = [0.0], []

    def run_batch(images, labels):
        b = images.shape[0]
        calls.append(b)
        assert labels.shape == (b, 4) and torch.equal(images, images[:1].expand_as(images))
        now[0] += b * (1 + (b - 4) ** 2 / 8) * 1e-3

    monkeypatch.setattr(infer.time, "perf_counter", lambda: now[0])
    image, label = torch.rand(1, 3, 8, 8), torch.ones(1, 4)
    picked, how = pick_batch_size(run_batch, image, label, limit=100)
    assert picked == 4 and calls == [1, 1, 2, 4, 8, 16]  # a warm-up pass, then each candidate once
    assert how.startswith("fastest per image of 1: 2.1 ms, 2: 1.5 ms, 4: 1.0 ms")
    calls.clear()
    assert pick_batch_size(run_batch, image, label, limit=3)[0] == 2 and calls == [1, 1, 2]  # no batch > the set
    calls.clear()
    assert pick_batch_size(run_batch, image, label, limit=1)[0] == 1 and calls == []  # one image: nothing to time


def test_auto_on_cuda_takes_the_largest_batch_in_half_the_free_memory():
    gib = 2**30
    assert largest_fitting([1, 2, 4, 8, 16], gib, 10 * gib) == 4  # 4 GiB <= 5 GiB < 8 GiB
    assert largest_fitting([1, 2, 4, 8, 16], gib, 100 * gib) == 16
    assert largest_fitting([1, 2, 4, 8, 16], gib, gib) == 1  # none fits: the smallest


def test_batch_size_accepts_auto_and_refuses_other_words():
    assert load_config(None, ["infer.batch_size=auto"]).infer.batch_size == "auto"
    assert load_config(None, ["infer.batch_size=8"]).infer.batch_size == 8
    for bad in ("fast", "0"):
        with pytest.raises(ConfigError, match=r"infer.batch_size = .* expected an integer \(>= 1, or auto\)"):
            load_config(None, [f"infer.batch_size={bad}"])
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        next(batches_by_size([], [0], "auto"))


def test_the_held_out_monitor_with_auto_scores_as_with_a_fixed_batch(model_and_set):
    from fsae.train import evaluate

    model, dataset = model_and_set
    fixed = evaluate(model, dataset, load_config(None, ["infer.batch_size=4"]), "cpu", scales=[1.0])
    auto = evaluate(model, dataset, load_config(None, ["infer.batch_size=auto"]), "cpu", scales=[1.0])
    assert auto == fixed
    model.eval()  # evaluate leaves it in training mode
