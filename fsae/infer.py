"""Multi-scale + flip CAM inference, dumping the initial seeds.

For an image, at each scale s the network sees the image rescaled by s and its horizontal flip (one
batch of 2B); the flipped CAM is flipped back and added at the network's resolution (as IRN's
``CAM.forward`` and SIPE's ``CAM`` do), ReLU'd, brought to the image size and summed over scales. Only
the classes present in the image-level label are kept, each normalised to [0, 1]. Images of the same
size are batched at every scale. How the image is rescaled, how the CAM is brought to the image size
and how it is normalised is the method's protocol (``fsae.protocol``: ``resize``, ``upsample``,
``normalise``).

Seed file ``seeds/<id>.npz`` (``np.savez_compressed``): ``keys`` int64 (K,) present classes in the label
space 1..C; ``cams`` float16 (K, H, W) in [0, 1]. Optional arrays: ``background`` float16 (H, W) in
[0, 1], the method's own background score (``seed_background = True``: SIPE, whose
``cam_with_background(images, labels)`` gives it next to the C foreground channels), max-normalised
like the classes, which evaluation uses in place of the threshold plane (argmax, no threshold); and
``strided`` float16 (K, h, w), the stride-4 CAM IRN's random walk starts from (``protocol.strided_cam``,
IRN ``step/make_cam.py:32,38-49``: every scale's CAM resized to ``((H-1)//4+1, (W-1)//4+1)``, summed,
max-normalised).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fsae.augment import normalize
from fsae.io import atomic_write
from fsae.seeds import load_seed, save_seed  # noqa: F401 - save_seed re-exported for callers of fsae.infer
from fsae.memory import named_out_of_memory
from fsae.stamps import ids_part, make_stamp, stage_output, weights_digest
from fsae.speed import autocast

SEED_EPS = 1e-5
MINMAX_EPS = 1e-8  # MCTformer engine.py:198
WALK_STRIDE = 4  # the IRN random walk's grid
BATCH_CANDIDATES = (1, 2, 4, 8, 16)  # infer.batch_size auto: the batch sizes it chooses from
CUDA_MEMORY_FRACTION = 0.5  # auto on CUDA: the batch's estimated peak memory stays under this share of the free memory


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """``ceil(size / stride)`` per side (IRN ``misc/imutils.py:173-174``, get_strided_size)."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """The next multiple of ``stride`` per side (IRN ``misc/imutils.py:177-179``, get_strided_up_size)."""
    h, w = strided_size(size, stride)
    return h * stride, w * stride


def pil_rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, 3) -> PIL bicubic to (round(H*s), round(W*s)) (IRN ``misc/imutils.py:8-22``)."""
    h, w = image.shape[:2]
    size = (int(np.round(h * scale)), int(np.round(w * scale)))
    if size == (h, w):
        return image
    return np.array(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))  # a writable copy


def scaled_batch(images: torch.Tensor, scale: float, resize: str) -> torch.Tensor:
    """The network input at one scale, normalised (B, 3, h, w).

    ``resize = "pil_bicubic"``: ``images`` uint8 (B, H, W, 3), each rescaled by ``pil_rescale``;
    ``"bilinear"``: ``images`` normalised (B, 3, H, W), bilinear to floor(H*s) on the tensor.
    """
    if resize == "pil_bicubic":
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"resize 'pil_bicubic' needs uint8 (B, H, W, 3) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        arrays = [pil_rescale(im.cpu().numpy(), scale) for im in images]
        return normalize(torch.stack([to_tensor_image(a) for a in arrays])).to(images.device)
    if resize != "bilinear":
        raise ValueError(f"resize must be 'pil_bicubic' or 'bilinear', got {resize!r}")
    if scale == 1.0:
        return images
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False)


