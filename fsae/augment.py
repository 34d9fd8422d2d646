"""The two views of sec. 3.2.1: weak view ``x_s = A_w(x)`` and strong view ``x_t = A_s(x_s)`` (eq. 3).

``A_w`` (sec. 4.1.3: random rescale, random crop, colour jitter) is split in two:

* ``random_geometry``: per image, on CPU, inside the data loader (uint8 in, float [0, 1] out):
  random long-side resize, horizontal flip and the IRN/PSA random crop with padding.
* ``weak_view``: batched colour jitter on float tensors, on any device.

``A_s`` (``strong_view``) is Gaussian blur plus ``num_ops`` colour-only RandAugment ops; it has no
geometric op (no rotate/shear/translate), so pixel ``(i, j)`` of ``x_t`` is pixel ``(i, j)`` of ``x_s``
and the source pseudo-label ``P_s`` supervises ``S_t`` pixel for pixel.

Every random number comes from the ``torch.Generator`` passed in (a CPU generator; scalars are drawn on
CPU even for CUDA images), so the same seed gives the same views. ``generator=None`` uses torch's global
RNG, which ``DataLoader`` seeds per worker. Image ops are ``torchvision.transforms.v2.functional``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fsae.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The 9 non-geometric RandAugment ops kept by the paper (sec. 3.2.1 / 4.1.3).
COLOR_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
    "Sharpness", "Solarize",
)
# Magnitude range per op, sampled uniformly (FixMatch/ST++-style RandAugment); ``None``: no magnitude.
# Brightness/Color/Contrast/Sharpness: enhancement factor (1 = unchanged; Color is saturation).
# Posterize: bits kept, an integer in [4, 8]. Solarize: threshold on [0, 1] values (0 inverts all).
COLOR_OP_RANGES: dict[str, Optional[tuple[float, float]]] = {
    "AutoContrast": None,
    "Brightness": (0.05, 1.95),
    "Color": (0.05, 1.95),
    "Contrast": (0.05, 1.95),
    "Equalize": None,
    "Identity": None,
    "Posterize": (4, 8),
    "Sharpness": (0.05, 1.95),
    "Solarize": (0.0, 1.0),
}

_COLOR_OP_FNS = {
    "AutoContrast": lambda x, m: TF.autocontrast(x),
    "Brightness": lambda x, m: TF.adjust_brightness(x, m),
    "Color": lambda x, m: TF.adjust_saturation(x, m),
    "Contrast": lambda x, m: TF.adjust_contrast(x, m),
    "Equalize": lambda x, m: TF.equalize(x),
    "Identity": lambda x, m: x,
    "Posterize": lambda x, m: TF.posterize(x, int(m)),
    "Sharpness": lambda x, m: TF.adjust_sharpness(x, m),
    "Solarize": lambda x, m: TF.solarize(x, m),
}


def sample_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in ``[low, high]``, both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


# ---------------------------------------------------------------------------------------------------
# Geometry (part of A_w): per image, CPU, data loader.


def _crop_offsets(size: int, crop: int, generator: Optional[torch.Generator]) -> tuple[int, int, int]:
    """One axis of the IRN/PSA random crop: ``(src_offset, dst_offset, length)``.

    If the image is larger than the crop, a random window of the image is taken; if it is smaller, the
    whole image is placed at a random offset inside the (padded) crop.
    """
    space = size - crop
    if space > 0:
        return _randint(0, space, generator), 0, crop
    return 0, _randint(0, -space, generator), size


def random_geometry(
    image: Union[np.ndarray, torch.Tensor],
    mask: Union[np.ndarray, torch.Tensor, None] = None,
    *,
    long_side: Optional[tuple[int, int]] = (320, 640),
    crop_size: Optional[int] = 448,
    hflip: bool = True,
    generator: Optional[torch.Generator] = None,
) -> dict:
    """Random long-side resize, horizontal flip and random crop of one image (and its mask).

    Args:
        image: uint8, (H, W, 3) numpy array or (3, H, W) tensor.
        mask: optional uint8 (H, W) mask in segmentation label space, transformed with the image.
        long_side: ``(low, high)``: the long side is resized to a uniform integer in ``[low, high]``
            (aspect kept; bilinear with antialias for the image, nearest for the mask); ``None``: no resize.
        crop_size: side ``c`` of the square crop; a resized side smaller than ``c`` is padded (the image
            sits at a random offset in the crop, as in IRN/PSA); ``None``: no crop.
        hflip: flip horizontally with probability 0.5.
        generator: CPU generator for every random draw.

    Returns:
        ``image``: float32 (3, c, c) in [0, 1], 0 on padding; ``valid``: bool (c, c), False on padding;
        ``mask``: long (c, c), ``IGNORE_INDEX`` on padding (only if ``mask`` is given); ``params``: the
        sampled geometry as ints/bools (``orig_size``, ``resized_size``, ``hflip``, ``src_offset``
        and ``dst_offset`` as (top, left) of the crop window in the resized image and in the output,
        ``crop_hw``: its size). Without a crop, ``c`` is the resized size.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"random_geometry: numpy image must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"random_geometry: tensor image must be (3, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        raise ValueError(f"random_geometry: image must be uint8, got {image.dtype}")
    height, width = image.shape[-2:]
    if mask is not None:
        mask = torch.as_tensor(np.ascontiguousarray(mask) if isinstance(mask, np.ndarray) else mask)
        if tuple(mask.shape) != (height, width):
            raise ValueError(
                f"random_geometry: mask shape {tuple(mask.shape)} does not match image size {(height, width)}"
            )
        mask = mask[None]

    if long_side is not None:
        target = _randint(long_side[0], long_side[1], generator)
        scale = target / max(height, width)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if mask is not None:
            mask = TF.resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)
    resized_h, resized_w = image.shape[-2:]

    flip = bool(hflip) and bool(torch.rand((), generator=generator).item() < 0.5)
    if flip:
        image = TF.horizontal_flip(image)
        if mask is not None:
            mask = TF.horizontal_flip(mask)

    image = TF.to_dtype(image, torch.float32, scale=True)
    if crop_size is None:
        src, dst, crop_hw = (0, 0), (0, 0), (resized_h, resized_w)
        out_hw = (resized_h, resized_w)
    else:
        src_top, dst_top, crop_h = _crop_offsets(resized_h, crop_size, generator)
        src_left, dst_left, crop_w = _crop_offsets(resized_w, crop_size, generator)
        src, dst, crop_hw = (src_top, src_left), (dst_top, dst_left), (crop_h, crop_w)
        out_hw = (crop_size, crop_size)

    src_rows = slice(src[0], src[0] + crop_hw[0])
    src_cols = slice(src[1], src[1] + crop_hw[1])
    dst_rows = slice(dst[0], dst[0] + crop_hw[0])
    dst_cols = slice(dst[1], dst[1] + crop_hw[1])
    out_image = image.new_zeros((3, *out_hw))
    out_image[:, dst_rows, dst_cols] = image[:, src_rows, src_cols]
    valid = torch.zeros(out_hw, dtype=torch.bool)
    valid[dst_rows, dst_cols] = True
    out = {
        "image": out_image,
        "valid": valid,
        "params": {
            "orig_size": (int(height), int(width)),
            "resized_size": (int(resized_h), int(resized_w)),
            "hflip": flip,
            "src_offset": src,
            "dst_offset": dst,
            "crop_hw": crop_hw,
        },
    }
    if mask is not None:
        out_mask = torch.full(out_hw, IGNORE_INDEX, dtype=torch.long)
        out_mask[dst_rows, dst_cols] = mask[0, src_rows, src_cols].long()
        out["mask"] = out_mask
    return out


