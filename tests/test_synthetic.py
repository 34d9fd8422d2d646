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


def _grating_contrast(grey, region, period, angle):
    """Amplitude of the grating of ``period`` at ``angle`` within ``region``: the projection of the grey
    image on cos / sin of that grating (a plain Fourier coefficient), with the best phase."""
    yy, xx = np.mgrid[0:grey.shape[0], 0:grey.shape[1]]
    t = 2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
    values = grey[region] - grey[region].mean()
    c, s = np.cos(t[region]), np.sin(t[region])
    return 2 * np.hypot((values * c).mean(), (values * s).mean())


def _single_object_samples(spec, count):
    samples = []
    for i in range(200):
        image, mask, _, parts = render_sample(np.random.default_rng(i), spec, with_parts=True)
        labels = [v for v in np.unique(mask) if 0 < v < 255]
        if len(labels) == 1 and parts.any():
            samples.append((image.astype(float).mean(-1) / 255, mask, parts, int(labels[0]) - 1))
        if len(samples) == count:
            return samples
    raise AssertionError("too few single-object images")


def test_the_part_is_small_with_a_strong_fine_grating_and_the_body_a_faint_coarse_one():
    """The stated properties (fsae/data/synthetic.py): the part covers a small share of the object; its
    grating is fine and strong, the body's coarse and faint, both at the class orientation; a blur of sigma
    1.5 (the strong view's range is 0.1-2) removes most of the part's grating and keeps most of the body's."""
    from scipy.ndimage import gaussian_filter

    spec = SyntheticSpec(max_objects=1)
    for grey, mask, parts, cls in _single_object_samples(spec, 6):
        body = (mask == cls + 1) & ~parts
        assert 0.02 < parts.sum() / (parts.sum() + body.sum()) < 0.2
        angle = np.pi * cls / spec.num_classes
        # the generator's periods are drawn per object: take the best period of each range
        part_periods = np.linspace(*spec.part_period, 9)
        body_periods = np.linspace(*spec.stripe_period, 9)
        part = max(_grating_contrast(grey, parts, p, angle) for p in part_periods)
        coarse = max(_grating_contrast(grey, body, p, angle) for p in body_periods)
        assert part > 0.5 * spec.part_amplitude  # ~ the generator's amplitude (JPEG-free, noise averages out)
        assert 0.5 * spec.stripe_amplitude[0] < coarse < 1.5 * spec.stripe_amplitude[1]
        assert part > 4 * coarse
        # the class orientation carries the body cue: the orthogonal orientation has far less of it
        other = max(_grating_contrast(grey, body, p, angle + np.pi / 2) for p in body_periods)
        assert coarse > 2 * other
        blurred = gaussian_filter(grey, 1.5)
        part_after = max(_grating_contrast(blurred, parts, p, angle) for p in part_periods)
        body_after = max(_grating_contrast(blurred, body, p, angle) for p in body_periods)
        assert part_after < 0.25 * part and body_after > 0.6 * coarse


def test_rerun_with_other_settings_is_refused(tmp_path):
    spec = SyntheticSpec(num_train=2, num_val=1, image_size=48, body_axes=(8.0, 12.0))
    generate(tmp_path, spec, progress=False)
    with pytest.raises(FileExistsError, match="meta.json"):
        generate(tmp_path, SyntheticSpec(num_train=3, num_val=1, image_size=48, body_axes=(8.0, 12.0)),
                 progress=False)


def test_grey_clutter_is_flat_blobs_on_a_noisy_background():
    """Grey blobs are flat fills (no pixel noise): with ``clutter`` (4 by default) the background has flat
    3 x 3 patches, without it none."""
    from scipy.ndimage import generic_filter

    def flat_background_share(spec):
        image, mask, _ = render_sample(np.random.default_rng(3), spec)
        grey = image.astype(float).mean(-1)
        flat = generic_filter(grey, np.ptp, size=3) == 0
        return (flat & (mask == 0)).sum() / (mask == 0).sum()

    assert flat_background_share(SyntheticSpec(clutter=0)) < 0.001
    assert flat_background_share(SyntheticSpec()) > 0.02


def _body_orientation_profile(spec, count):
    """Per single-object image: (class, the body grating's contrast at each class orientation, best period)."""
    periods = np.linspace(*spec.stripe_period, 7)
    rows = []
    for grey, mask, parts, cls in _single_object_samples(spec, count):
        body = (mask == cls + 1) & ~parts
        rows.append((cls, np.array([max(_grating_contrast(grey, body, p, np.pi * k / spec.num_classes)
                                        for p in periods) for k in range(spec.num_classes)])))
    return rows


def _pair_distances(rows):
    """Mean distance between the normalised orientation profiles of same-class and of different-class pairs."""
    same, other = [], []
    for i, (ci, pi) in enumerate(rows):
        for cj, pj in rows[i + 1:]:
            d = np.abs(pi / pi.sum() - pj / pj.sum()).sum()
            (same if ci == cj else other).append(d)
    return np.mean(same), np.mean(other)


def test_a_per_object_body_is_not_a_class_cue():
    """``orientation_cue=0``: each object's body grating takes a random class's orientation, so the body
    statistics of two objects of one class differ as much as those of two classes, and the body's dominant
    orientation is its class's for about 1 object in 4; with ``orientation_cue=1`` it always is, and
    same-class bodies are alike."""
    neutral = _body_orientation_profile(SyntheticSpec(max_objects=1, orientation_cue=0.0), 24)
    cued = _body_orientation_profile(SyntheticSpec(max_objects=1, orientation_cue=1.0), 24)
    assert all(int(np.argmax(p)) == c for c, p in cued)
    share = np.mean([int(np.argmax(p)) == c for c, p in neutral])
    assert share < 0.5  # 0.25 expected
    same, other = _pair_distances(neutral)
    assert 0.7 < same / other < 1.3
    same, other = _pair_distances(cued)
    assert same / other < 0.5


def test_the_demo_sets_part_covers_about_a_fifth_of_its_object():
    """``fsae.demo.DEMO_SET``: a part of radius 7-10 in bodies of semi-axes 15-24, so E[r^2] / E[a b] =
    ((10^3 - 7^3) / 9) / 19.5^2 = 0.19 of the object (less where the disc passes the body's edge, more where
    the 1-px ignore band trims the body); every part pixel belongs to its object."""
    from fsae.demo import DEMO_SET, demo_spec

    expected = ((10 ** 3 - 7 ** 3) / 9) / 19.5 ** 2
    assert DEMO_SET["part_radius"] == (7.0, 10.0) and DEMO_SET["body_axes"] == (15.0, 24.0)
    spec = demo_spec(0)
    part_pixels = object_pixels = 0
    for i in range(60):
        _, mask, _, parts = render_sample(np.random.default_rng([spec.seed, 0, i]), spec, with_parts=True)
        assert ((mask > 0) | ~parts).all()
        part_pixels += (parts & (mask > 0) & (mask < 255)).sum()
        object_pixels += ((mask > 0) & (mask < 255)).sum()
    assert abs(part_pixels / object_pixels - expected) < 0.05