def upsample_cam(cams: torch.Tensor, size: Sequence[int], upsample: str = "direct", stride: int = 16) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): bilinear straight to ``size`` (``"direct"``), or to IRN's
    strided-up size then the top-left crop (``"strided_up"``, IRN ``step/make_cam.py:42-44``)."""
    if upsample == "direct":
        return F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=False)
    if upsample != "strided_up":
        raise ValueError(f"upsample must be 'direct' or 'strided_up', got {upsample!r}")
    up = F.interpolate(cams, size=strided_up_size(size, stride), mode="bilinear", align_corners=False)
    return up[..., :size[0], :size[1]]


@torch.no_grad()
def multiscale_maps(model, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                    labels: torch.Tensor | None = None, resize: str = "bilinear", upsample: str = "direct",
                    upsample_stride: int = 16, strided: bool = False,
                    precision: str = "fp32") -> dict[str, torch.Tensor | None]:
    """Summed ReLU'd CAMs over scales (and flips), not normalised.

    ``precision`` (``infer.precision``): the autocast dtype of the network passes; the sums over scales,
    the upsampling and the normalisation run in fp32 on the cast-back outputs.

    Shape: ``images`` as ``scaled_batch`` wants them for ``resize`` -> ``{"cams": (B, C, H, W),
    "background": (B, H, W) or None, "strided": (B, C, ceil(H/4), ceil(W/4)) or None}``. With
    ``labels`` (B, C) and a model with ``seed_background``, ``model.cam_with_background(x, labels)``
    gives the foreground and the method's own background plane.
    """
    size = tuple(images.shape[1:3]) if resize == "pil_bicubic" else tuple(images.shape[-2:])
    b = images.shape[0]
    with_background = labels is not None and getattr(model, "seed_background", False)
    fused = flip and with_background and getattr(model, "fuses_flips", False)  # SIPE fuses the pair itself
    sums: dict[str, torch.Tensor] = {}
    for scale in scales:
        x = scaled_batch(images, scale, resize)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        with autocast(precision, x.device):
            if with_background:
                fg, bg = model.cam_with_background(x, torch.cat([labels, labels]) if flip else labels,
                                                   **({"flip_pairs": True} if fused else {}))
                out = torch.cat([fg, bg[:, None]], dim=1)
            else:
                out = model.cam(x)
        out = F.relu(out.float())
        if flip and not fused:  # fused at the network's resolution (IRN net/resnet50_cam.py:68)
            out = out[:b] + out[b:].flip(-1)
        parts = {"cams": upsample_cam(out, size, upsample, upsample_stride)}
        if strided:
            parts["strided"] = F.interpolate(out, size=strided_size(size, WALK_STRIDE), mode="bilinear",
                                             align_corners=False)
        for key, value in parts.items():
            sums[key] = value if key not in sums else sums[key] + value
    cams = sums["cams"]
    background = None
    if with_background:
        cams, background = cams[:, :-1], cams[:, -1]
        if strided:
            sums["strided"] = sums["strided"][:, :-1]
    return {"cams": cams, "background": background, "strided": sums.get("strided")}


@torch.no_grad()
def multiscale_cam(model, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                   **kwargs) -> torch.Tensor:
    """``multiscale_maps(...)["cams"]``: (B, C, H, W), non-negative, not normalised."""
    return multiscale_maps(model, images, scales, flip, **kwargs)["cams"]


def normalise_maps(maps: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """Per-map normalisation to [0, 1]. Shape: (K, ...) -> (K, ...).

    ``"max"``: ``m / (max + 1e-5)`` (IRN ``make_cam.py:49-52``); ``"minmax"``:
    ``(m - min) / (max - min + 1e-8)`` (MCTformer ``engine.py:198``).
    """
    flat = maps.flatten(1)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    if mode == "max":
        return maps / (flat.max(dim=1).values.view(shape) + SEED_EPS)
    if mode == "minmax":
        low = flat.min(dim=1).values.view(shape)
        return (maps - low) / (flat.max(dim=1).values.view(shape) - low + MINMAX_EPS)
    raise ValueError(f"normalise must be 'max' or 'minmax', got {mode!r}")


def normalise_seed(cam: torch.Tensor, label: torch.Tensor, mode: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Keep present classes and normalise (``normalise_maps``): (C, H, W), (C,) -> keys (K,) in 1..C,
    cams (K, H, W)."""
    present = torch.nonzero(label > 0.5).flatten()
    kept = normalise_maps(cam[present], mode) if present.numel() else cam[present]
    return (present + 1).cpu().numpy().astype(np.int64), kept.cpu().numpy()