def apply_geometry(channel: Union[np.ndarray, torch.Tensor], params: dict, out_size: tuple[int, int]) -> torch.Tensor:
    """Replay ``random_geometry``'s sampled resize, flip and crop (its ``params``) on a map of the image.

    For a per-pixel map that goes with the image, e.g. a saliency map: uint8 (H, W) -> float32
    ``out_size`` (the output image's (h, w)) in [0, 1], resized bilinearly with antialias like the image,
    0 on padding.
    """
    x = torch.as_tensor(np.ascontiguousarray(channel) if isinstance(channel, np.ndarray) else channel)
    if tuple(x.shape) != tuple(params["orig_size"]):
        raise ValueError(f"apply_geometry: map shape {tuple(x.shape)} differs from the image's {params['orig_size']}")
    x = x[None]
    if tuple(params["resized_size"]) != tuple(params["orig_size"]):
        x = TF.resize(x, list(params["resized_size"]), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if params["hflip"]:
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x.float()
    (src_top, src_left), (dst_top, dst_left) = params["src_offset"], params["dst_offset"]
    crop_h, crop_w = params["crop_hw"]
    out = x.new_zeros((1, *out_size))
    out[:, dst_top:dst_top + crop_h, dst_left:dst_left + crop_w] = x[:, src_top:src_top + crop_h,
                                                                     src_left:src_left + crop_w]
    return out[0]


# ---------------------------------------------------------------------------------------------------
# Colour part of A_w: batched, any device.


def weak_view(
    images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    jitter: Optional[Sequence[float]] = (0.3, 0.3, 0.3, 0.1),
) -> torch.Tensor:
    """Per-image colour jitter, sampled as torchvision ``ColorJitter`` does.

    Brightness, contrast and saturation factors are uniform in ``[max(0, 1 - j), 1 + j]``, the hue shift
    in ``[-j_hue, j_hue]``, applied in a random order per image; a component with ``j = 0`` is skipped.

    Args:
        images: (B, 3, H, W) float in [0, 1], any device.
        generator: CPU generator for the sampled factors.
        jitter: ``(brightness, contrast, saturation, hue)``; ``None``: identity.

    Returns:
        (B, 3, H, W), same dtype and device, clamped to [0, 1].
    """
    _check_batch(images, "weak_view")
    if jitter is None:
        return images
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"weak_view: jitter must be 4 values >= 0 with hue <= 0.5, got {jitter}")
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        order = torch.randperm(4, generator=generator).tolist()
        factors = [
            _uniform(max(0.0, 1.0 - j), 1.0 + j, generator) if j > 0 else None for j in jitter[:3]
        ]
        factors.append(_uniform(-jitter[3], jitter[3], generator) if jitter[3] > 0 else None)
        image = images[i]
        for k in order:
            if factors[k] is not None:
                image = ops[k](image, factors[k])
        out[i] = image.clamp(0.0, 1.0)
    return out


