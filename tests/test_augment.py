"""Weak and strong views (fsae.augment): geometry is kept, sampling is seeded, each op does its job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fsae.augment import (
    COLOR_OP_RANGES,
    COLOR_OPS,
    IMAGENET_MEAN,
    apply_color_op,
    blur_kernel_size,
    denormalize,
    normalize,
    random_geometry,
    sample_color_ops,
    sample_generator,
    strong_view,
    weak_view,
)
from fsae.labels import IGNORE_INDEX

SEEDS = range(40)


# ---------------------------------------------------------------------------------------------------
# strong view: geometry


def test_strong_view_keeps_a_single_pixel_in_place():
    # Black image with one bright pixel. Every op is pixelwise (with image-wide statistics) except
    # Sharpness, a 3x3 filter drawn at most once, so the spot may only spread to its 3x3 neighbourhood.
    # Solarize can erase the spot (after AutoContrast it is 1 and turns into 0 = background); when it
    # survives anywhere, the spot pixel itself must differ from the background.
    image = torch.zeros(2, 3, 24, 24)
    image[:, :, 5, 7] = 0.9
    survived = 0
    for seed in SEEDS:
        out = strong_view(image, sample_generator(seed), blur_prob=0.0)
        for b in range(2):
            diff = (out[b] - out[b, :, 20:21, 20:21]).abs().sum(0)  # vs a far pixel, (H, W)
            outside = diff.clone()
            outside[4:7, 6:9] = 0
            assert outside.max() < 1e-5, f"seed {seed}: content moved away from (5, 7)"
            if diff.max() > 0:
                survived += 1
                assert diff[5, 7] > 0, f"seed {seed}: the spot left (5, 7)"
    assert survived >= 0.8 * 2 * len(SEEDS)


def test_strong_view_blur_keeps_the_spot_centred():
    image = torch.zeros(1, 3, 24, 24)
    image[:, :, 5, 7] = 0.9
    for seed in range(10):
        out = strong_view(image, sample_generator(seed), num_ops=0, blur_prob=1.0)[0, 0]
        assert divmod(int(out.argmax()), 24) == (5, 7)
        assert out[5, 7] < 0.9  # blurred
        # a Gaussian is symmetric about the spot (rows 0-1 also get the spot's reflection in the border)
        torch.testing.assert_close(out[5, 3:7], out[5, 8:12].flip(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[2:5, 7], out[6:9, 7].flip(0), atol=1e-6, rtol=0)


def test_strong_view_keeps_a_vertical_edge_column():
    # Left and right of column 13 each row has its own random colour, constant along the row: the
    # horizontal gradient is zero except at the edge, and no op may create one elsewhere (Sharpness may
    # widen the edge by one pixel and leaves the 1-pixel image border unfiltered).
    height, width, edge = 24, 32, 13
    for seed in SEEDS:
        gen = sample_generator(1000 + seed)
        left = torch.rand(2, 3, height, 1, generator=gen)
        right = torch.rand(2, 3, height, 1, generator=gen)
        image = torch.where(torch.arange(width) < edge, left, right)
        out = strong_view(image, sample_generator(seed), blur_prob=0.0)
        grad = (out[..., 1:] - out[..., :-1]).abs().amax(dim=(1, 2))  # (B, W - 1)
        assert (grad.argmax(dim=1) - (edge - 1)).abs().max() <= 1
        elsewhere = grad.clone()
        elsewhere[:, [0, width - 2, edge - 2, edge - 1, edge]] = 0
        assert elsewhere.max() < 1e-5, f"seed {seed}: an edge appeared away from column {edge}"


@pytest.mark.parametrize("dims", [[-1], [-2]])
def test_strong_view_commutes_with_flips(dims):
    # Same seed, flipped input -> flipped output: true for pixelwise ops, symmetric filters and image
    # statistics, false for any translate/rotate/shear. A few pixels may differ where a float rounding
    # difference crosses a Posterize/Solarize/Equalize step.
    image = torch.rand(2, 3, 20, 28, generator=sample_generator(0))
    mismatched = 0
    for seed in range(20):
        out = strong_view(image, sample_generator(seed))
        out_flipped = strong_view(image.flip(dims), sample_generator(seed)).flip(dims)
        mismatched += int(((out - out_flipped).abs() > 1e-4).sum())
    assert mismatched < 0.002 * 20 * image.numel()


def test_strong_view_is_seeded_and_in_range():
    image = torch.rand(3, 3, 16, 16, generator=sample_generator(1))
    a = strong_view(image, sample_generator(7))
    b = strong_view(image, sample_generator(7))
    c = strong_view(image, sample_generator(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == image.shape and a.dtype == image.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, image)


def test_blur_kernel_size_is_odd_and_capped():
    assert blur_kernel_size(0.1, 100, 100) == 3
    assert blur_kernel_size(2.0, 100, 100) == 13
    assert blur_kernel_size(2.0, 8, 6) == 5
    assert blur_kernel_size(2.0, 8, 7) == 7


# ---------------------------------------------------------------------------------------------------
# strong view: the 9 colour ops


def _image() -> torch.Tensor:
    return torch.rand(3, 12, 10, generator=sample_generator(3)) * 0.6 + 0.2


def test_identity_brightness_posterize_solarize():
    x = _image()
    assert torch.equal(apply_color_op(x, "Identity"), x)
    torch.testing.assert_close(apply_color_op(x, "Brightness", 1.5), (x * 1.5).clamp(max=1.0))
    torch.testing.assert_close(apply_color_op(x, "Posterize", 4), torch.floor(x * 16) / 16)
    torch.testing.assert_close(apply_color_op(x, "Solarize", 0.5), torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(apply_color_op(x, "Solarize", 0.0), 1 - x)


def test_color_and_contrast_factors():
    x = _image()
    gray = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # torchvision's grey weights
    # Color is saturation: factor 0 gives the grey image, 1 the input
    torch.testing.assert_close(apply_color_op(x, "Color", 0.0), gray.expand(3, -1, -1))
    torch.testing.assert_close(apply_color_op(x, "Color", 1.0), x)
    # Contrast: factor 0 gives the mean grey level everywhere
    torch.testing.assert_close(apply_color_op(x, "Contrast", 0.0), torch.full_like(x, float(gray.mean())))
    torch.testing.assert_close(apply_color_op(x, "Contrast", 0.5), (x + gray.mean()) / 2)


def test_autocontrast_and_equalize():
    x = _image()
    low = x.amin(dim=(1, 2), keepdim=True)
    high = x.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(apply_color_op(x, "AutoContrast"), (x - low) / (high - low))
    # Equalize spreads a low-contrast histogram over [0, 1] per channel and keeps the order of values
    low_contrast = torch.rand(3, 64, 64, generator=sample_generator(4)) * 0.1 + 0.4
    out = apply_color_op(low_contrast, "Equalize")
    assert torch.equal(out, TF.equalize(low_contrast))
    for c in range(3):
        assert out[c].max() == 1.0 and out[c].min() == 0.0
        order = low_contrast[c].flatten().argsort()
        assert (out[c].flatten()[order].diff() >= 0).all()


def test_sharpness():
    x = _image()
    torch.testing.assert_close(apply_color_op(x, "Sharpness", 1.0), x)
    # factor 0: the 3x3 smoothing kernel (1s around a 5) inside, border unchanged
    kernel = torch.ones(3, 1, 3, 3)
    kernel[:, :, 1, 1] = 5
    smooth = F.conv2d(x[None], kernel / 13, groups=3)[0]
    out = apply_color_op(x, "Sharpness", 0.0)
    torch.testing.assert_close(out[:, 1:-1, 1:-1], smooth)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, :, -1], x[:, :, -1])


def test_apply_color_op_rejects_unknown_and_missing_magnitude():
    with pytest.raises(ValueError, match="Rotate"):
        apply_color_op(_image(), "Rotate", 30)
    with pytest.raises(ValueError, match="magnitude"):
        apply_color_op(_image(), "Brightness")


def test_sample_color_ops_ranges_and_coverage():
    seen = set()
    for seed in SEEDS:
        ops = sample_color_ops(3, sample_generator(seed))
        names = [name for name, _ in ops]
        assert len(set(names)) == 3
        for name, magnitude in ops:
            bounds = COLOR_OP_RANGES[name]
            if bounds is None:
                assert magnitude is None
            else:
                assert bounds[0] <= magnitude <= bounds[1]
            if name == "Posterize":
                assert isinstance(magnitude, int)
        seen.update(names)
    assert seen == set(COLOR_OPS)
    assert sample_color_ops(0, sample_generator(0)) == []
    with pytest.raises(ValueError):
        sample_color_ops(10)


# ---------------------------------------------------------------------------------------------------
# weak view (colour jitter)


def test_weak_view_identity_without_jitter():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(weak_view(x, sample_generator(0), jitter=None), x)


def test_weak_view_per_image_seeded_in_range():
    x = torch.rand(1, 3, 16, 16, generator=sample_generator(2)).expand(4, -1, -1, -1).contiguous()
    out = weak_view(x, sample_generator(5))
    assert out.min() >= 0 and out.max() <= 1
    assert out.shape == x.shape
    for i in range(1, 4):
        assert not torch.allclose(out[0], out[i])  # each image gets its own jitter
    assert torch.equal(out, weak_view(x, sample_generator(5)))
    assert not torch.equal(out, weak_view(x, sample_generator(6)))


def test_weak_view_brightness_range_and_no_geometry():
    # brightness only: each image is scaled by one factor in [0.7, 1.3]
    x = torch.rand(8, 3, 10, 10, generator=sample_generator(4)) * 0.5 + 0.25
    out = weak_view(x, sample_generator(0), jitter=(0.3, 0.0, 0.0, 0.0))
    ratio = out / x
    factor = ratio.flatten(1).mean(1)
    torch.testing.assert_close(ratio, factor.view(-1, 1, 1, 1).expand_as(ratio))
    assert factor.min() >= 0.7 and factor.max() <= 1.3
    assert factor.max() - factor.min() > 0.1
    # full jitter on an image constant in space stays constant in space (nothing moves)
    flat = torch.rand(4, 3, 1, 1, generator=sample_generator(9)).expand(-1, -1, 6, 6).contiguous()
    out = weak_view(flat, sample_generator(1))
    torch.testing.assert_close(out, out[..., :1, :1].expand_as(out))


# ---------------------------------------------------------------------------------------------------
# random geometry


def _labelled_image():
    """(H, W) mask of label blocks and a uint8 (H, W, 3) image whose colour encodes the label."""
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 200), np.uint8)
    for label in range(1, 6):
        top, left = rng.integers(0, 90), rng.integers(0, 160)
        mask[top:top + rng.integers(20, 40), left:left + rng.integers(25, 50)] = label
    palette = np.array(
        [[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250]], np.uint8
    )
    return palette[mask], mask, torch.from_numpy(palette).float() / 255


def test_random_geometry_keeps_mask_and_image_aligned():
    image, mask, palette = _labelled_image()
    for seed in range(12):
        out = random_geometry(image, mask, long_side=(100, 300), crop_size=160,
                              generator=sample_generator(seed))
        img, lbl, valid = out["image"], out["mask"], out["valid"]
        pixels = img.permute(1, 2, 0)[valid]  # (N, 3)
        colour_label = torch.cdist(pixels, palette).argmin(1)
        agree = (colour_label == lbl[valid]).float().mean()
        assert agree > 0.99, f"seed {seed}: only {agree:.3f} of pixels agree"
        # away from label boundaries the colour is exactly the label's colour
        padded = F.pad(lbl[None, None].float(), (2, 2, 2, 2), mode="replicate")
        uniform = (F.max_pool2d(padded, 5, 1) == -F.max_pool2d(-padded, 5, 1))[0, 0] & valid
        torch.testing.assert_close(img.permute(1, 2, 0)[uniform], palette[lbl[uniform]], atol=2 / 255, rtol=0)


def test_random_geometry_pads_small_images_as_ignore():
    image, mask, _ = _labelled_image()
    offsets = set()
    for seed in range(6):
        out = random_geometry(image, mask, long_side=(100, 100), crop_size=160,
                              generator=sample_generator(seed))
        p = out["params"]
        assert p["resized_size"] == (60, 100) and p["crop_hw"] == (60, 100)
        assert out["image"].shape == (3, 160, 160) and out["mask"].shape == (160, 160)
        assert out["valid"].sum() == 60 * 100
        (top, left) = p["dst_offset"]
        assert out["valid"][top:top + 60, left:left + 100].all()
        assert (out["mask"][~out["valid"]] == IGNORE_INDEX).all()
        assert (out["mask"][out["valid"]] != IGNORE_INDEX).all()
        assert (out["image"][:, ~out["valid"]] == 0).all()
        offsets.add((top, left))
    assert len(offsets) > 1  # the image is placed at a random offset


def test_random_geometry_sizes_and_long_side():
    image, mask, _ = _labelled_image()
    long_sides = set()
    for seed in SEEDS:
        out = random_geometry(image, mask, long_side=(170, 260), crop_size=96,
                              generator=sample_generator(seed))
        h, w = out["params"]["resized_size"]
        assert 170 <= max(h, w) <= 260
        assert abs(h / w - 120 / 200) < 0.01
        assert out["image"].shape == (3, 96, 96) and out["image"].dtype == torch.float32
        assert out["valid"].all() and out["mask"].dtype == torch.long
        long_sides.add(max(h, w))
    assert len(long_sides) > 20


def test_random_geometry_flip_and_no_resize_no_crop():
    image, mask, _ = _labelled_image()
    flips = set()
    for seed in range(10):
        out = random_geometry(image, mask, long_side=None, crop_size=None, generator=sample_generator(seed))
        expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        expected_mask = torch.from_numpy(mask).long()
        if out["params"]["hflip"]:
            expected, expected_mask = expected.flip(-1), expected_mask.flip(-1)
        torch.testing.assert_close(out["image"], expected)
        assert torch.equal(out["mask"], expected_mask)
        flips.add(out["params"]["hflip"])
    assert flips == {True, False}
    out = random_geometry(image, hflip=False, long_side=None, crop_size=None)
    torch.testing.assert_close(out["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert "mask" not in out


def test_random_geometry_seeded_and_accepts_tensors():
    image, mask, _ = _labelled_image()
    a = random_geometry(image, mask, generator=sample_generator(3))
    b = random_geometry(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask),
                        generator=sample_generator(3))
    c = random_geometry(image, mask, generator=sample_generator(4))
    assert a["image"].shape == (3, 448, 448)
    for key in ("image", "mask", "valid"):
        assert torch.equal(a[key], b[key])
    assert a["params"] == b["params"]
    assert a["params"] != c["params"]
    with pytest.raises(ValueError, match="mask shape"):
        random_geometry(image, mask[:-1])
    with pytest.raises(ValueError, match="uint8"):
        random_geometry(image.astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# normalisation


def test_normalize_round_trip():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(denormalize(normalize(x)), x)
    mean_image = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(normalize(mean_image), torch.zeros(3, 4, 4))
    torch.testing.assert_close(normalize(torch.ones(3, 1, 1))[:, 0, 0],
                               torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


# ------------------------------------------------------- the FSAE authors' strong view (fsae.* options)
AUTHORS_RANGES = {**{op: (0.05, 0.95) for op in ("Brightness", "Color", "Contrast", "Sharpness")},
                  "Posterize": (4, 7)}


def test_strong_ops_with_replacement_frequencies():
    # obeychoi0120/wseg ssl data/augmentation/randaugment.py:221: random.choices(range(9), k=5)
    gen = torch.Generator().manual_seed(0)
    draws = [[name for name, _ in sample_color_ops(5, gen, replacement=True)] for _ in range(4000)]
    counts = {op: sum(d.count(op) for d in draws) for op in COLOR_OPS}
    for op in COLOR_OPS:
        assert counts[op] / 20000 == pytest.approx(1 / 9, abs=0.01), op
    repeated = sum(len(set(d)) < 5 for d in draws) / len(draws)
    assert repeated == pytest.approx(1 - 9 * 8 * 7 * 6 * 5 / 9**5, abs=0.03)  # 0.744: P(some op twice)
    distinct = [[name for name, _ in sample_color_ops(5, gen)] for _ in range(200)]
    assert all(len(set(d)) == 5 for d in distinct)  # the default draws distinct ops


def test_authors_magnitude_ranges():
    gen = torch.Generator().manual_seed(1)
    seen: dict[str, list] = {}
    for _ in range(3000):
        for name, magnitude in sample_color_ops(5, gen, replacement=True, ranges=AUTHORS_RANGES):
            seen.setdefault(name, []).append(magnitude)
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):  # darkening only: factors below 1
        assert 0.05 <= min(seen[op]) < 0.07 and 0.93 < max(seen[op]) <= 0.95, op
    assert sorted(set(seen["Posterize"])) == [4, 5, 6, 7]  # int(uniform(4, 8)): 4..7 bits
    assert all(isinstance(b, int) for b in seen["Posterize"])


def test_blur_kernel_drawn_once_per_run():
    from fsae.augment import run_blur_kernel
    from fsae.config import FSAEConfig
    from fsae.two_view import TwoViewFSAE

    # data/dataset.py:92-93: k = int(random() * 4.95), k + 1 if even -> P(1) = P(3) = 2 / 4.95, P(5) = 0.95 / 4.95
    kernels = [run_blur_kernel(seed) for seed in range(3000)]
    for k, p in ((1, 2 / 4.95), (3, 2 / 4.95), (5, 0.95 / 4.95)):
        assert kernels.count(k) / 3000 == pytest.approx(p, abs=0.03), k
    cfg = FSAEConfig(enabled=True, blur_kernel="per_run")
    model = torch.nn.Linear(1, 1)
    assert {TwoViewFSAE(cfg, model, seed=11).blur_kernel for _ in range(3)} == {run_blur_kernel(11)}
    assert TwoViewFSAE(FSAEConfig(enabled=True), model, seed=11).blur_kernel is None  # the paper: per image
    # kernel 1 is no blur at all; the kernel of a run is used for every image of every batch
    images = torch.rand(3, 3, 24, 24)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    same = strong_view(images, gens[0], num_ops=0, blur_kernel=1)
    assert torch.equal(same, images.clamp(0, 1))
    calls = []
    real = TF.gaussian_blur

    def spy(image, kernel_size, sigma):
        calls.append(tuple(kernel_size))
        return real(image, kernel_size, sigma)

    import fsae.augment as augment_module

    original = augment_module.TF.gaussian_blur
    augment_module.TF.gaussian_blur = spy
    try:
        strong_view(images, gens[1], num_ops=2, blur_kernel=5)
        strong_view(images, gens[2], num_ops=2, blur_kernel=5)
    finally:
        augment_module.TF.gaussian_blur = original
    assert calls == [(5, 5)] * 6