def batches_by_size(dataset, indices: Sequence[int], batch_size: int):
    """Yield lists of samples with equal image size, at most ``batch_size`` each, in index order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (resolve 'auto' first), got {batch_size!r}")
    pending: dict[tuple[int, int], list[dict]] = {}
    for i in indices:
        sample = dataset[i]
        key = sample["image"].shape[:2]
        group = pending.setdefault(key, [])
        group.append(sample)
        if len(group) == batch_size:
            yield pending.pop(key)
    yield from pending.values()


def group_tensors(group: Sequence[dict], resize: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-size samples -> (images as ``scaled_batch`` takes them for ``resize``, labels (B, C) float)."""
    labels = torch.stack([torch.as_tensor(s["label"]) for s in group]).float().to(device)
    if resize == "pil_bicubic":
        return torch.stack([torch.from_numpy(np.ascontiguousarray(s["image"])) for s in group]).to(device), labels
    return normalize(torch.stack([to_tensor_image(s["image"]) for s in group]).to(device)), labels


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def largest_fitting(sizes: Sequence[int], per_image_bytes: int, free_bytes: int) -> int:
    """The largest of ``sizes`` (ascending) whose estimated peak, ``b * per_image_bytes``, stays within
    ``CUDA_MEMORY_FRACTION`` of ``free_bytes``; the smallest if none does."""
    fitting = [b for b in sizes if b * per_image_bytes <= CUDA_MEMORY_FRACTION * free_bytes]
    return fitting[-1] if fitting else sizes[0]


@torch.no_grad()
def pick_batch_size(run_batch: Callable, images: torch.Tensor, labels: torch.Tensor, limit: int,
                    candidates: Sequence[int] = BATCH_CANDIDATES) -> tuple[int, str]:
    """``infer.batch_size: auto``: the batch of ``candidates`` (those <= ``limit``, the number of images) that
    runs fastest, and how it was chosen (one line).

    ``run_batch(images, labels)`` is one multi-scale pass; ``images`` (1, ...) / ``labels`` (1, C) the first
    image, repeated to each candidate size. On CUDA: the largest candidate whose peak memory, estimated as
    b x that of one image's pass, fits ``CUDA_MEMORY_FRACTION`` of the free memory (a GPU gains from the
    largest batch). Elsewhere (CPU): the fastest per image of one timed pass each, after a warm-up pass.
    Batching changes speed only: an image's seed is the same up to the last bit of its float16 values
    (docs/precision.md, tests/test_infer_batching.py)."""
    device = images.device
    sizes = [b for b in candidates if b <= max(limit, 1)] or [1]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_batch(images, labels)
        per_image = max(torch.cuda.max_memory_allocated(device) - before, 1)
        return largest_fitting(sizes, per_image, free), (f"largest of {sizes} within {CUDA_MEMORY_FRACTION:.0%} of "
                                                         f"the free {free / 2**30:.1f} GiB at {per_image / 2**20:.0f} "
                                                         f"MiB per image")
    if len(sizes) == 1:
        return sizes[0], "one image"
    run_batch(images, labels)  # warm-up: first-call allocations and kernel selection
    per_image = {}
    for b in sizes:
        batch = images.repeat(b, *([1] * (images.ndim - 1)))
        started = time.perf_counter()
        run_batch(batch, labels.repeat(b, 1))
        _synchronize(device)
        per_image[b] = (time.perf_counter() - started) / b
    best = min(per_image, key=per_image.get)
    return best, "fastest per image of " + ", ".join(f"{b}: {1e3 * t:.1f} ms" for b, t in per_image.items())


def resolve_batch_size(batch_size: int | str, run_batch: Callable, dataset, indices: Sequence[int], resize: str,
                       device, progress: bool = False) -> int:
    """``batch_size``, or for "auto" ``pick_batch_size`` on the first of ``indices`` (printed with ``progress``)."""
    if batch_size != "auto":
        return batch_size
    if not indices:
        return 1
    first = group_tensors([dataset[indices[0]]], resize, torch.device(device))
    picked, how = pick_batch_size(run_batch, *first, len(indices))
    if progress:
        tqdm.write(f"cam: infer.batch_size auto -> {picked} ({how})")
    return picked


def seed_stamp(model, scales: Sequence[float], flip: bool, source: dict | None = None,
               protocol: dict | None = None) -> dict:
    """The stamp of a seed folder: ``source`` (what the model came from; default the digest of its weights)
    and the inference settings that decide a seed file (scales, flip, the protocol's resize / upsample /
    normalisation / stride-4 CAM)."""
    source = {"weights": weights_digest(model)} if source is None else source
    return make_stamp("cam", source, {"scales": [float(s) for s in scales], "flip": bool(flip), **(protocol or {})})