# ---------------------------------------------------------------------------------------------------
# A_s: Gaussian blur + colour-only RandAugment, batched, any device.


def apply_color_op(image: torch.Tensor, name: str, magnitude: Optional[float] = None) -> torch.Tensor:
    """Apply one of ``COLOR_OPS`` with its magnitude (see ``COLOR_OP_RANGES`` for the meaning).

    Shape: (..., 3, H, W) float in [0, 1] -> same. Pixelwise except ``Sharpness`` (3x3 filter) and the
    image-wide statistics of AutoContrast/Contrast/Equalize; nothing moves.
    """
    if name not in _COLOR_OP_FNS:
        raise ValueError(f"apply_color_op: unknown op {name!r}; choose from {COLOR_OPS}")
    if COLOR_OP_RANGES[name] is not None and magnitude is None:
        raise ValueError(f"apply_color_op: op {name!r} needs a magnitude in {COLOR_OP_RANGES[name]}")
    return _COLOR_OP_FNS[name](image, magnitude)


def sample_color_ops(
    num_ops: int, generator: Optional[torch.Generator] = None, replacement: bool = False,
    ranges: Optional[dict[str, tuple[float, float]]] = None,
) -> list[tuple[str, Optional[float]]]:
    """Draw ``num_ops`` distinct ops from ``COLOR_OPS`` with uniform magnitudes: ``[(name, magnitude)]``.

    Posterize bits are an integer (bounds inclusive); ops without a magnitude get ``None``.
    ``replacement``: ops drawn independently (an op may repeat), as the FSAE authors' RandAugment
    (``random.choices``, obeychoi0120/wseg ssl data/augmentation/randaugment.py:221); ``ranges``
    overrides ``COLOR_OP_RANGES`` per op.
    """
    if num_ops < 0 or (not replacement and num_ops > len(COLOR_OPS)):
        raise ValueError(f"num_ops must be in [0, {len(COLOR_OPS)}] (without replacement), got {num_ops}")
    if replacement:
        indices = torch.randint(len(COLOR_OPS), (num_ops,), generator=generator).tolist()
    else:
        indices = torch.randperm(len(COLOR_OPS), generator=generator)[:num_ops].tolist()
    ops = []
    for index in indices:
        name = COLOR_OPS[index]
        bounds = (ranges or {}).get(name, COLOR_OP_RANGES[name])
        if bounds is None:
            magnitude = None
        elif name == "Posterize":
            magnitude = _randint(int(bounds[0]), int(bounds[1]), generator)
        else:
            magnitude = _uniform(bounds[0], bounds[1], generator)
        ops.append((name, magnitude))
    return ops


def blur_kernel_size(sigma: float, height: int, width: int) -> int:
    """Odd Gaussian kernel size ``2 * ceil(3 sigma) + 1``, capped to the image's smaller side."""
    size = 2 * math.ceil(3 * sigma) + 1
    limit = min(height, width)
    limit = limit if limit % 2 == 1 else limit - 1
    return max(1, min(size, limit))


