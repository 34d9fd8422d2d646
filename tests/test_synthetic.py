import hashlib
import json

import numpy as np
import pytest

from fsae.data.synthetic import SyntheticSpec, generate, render_sample
from fsae.data.voc import VOCDataset
from fsae.io import read_mask


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_seeded(tmp_path):
    spec = SyntheticSpec(num_train=6, num_val=2, image_size=48, body_axes=(8.0, 12.0), seed=1)
    a = generate(tmp_path / "a", spec, progress=False)
    b = generate(tmp_path / "b", spec, progress=False)
    assert _digest(a) == _digest(b)
    c = generate(tmp_path / "c", SyntheticSpec(**{**spec.__dict__, "seed": 2}), progress=False)
    assert _digest(a) != _digest(c)


def test_layout_labels_and_masks_agree(tiny_synthetic):
    root, spec = tiny_synthetic
    train_ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val_ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train_ids) == spec.num_train and len(val_ids) == spec.num_val
    assert not set(train_ids) & set(val_ids)
    labels = json.loads((root / "cls_labels.json").read_text())
    for image_id in train_ids + val_ids:
        mask = read_mask(root / "SegmentationClass" / f"{image_id}.png", spec.num_classes)
        present = sorted(int(v) for v in np.unique(mask) if 0 < v < 255)
        assert labels[image_id] == present and present, image_id
        assert (mask == 255).any()  # the ignore band at object edges
        assert (root / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (root / "saliency" / f"{image_id}.png").is_file()
    ds = VOCDataset(root, "train", num_classes=spec.num_classes)
    sample = ds[0]
    assert sample["image"].shape == (spec.image_size, spec.image_size, 3)
    assert sample["mask"].shape == (spec.image_size, spec.image_size)
    assert sample["label"].shape == (spec.num_classes,)


def test_the_part_is_small_and_saturated():
    """The discriminative disc covers a small share of each object and is the only saturated colour."""
    spec = SyntheticSpec(image_size=128)
    ratios = []
    for i in range(20):
        image, mask, _ = render_sample(np.random.default_rng(i), spec)
        rgb = image.astype(float) / 255
        saturation = (rgb.max(-1) - rgb.min(-1)) / (rgb.max(-1) + 1e-6)
        part = saturation > 0.8
        objects = (mask > 0) & (mask < 255)
        assert not (part & (mask == 0)).any()
        ratios.append(part.sum() / objects.sum())
    assert 0.005 < np.mean(ratios) < 0.06


def test_rerun_with_other_settings_is_refused(tmp_path):
    spec = SyntheticSpec(num_train=2, num_val=1, image_size=48, body_axes=(8.0, 12.0))
    generate(tmp_path, spec, progress=False)
    with pytest.raises(FileExistsError, match="meta.json"):
        generate(tmp_path, SyntheticSpec(num_train=3, num_val=1, image_size=48, body_axes=(8.0, 12.0)),
                 progress=False)
