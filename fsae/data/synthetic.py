"""A generated WSSS data set in the VOC layout where a plain CAM under-covers its objects.

Each object is a large ellipse ("body") in a random desaturated colour with a faint, coarse grating at
a class-specific orientation, and a small disc ("part") filled with a strong, fine grating at the same
orientation. The mechanism, as measured in docs/decisions.md:
- the part is the easy cue: high contrast, and both cues tell the classes apart, so the classifier's
  loss falls once the part is found and the plain CAM (trained on flips and crops only) stays on the
  part: the body's faint, coarse grating is a different, weaker feature;
- FSAE's strong view is blurred (sigma 0.1-2) and colour-perturbed: the blur wipes out the fine part
  grating (period ~4 px: sigma 1.5 keeps 6 % of its contrast) but not the coarse body grating (period
  ~12 px: 73 %), so predicting the weak view's confident pixels on the strong view needs the body
  cue, which then fires over the whole object; colour operations change neither grating's orientation.
The background is desaturated noise with grey untextured blobs; ``striped_clutter`` adds small body-like
gratings at the class orientations to the background (off by default, see its comment).

On disk (``generate``), below ``out``::

    JPEGImages/<id>.jpg, SegmentationClass/<id>.png (VOC palette, 255 on a 1-px band at each object
    edge), saliency/<id>.png (GT foreground blurred and noised, for saliency-guided methods),
    ImageSets/Segmentation/{train,val}.txt, cls_labels.json, meta.json
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from fsae.io import read_json, write_grey_png, write_image, write_json, write_mask, write_text

META_FILE = "meta.json"


@dataclass
class SyntheticSpec:
    """Knobs of the generator (all sizes in pixels; amplitudes on the [0, 1] intensity scale)."""

    num_train: int = 800
    num_val: int = 200
    image_size: int = 128
    num_classes: int = 4
    max_objects: int = 2
    body_axes: tuple[float, float] = (20.0, 32.0)  # ellipse semi-axes range
    stripe_period: tuple[float, float] = (11.0, 14.0)  # the body's coarse grating
    stripe_amplitude: tuple[float, float] = (0.03, 0.05)
    part_radius: tuple[float, float] = (6.0, 9.0)  # the discriminative disc
    part_period: tuple[float, float] = (3.5, 4.5)  # its fine grating
    part_amplitude: float = 0.35
    orientation_cue: float = 1.0  # probability that the body grating has its class's orientation (else another's)
    clutter: int = 4  # grey blobs per image
    # Body-like gratings per image at the class orientations (object texture in negatives). Off by default: with 2
    # per image FSAE expanded into them (docs/decisions.md).
    striped_clutter: int = 0
    clutter_axes: tuple[float, float] = (5.0, 10.0)  # striped clutter semi-axes range
    seed: int = 0


def class_names(num_classes: int) -> list[str]:
    return [f"class{c + 1}" for c in range(num_classes)]


def _class_angle(c: int, num_classes: int) -> float:
    return math.pi * c / num_classes


def _grating(yy, xx, angle, period, phase):
    return np.sin(2 * math.pi * ((xx * math.cos(angle) + yy * math.sin(angle)) / period) + phase)


def _ellipse_radius(yy, xx, cy, cx, a, b, rot):
    """Normalised elliptic radius: < 1 inside the ellipse."""
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _desaturated_colour(rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0, 1)
    s = rng.uniform(0.1, 0.3)
    v = rng.uniform(0.4, 0.75)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def render_sample(rng: np.random.Generator, spec: SyntheticSpec, with_parts: bool = False) -> tuple[np.ndarray, ...]:
    """One image: returns (image uint8 (S,S,3), mask uint8 (S,S) label space, saliency uint8 (S,S)), and with
    ``with_parts`` the part pixels (S,S) bool as a fourth entry."""
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: grey level + smooth colour-poor noise + pixel noise.
    grey = rng.uniform(0.35, 0.65)
    smooth = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 16)
    smooth = smooth / (np.abs(smooth).max() + 1e-6)
    tint = rng.normal(0, 0.03, 3).astype(np.float32)
    img = grey + 0.12 * smooth[..., None] + tint + rng.normal(0, 0.04, (size, size, 3))

    # Grey clutter: blobs, and small gratings at random orientations.
    for _ in range(spec.clutter):
        r = _ellipse_radius(yy, xx, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 12),
                            rng.uniform(4, 12), rng.uniform(0, math.pi))
        img[r < 1] = rng.uniform(0.2, 0.8)
    for _ in range(spec.striped_clutter):
        r = _ellipse_radius(yy, xx, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(*spec.clutter_axes),
                            rng.uniform(*spec.clutter_axes), rng.uniform(0, math.pi))
        angle = _class_angle(int(rng.integers(0, spec.num_classes)), spec.num_classes)
        g = _grating(yy, xx, angle, rng.uniform(*spec.stripe_period), rng.uniform(0, 2 * math.pi))
        inside = r < 1
        img[inside] = (rng.uniform(0.3, 0.7) + 0.15 * g[..., None])[inside]

    mask = np.zeros((size, size), dtype=np.uint8)
    edge = np.zeros((size, size), dtype=bool)
    parts = np.zeros((size, size), dtype=bool)
    n_objects = int(rng.integers(1, spec.max_objects + 1))
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_objects):
        a = rng.uniform(*spec.body_axes)
        b = rng.uniform(*spec.body_axes)
        for _attempt in range(50):
            cy = rng.uniform(a * 0.6, size - a * 0.6)
            cx = rng.uniform(a * 0.6, size - a * 0.6)
            if all(math.hypot(cy - py, cx - px) > 0.9 * (max(a, b) + pr) for py, px, pr in placed):
                break
        else:
            continue
        placed.append((cy, cx, max(a, b)))
        cls = int(rng.integers(0, spec.num_classes))
        rot = rng.uniform(0, math.pi)
        radius = _ellipse_radius(yy, xx, cy, cx, a, b, rot)
        inside = radius < 1.0
        body = _desaturated_colour(rng)
        texture_cls = cls if rng.uniform() < spec.orientation_cue else int(rng.integers(0, spec.num_classes))
        angle = _class_angle(texture_cls, spec.num_classes)
        grating = _grating(yy, xx, angle, rng.uniform(*spec.stripe_period),
                           rng.uniform(0, 2 * math.pi))
        texture = body + rng.uniform(*spec.stripe_amplitude) * grating[..., None]
        img[inside] = texture[inside]
        # The discriminative part: a disc inside the body with a strong, fine grating at the class orientation.
        pr = rng.uniform(*spec.part_radius)
        t = rng.uniform(0, 2 * math.pi)
        rho = rng.uniform(0, 0.55)
        u, v = rho * a * math.cos(t), rho * b * math.sin(t)
        py = cy + u * math.sin(rot) + v * math.cos(rot)
        px = cx + u * math.cos(rot) - v * math.sin(rot)
        disc = np.hypot(yy - py, xx - px) < pr
        fine = _grating(yy, xx, _class_angle(cls, spec.num_classes), rng.uniform(*spec.part_period),
                        rng.uniform(0, 2 * math.pi))
        part = body.mean() + spec.part_amplitude * fine[..., None]
        img[disc & inside] = part[disc & inside]
        parts |= disc & inside
        mask[inside] = cls + 1
        edge |= np.abs(radius - 1.0) * min(a, b) < 0.75

    img = np.clip(img, 0, 1)
    fg = (mask > 0).astype(np.float32)
    mask[edge] = 255
    saliency = np.clip(gaussian_filter(fg, sigma=2.0) + rng.normal(0, 0.05, fg.shape), 0, 1)
    out = (img * 255).round().astype(np.uint8), mask, (saliency * 255).round().astype(np.uint8)
    return (*out, parts) if with_parts else out


def generate(out: str | Path, spec: SyntheticSpec | None = None, progress: bool = True) -> Path:
    """Write the data set below ``out`` (VOC layout). Reruns with the same spec skip existing files."""
    spec = spec or SyntheticSpec()
    out = Path(out)
    meta_path = out / META_FILE
    meta = {"num_classes": spec.num_classes, "classes": class_names(spec.num_classes), "spec": asdict(spec)}
    if meta_path.exists():
        old = read_json(meta_path)
        if old.get("spec") != json_roundtrip(asdict(spec)):
            raise FileExistsError(
                f"{meta_path}: a synthetic data set with other settings is already there; "
                "choose another output folder or delete it"
            )
    splits = {"train": spec.num_train, "val": spec.num_val}
    labels: dict[str, list[int]] = {}
    ids_by_split: dict[str, list[str]] = {}
    for split_index, (split, count) in enumerate(splits.items()):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        ids_by_split[split] = ids
        for i, image_id in enumerate(tqdm(ids, desc=f"synthetic {split}", disable=not progress)):
            # One generator per image: any image can be regenerated alone, in any order.
            rng = np.random.default_rng([spec.seed, split_index, i])
            image, mask, saliency = render_sample(rng, spec)
            labels[image_id] = sorted(int(c) for c in np.unique(mask) if 0 < c < 255)
            paths = (out / "JPEGImages" / f"{image_id}.jpg", out / "SegmentationClass" / f"{image_id}.png",
                     out / "saliency" / f"{image_id}.png")
            if all(p.exists() for p in paths):
                continue
            write_image(paths[0], image)
            write_mask(paths[1], mask)
            write_grey_png(paths[2], saliency)
    for split, ids in ids_by_split.items():
        list_path = out / "ImageSets" / "Segmentation" / f"{split}.txt"
        write_text(list_path, "\n".join(ids) + "\n")
    write_json(out / "cls_labels.json", labels)
    write_json(meta_path, meta)
    return out


def json_roundtrip(obj):
    """Tuples become lists as in the saved meta.json, so specs compare equal after a reload."""
    return json.loads(json.dumps(obj))