def strong_view(
    weak: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    num_ops: int = 3,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_prob: float = 1.0,
    blur_kernel: Optional[int] = None,
    replacement: bool = False,
    ranges: Optional[dict[str, tuple[float, float]]] = None,
) -> torch.Tensor:
    """Target view ``x_t = A_s(x_s)`` (eq. 3) of the weak view ``x_s``.

    Per image: Gaussian blur (sigma uniform in ``blur_sigma``) with probability ``blur_prob``, then
    ``num_ops`` colour-only RandAugment ops (``sample_color_ops``; ``replacement``, ``ranges``).
    Geometry is unchanged. The blur coin and sigma are drawn even when the blur is not applied, so the
    sampled ops for a seed do not depend on ``blur_prob``. The kernel is ``blur_kernel`` when given
    (one per run, ``run_blur_kernel``), else ``blur_kernel_size(sigma)``.

    Args:
        weak: (B, 3, H, W) float in [0, 1], any device.
        generator: CPU generator for every random draw.

    Returns:
        (B, 3, H, W), same dtype and device, in [0, 1].
    """
    _check_batch(weak, "strong_view")
    height, width = weak.shape[-2:]
    out = torch.empty_like(weak)
    for i in range(weak.shape[0]):
        image = weak[i]
        apply_blur = torch.rand((), generator=generator).item() < blur_prob
        sigma = _uniform(blur_sigma[0], blur_sigma[1], generator)
        if apply_blur:
            size = blur_kernel or blur_kernel_size(sigma, height, width)
            image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        for name, magnitude in sample_color_ops(num_ops, generator, replacement, ranges):
            image = apply_color_op(image, name, magnitude)
        out[i] = image.clamp(0.0, 1.0)
    return out


def run_blur_kernel(seed: int) -> int:
    """One blur kernel for a whole run, drawn as the FSAE authors do: ``k = int(u * 4.95)``, ``k + 1`` if
    even, u uniform in [0, 1) -> 1, 3 or 5 with probabilities 2, 2, 0.95 in 4.95 (obeychoi0120/wseg ssl
    data/dataset.py:92-94). Their ``--seed 7`` gives 1 (no blur); here u comes from ``seed``'s generator."""
    k = int(torch.rand((), generator=torch.Generator().manual_seed(int(seed))).item() * 4.95)
    return k + 1 if k % 2 == 0 else k


def image_generators(seed: int, epoch: int, indices) -> list[torch.Generator]:
    """One colour-augmentation generator per image, seeded by (seed, epoch, index) like the geometry: an
    image gets the same weak and strong views whichever process or batch position it lands in."""
    return [torch.Generator().manual_seed(hash((seed, epoch, int(i), 1)) % (2**63)) for i in indices]


def per_image(view, images: torch.Tensor, generators, **kwargs) -> torch.Tensor:
    """``view`` (``weak_view`` / ``strong_view``) image by image, each with its own generator. (B, 3, H, W)."""
    return torch.cat([view(image[None], gen, **kwargs) for image, gen in zip(images, generators)])


# ---------------------------------------------------------------------------------------------------
# Normalisation.


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation ``(x - mean) / std``. Shape: (B, 3, H, W) or (3, H, W), float."""
    return TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: ``x * std + mean``. Shape: (B, 3, H, W) or (3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images * std + mean


def _check_batch(images: torch.Tensor, caller: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{caller}: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{caller}: images must be float in [0, 1], got {images.dtype}")


# ---------------------------------------------------------------------------------------------------
# timm's training transform (data.transform "timm", MCTformer's recipe): per image, CPU, data loader.


def timm_train_transform(data_cfg):
    """timm's own ImageNet training transform at ``data_cfg.crop_size`` (DeiT / MCTformer settings).

    Random resized crop (bicubic), horizontal flip, RandAugment ``data_cfg.auto_augment``, ToTensor,
    ImageNet normalisation, random erasing (``re_prob``, per-pixel noise, one box); colour jitter is
    off because timm skips it when ``auto_augment`` is given.
    """
    from timm.data import create_transform

    if not data_cfg.crop_size:
        raise ValueError("data.transform 'timm' needs data.crop_size (the input size, e.g. 224)")
    return create_transform(data_cfg.crop_size, is_training=True, hflip=0.5 if data_cfg.hflip else 0.0,
                            color_jitter=0.4, auto_augment=data_cfg.auto_augment, interpolation="bicubic",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, re_prob=data_cfg.re_prob, re_mode="pixel",
                            re_count=1)


def timm_train_view(image: np.ndarray, transform, seed: int) -> torch.Tensor:
    """One uint8 (H, W, 3) image through ``transform`` (``timm_train_transform``), seeded by ``seed``.

    timm draws from Python's ``random``, numpy's and torch's global RNGs; all three are seeded for this
    call and restored afterwards. The output is de-normalised (``denormalize``, the exact inverse of timm's
    normalisation) so that the training loop's single ``normalize`` gives back timm's tensor: the
    weak view is timm's, and FSAE's strong view works on the [0, 1] image as with the fsae crops.
    Erased boxes hold ``mean + std * N(0, 1)`` noise and may leave [0, 1]; ``strong_view`` clamps.

    Returns float (3, S, S).
    """
    import random

    from PIL import Image

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.manual_seed(seed % (2**63))
            out = transform(Image.fromarray(np.ascontiguousarray(image)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return denormalize(out)
