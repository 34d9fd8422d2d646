"""Benchmark 2: multi-scale + flip CAM inference (scales 0.5, 1.0, 1.5, 2.0, each with its flip).

Reference (IRN ``make_cam.py`` style): one image at a time, one scale at a time, the flipped image as
a separate forward; each ReLU'd CAM resized to the image size (flipped back) and summed.

fsae: ``fsae.infer.multiscale_cam`` on batches of same-size images, the flip concatenated into the
batch (one forward of 2B images per scale). Both sums must agree within 1e-5 of the map's maximum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import BenchResult, Row, check_equal, interleaved, max_relative_difference
from fsae.augment import normalize
from fsae.data.synthetic import SyntheticSpec, render_sample
from fsae.infer import multiscale_cam, to_tensor_image
from fsae.methods import CAM

SCALES = (0.5, 1.0, 1.5, 2.0)
TOLERANCE = 1e-5


@torch.no_grad()
def reference_cams(model, images: torch.Tensor, scales=SCALES, flip: bool = True) -> torch.Tensor:
    """Per image, per scale, flip as its own forward. Shape: (N, 3, H, W) normalised -> (N, C, H, W)."""
    size = images.shape[-2:]
    out = []
    for image in images:
        total = None
        for scale in scales:
            x = image[None]
            if scale != 1.0:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                                  recompute_scale_factor=False)
            views = [(x, False), (x.flip(-1), True)] if flip else [(x, False)]
            for view, flipped in views:
                cam = F.interpolate(F.relu(model.cam(view)), size=size, mode="bilinear", align_corners=False)
                cam = cam.flip(-1) if flipped else cam
                total = cam if total is None else total + cam
        out.append(total[0])
    return torch.stack(out)


def fsae_cams(model, images: torch.Tensor, batch_size: int, scales=SCALES, flip: bool = True) -> torch.Tensor:
    """``multiscale_cam`` on consecutive batches (all images here have the same size)."""
    return torch.cat([multiscale_cam(model, images[i:i + batch_size], scales, flip)
                      for i in range(0, images.shape[0], batch_size)])


def make_images(num_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """(N, 3, size, size) normalised images of the generated data set (objects scaled with the size)."""
    k = size / SyntheticSpec.image_size
    spec = SyntheticSpec(image_size=size, body_axes=(20.0 * k, 32.0 * k), part_radius=(3.5 * k, 5.0 * k), seed=seed)
    images = [to_tensor_image(render_sample(np.random.default_rng([seed, i]), spec)[0]) for i in range(num_images)]
    return normalize(torch.stack(images))


def compare(model, images: torch.Tensor, batch_sizes: list[int], label: str, repeats: int) -> tuple[list[Row], dict]:
    """Reference vs ``multiscale_cam`` at each batch size, timed round-robin; one row per batch size."""
    model.eval()
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection
        for bs in batch_sizes:
            fsae_cams(model, images[:bs], bs)
        reference_cams(model, images[:1])
    fns = {"reference": lambda: reference_cams(model, images)}
    fns.update({bs: (lambda bs=bs: fsae_cams(model, images, bs)) for bs in batch_sizes})
    seconds, out = interleaved(fns, repeats)
    n, ref_s = images.shape[0], seconds["reference"]
    rows, numbers = [], {"reference_s": ref_s}
    for bs in batch_sizes:
        diff = max_relative_difference(out[bs], out["reference"])
        check = check_equal(f"CAM inference ({label}, batch {bs})", diff <= TOLERANCE,
                            f"max diff {diff:.1e} of max, tolerance {TOLERANCE:.0e}")
        rows.append(Row(f"{label}, {n} images, fsae batch {bs}: images/s", f"{n / ref_s:.1f} img/s",
                        f"{n / seconds[bs]:.1f} img/s", ref_s / seconds[bs], "> 1x (report)", check))
        numbers[f"batch{bs}"] = {"fsae_s": seconds[bs], "ratio": ref_s / seconds[bs], "max_rel_diff": diff}
    return rows, numbers


def run(num_images: int = 32, image_size: int = 128, batch_sizes: tuple[int, ...] = (16, 4), timm_images: int = 0,
        timm_size: int = 224, repeats: int = 3) -> BenchResult:
    """tinycnn CAM at ``image_size``; with ``timm_images`` > 0 also timm resnet18 (stride 16) at ``timm_size``.

    ``batch_sizes``: fsae batch sizes to time (16 is ``InferConfig.batch_size``).
    """
    torch.manual_seed(0)
    model = CAM(4, backbone="tinycnn", output_stride=8)
    rows, tiny = compare(model, make_images(num_images, image_size), list(batch_sizes),
                         f"tinycnn {image_size}x{image_size}", repeats)
    numbers = {"tinycnn": tiny}
    if timm_images:
        model = CAM(4, backbone="resnet18", output_stride=16)
        more, numbers["resnet18"] = compare(model, make_images(timm_images, timm_size, seed=1),
                                            sorted({min(bs, timm_images) for bs in batch_sizes}, reverse=True),
                                            f"timm resnet18 {timm_size}x{timm_size}", repeats)
        rows += more
    setup = (f"Scales {', '.join(map(str, SCALES))} + horizontal flip (8 forwards per image), random-init "
             f"`fsae.methods.CAM` in eval mode, images of the generated data set; the demo's tinycnn "
             f"(output stride 8, 4 classes)" + (", and timm resnet18 (output stride 16)" if timm_images else "") + ".")
    notes = [("Reference: one image, one scale, one flip per forward (8 forwards of batch 1 per image). "
              "fsae: `multiscale_cam`, the batch and its flip in one forward per scale. Times are the median "
              f"of {repeats} round-robin repeats.")]
    fastest = max(batch_sizes, key=lambda bs: tiny[f"batch{bs}"]["ratio"])
    if fastest != max(batch_sizes):
        ratio = tiny[f"batch{fastest}"]["ratio"]
        notes.append(f"On this machine the fastest tinycnn batch is {fastest} ({ratio:.2f}x), "
                     f"not {max(batch_sizes)}: on a CPU, a forward of 2B images at scales 1.5 and 2.0 has "
                     f"activations beyond the caches and costs more per image than small batches; larger "
                     f"batches are for GPUs (`infer.batch_size`: default 4, `auto` picks by timing).")
    return BenchResult("2. CAM inference, 4 scales + flip", setup, rows, notes, numbers)