@torch.no_grad()
def infer_seeds(model, dataset, out_dir: str | os.PathLike, scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
                flip: bool = True, batch_size: int | str = 16, device: str | torch.device = "cpu",
                progress: bool = True, indices: Sequence[int] | None = None, protocol=None,
                source: dict | None = None, force: bool = False, precision: str = "fp32",
                seed_dtype: str = "float16") -> dict:
    """Write ``out_dir/<id>.npz`` for every image (or the given ``indices``); skip finished ones.

    ``protocol`` (``fsae.protocol.Protocol``, e.g. ``resolve_protocol(cfg)``) decides resize, upsample,
    normalisation and the stride-4 CAM; None: bilinear tensor rescale, direct upsample, max.
    The folder is stamped (``fsae.stamps``) with ``seed_stamp(...)``; the CLI passes
    ``source = {"checkpoint": file_digest(checkpoint)}``. A folder made otherwise is refused
    (``StaleOutputError``) unless ``force``, which builds the new seeds beside the old ones and swaps them in
    at the end (``fsae.stamps.stage_output``: a failure keeps the old seeds); a seed file that no longer reads
    is written again. Another process writing ``out_dir`` is refused (``fsae.lock``). Out of memory on an
    image: ``fsae.memory.OutOfMemory`` naming it, its size and what to lower. ``precision`` the autocast dtype of the network passes (stamped unless fp32);
    ``seed_dtype`` the seed files' storage (``fsae.seeds.SEED_DTYPES``, stamped unless float16).
    ``batch_size``: same-size images per forward, or "auto" (``pick_batch_size``, printed once with ``progress``).
    Returns {"written": n, "skipped": n, "out": path, "batch_size": the batch used}.
    """
    resize = protocol.resize if protocol else "bilinear"
    mode = protocol.normalise if protocol else "max"
    options = {"resize": resize, "upsample": protocol.upsample if protocol else "direct",
               "upsample_stride": protocol.upsample_stride if protocol else 16,
               "strided": bool(protocol and protocol.strided_cam)}
    out_dir = Path(out_dir)
    stamp = seed_stamp(model, scales, flip, source, {**options, "normalise": mode,
                                                     **({"precision": precision} if precision != "fp32" else {}),
                                                     **({"seed_dtype": seed_dtype} if seed_dtype != "float16" else {})})
    indices = list(range(len(dataset))) if indices is None else list(indices)
    part = "" if len(set(indices)) == len(dataset) else ids_part([dataset.ids[i] for i in indices])  # a shard
    with stage_output(out_dir, stamp, force, ("*.npz",), load_seed, part=part) as target:
        written, skipped, batch_size = _write_seeds(model, dataset, target, indices, scales, flip, batch_size,
                                                    device, progress, options, mode, precision, seed_dtype)
    return {"written": written, "skipped": skipped, "out": str(out_dir), "batch_size": batch_size}


def _write_seeds(model, dataset, out_dir: Path, indices, scales, flip, batch_size, device, progress, options: dict,
                 mode: str, precision: str, seed_dtype: str) -> tuple[int, int, int]:
    """``infer_seeds``' loop over the images not done yet in ``out_dir``; returns (written, skipped, batch)."""
    model.eval()
    todo = [i for i in indices if not (out_dir / f"{dataset.ids[i]}.npz").exists()]
    written = 0
    bar = tqdm(total=len(todo), desc="cam", disable=not progress, unit="img")
    with_background = getattr(model, "seed_background", False)

    def run_batch(images, labels):
        return multiscale_maps(model, images, scales, flip, labels if with_background else None, **options,
                               precision=precision)

    resize = options["resize"]
    batch_size = resolve_batch_size(batch_size, run_batch, dataset, todo, resize, device, progress)
    lower = f"infer.scales (now {list(scales)}) or infer.batch_size (now {batch_size}), or resize the image"
    for group in batches_by_size(dataset, todo, batch_size):
        images, labels = group_tensors(group, resize, device)
        named = [dataset.image_path(s["id"]) if hasattr(dataset, "image_path") else s["id"] for s in group]
        with named_out_of_memory("CAM inference", named, group[0]["image"].shape[:2], lower):
            maps = run_batch(images, labels)
        for j, sample in enumerate(group):
            label = torch.as_tensor(sample["label"])
            keys, kept = normalise_seed(maps["cams"][j], label, mode)
            background = strided = None
            if maps["background"] is not None:  # the method's own background score, max-normalised
                background = normalise_maps(maps["background"][j][None], "max")[0].cpu().numpy()
            if maps["strided"] is not None:
                strided = normalise_seed(maps["strided"][j], label, "max")[1]
            save_seed(out_dir / f"{sample['id']}.npz", keys, kept, background, strided, seed_dtype)
            written += 1
        bar.update(len(group))
    bar.close()
    return written, len(indices) - len(todo), batch_size
