"""`fsae predict`: the seed of any image equals `fsae cam` + the run's threshold on the same pixels; the
classifier's own classes; the figure and masks written; bad labels named."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsae.augment import normalize
from fsae.cli import main as cli
from fsae.evaluate import seed_to_mask
from fsae.infer import to_tensor_image
from fsae.io import read_image, read_json, read_mask, write_image, write_json, write_text
from fsae.seeds import load_seed
from fsae.train import model_from_checkpoint, train
from tests.test_report import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_synthetic, tmp_path_factory):
    """A 1-epoch run with seeds (`fsae cam`, scales 1.0 and 1.5 + flip) and their evaluation."""
    root, _ = tiny_synthetic
    run = tmp_path_factory.mktemp("predict") / "run"
    cfg = tiny_config(root, epochs=1)
    cfg.infer.scales = [1.0, 1.5]
    train(cfg, run, progress=False)
    assert cli(["cam", str(run)]) == 0
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"), "--num-classes", "4",
                "--sweep", "0", "0.3", "0.05", "--out", str(run / "eval" / "seeds.json")]) == 0
    return run


def with_foreground(run, threshold, n):
    """The first ``n`` image ids whose `fsae cam` seed has foreground at ``threshold`` (a 1-epoch network's CAM
    is zero for some classes: equal all-background maps would prove nothing)."""
    ids = []
    for path in sorted((run / "seeds").glob("*.npz")):
        if seed_to_mask(*load_seed(path), threshold).any() and len(ids) < n:
            ids.append(path.stem)
    return ids


def names_of(root, image_id):
    return ",".join(f"class{c}" for c in read_json(root / "cls_labels.json")[image_id])


def test_seed_equals_fsae_cam_at_the_runs_threshold(run, tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    threshold = read_json(run / "eval" / "seeds.json")["best"]["threshold"]
    out, labels_seen = tmp_path / "out", set()
    for image_id in with_foreground(run, threshold, 3):
        images = [str(root / "JPEGImages" / f"{image_id}.jpg")]
        assert cli(["predict", str(run), *images, "--labels", names_of(root, image_id), "--threshold", "best",
                    "--out", str(out)]) == 0
        keys, cams = load_seed(run / "seeds" / f"{image_id}.npz")
        expected = seed_to_mask(keys, cams, threshold)
        np.testing.assert_array_equal(read_mask(out / "seed" / f"{image_id}.png"), expected)
        labels_seen |= set(np.unique(expected).tolist())
        assert (out / f"{image_id}.png").read_bytes()[:8] == PNG_MAGIC
    assert len(labels_seen) > 1
    record = read_json(out / "predictions.json")
    assert record["threshold"] == threshold and "seeds.json" in record["threshold_from"]


def test_png_of_another_size_equals_fsae_cam_on_the_same_pixels(run, tiny_synthetic, tmp_path):
    """A 50 x 37 image: `fsae cam` reads it as a JPEG of a one-image data set, predict as a lossless PNG of
    the JPEG's decoded pixels, so both see the same pixels."""
    root, _ = tiny_synthetic
    image_id = with_foreground(run, 0.2, 1)[0]
    small = Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB").resize((50, 37), Image.BILINEAR)
    odd = tmp_path / "odd_set"
    write_image(odd / "JPEGImages" / "odd.jpg", np.asarray(small))
    write_text(odd / "ImageSets" / "Segmentation" / "odd.txt", "odd\n")
    write_json(odd / "cls_labels.json", {"odd": read_json(root / "cls_labels.json")[image_id]})
    png = tmp_path / "odd.png"
    Image.fromarray(read_image(odd / "JPEGImages" / "odd.jpg")).save(png)
    ckpt = run / "checkpoints" / "last.pt"
    assert cli(["cam", str(run / "config.yaml"), "--checkpoint", str(ckpt), "--set", f"data.root={odd}",
                "--split", "odd", "--out", str(tmp_path / "cam")]) == 0
    out = tmp_path / "out"
    assert cli(["predict", str(ckpt), str(png), "--labels", names_of(root, image_id), "--threshold", "0.2",
                "--crf", "--out", str(out)]) == 0
    keys, cams = load_seed(tmp_path / "cam" / "odd.npz")
    expected = seed_to_mask(keys, cams, 0.2)
    assert expected.shape == (37, 50) and len(np.unique(expected)) > 1
    np.testing.assert_array_equal(read_mask(out / "seed" / "odd.png"), expected)
    assert read_mask(out / "crf" / "odd.png").shape == (37, 50)
    figure = Image.open(out / "odd.png")
    labels = len(keys)
    assert figure.width > figure.height * (labels + 2) * 0.6  # image, a CAM per class, seed, CRF side by side


def test_without_labels_the_classifiers_own_classes(run, tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    path = root / "JPEGImages" / "train_00002.jpg"
    model, _ = model_from_checkpoint(run / "checkpoints" / "last.pt")
    with torch.no_grad():
        probs = torch.sigmoid(model(normalize(to_tensor_image(read_image(path))[None])).logits[0]).numpy()
    for args, expected in ((["--min-prob", "0.3"], [c + 1 for c in range(4) if probs[c] >= 0.3]),
                           (["--top-k", "2"], sorted(int(c) + 1 for c in np.argsort(-probs)[:2]))):
        out = tmp_path / args[0]
        assert cli(["predict", str(run), str(path), *args, "--out", str(out)]) == 0
        entry = read_json(out / "predictions.json")["images"][0]
        assert [c["label"] for c in entry["classes"]] == expected
        assert [c["prob"] for c in entry["classes"]] == pytest.approx([float(probs[c - 1]) for c in expected])
        seed = read_mask(out / "seed" / "train_00002.png")
        assert set(np.unique(seed)) <= {0, *expected}


def test_unknown_label_is_one_line_naming_the_classes(run, tiny_synthetic, tmp_path, capsys):
    root, _ = tiny_synthetic
    code = cli(["predict", str(run), str(root / "JPEGImages" / "train_00000.jpg"), "--labels", "cat",
                "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'cat'" in err[0] and "class1, class2, class3, class4" in err[0]
    assert cli(["predict", str(run), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
