"""Training the boundary branch on IR labels (IRN ``train_irn``, without the displacement branch).

A sample (``AffinityCrops``, IRN's ``VOC12AffinityDataset``): the image and its IR label rescaled by a
random factor in ``scale_range`` (bicubic / nearest, PIL), flipped, normalised, randomly cropped to
``crop_size`` (``random_crop_box``: a smaller side sits at a random place of the crop; image padded with 0,
label with 255), and the label reduced to stride 4 (nearest); the
pair labels (``affinity_labels``) are made from that reduced label in the training step.

Loop: SGD on the branch only (the backbone is frozen), ``lr`` with poly decay over all steps,
``affinity_loss`` on ``affinity_from_boundary(sigmoid(logits))``; the network runs under ``train.precision``
(``fsae.speed.mixed_forward``), the sigmoid, affinities and loss in fp32. The checkpoint (``irn.pt``, atomic)
is written after each epoch; a rerun continues from it, or returns at once when it is complete (the loop is
PSA's too: ``fsae.refine.affinity.fit_affinity_net``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fsae.augment import normalize
from fsae.errors import CheckpointError, DataError
from fsae.infer import to_tensor_image
from fsae.io import read_image, read_mask
from fsae.labels import IGNORE_INDEX
from fsae.weights import read_weight_file
from fsae.refine.affinity import (affinity_labels, affinity_loader_options, affinity_loss, fit_affinity_net,
                                  seed_loader_worker)
from fsae.refine.irn.affinity import affinity_from_boundary
from fsae.refine.irn.config import IRNConfig
from fsae.refine.irn.network import FEATURE_STRIDE, BoundaryNet
from fsae.speed import mixed_forward


def _rescale(array: np.ndarray, scale: float, resample: int) -> np.ndarray:
    h, w = array.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    if size == (w, h):
        return array
    return np.asarray(Image.fromarray(array).resize(size, resample))


def random_crop_box(size: tuple[int, int], crop: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """IRN's random crop (``misc/imutils.py:55-78``): per axis (container offset, image offset, extent).

    An axis longer than ``crop`` is cut at a random image offset; a shorter one is placed at a random
    offset inside the crop-sized container (not top-left). Draws the width offset first, as IRN does.
    """

    def axis(length: int) -> tuple[int, int, int]:
        space = length - crop
        if space > 0:
            return 0, random.randrange(space + 1), crop
        return random.randrange(-space + 1), 0, length

    width = axis(size[1])
    return axis(size[0]), width


class AffinityCrops(Dataset):
    """Images + IR labels -> training crops (module docstring).

    A sample: ``image`` (3, S, S) float normalised, ``label`` (S/4, S/4) int64 label space (255 ignore).
    """

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, ids: list[str],
                 crop_size: int, scale_range: tuple[float, float] = (0.5, 1.5), hflip: bool = True,
                 image_ext: str = ".jpg"):
        if crop_size % FEATURE_STRIDE:
            raise ValueError(f"crop_size must be a multiple of {FEATURE_STRIDE}, got {crop_size}")
        if not ids:
            raise DataError(f"{label_dir}: no IR labels to train on")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.ids, self.crop_size = list(ids), crop_size
        self.scale_range, self.hflip, self.image_ext = tuple(scale_range), hflip, image_ext

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.image_dir / f"{image_id}{self.image_ext}")
        label_path = self.label_dir / f"{image_id}.png"
        label = read_mask(label_path)
        if label.shape != image.shape[:2]:
            raise DataError(f"{label_path}: IR label size {label.shape} does not match its image {image.shape[:2]}")
        lo, hi = self.scale_range
        scale = lo + random.random() * (hi - lo)
        image = _rescale(image, scale, Image.BICUBIC)
        label = _rescale(label, scale, Image.NEAREST)
        if self.hflip and bool(random.getrandbits(1)):  # IRN misc/imutils.py:45-53
            image, label = image[:, ::-1], label[:, ::-1]
        x = normalize(to_tensor_image(np.array(image)))  # a writable copy (PIL arrays are read-only)
        y = torch.from_numpy(np.array(label)).long()
        s = self.crop_size
        (ct, it, ch), (cl, il, cw) = random_crop_box(tuple(y.shape), s)
        # the crop in a container of the crop size (image 0 after normalisation, label ignore)
        cx = x.new_zeros((3, s, s))
        cy = y.new_full((s, s), IGNORE_INDEX)
        cx[:, ct:ct + ch, cl:cl + cw] = x[:, it:it + ch, il:il + cw]
        cy[ct:ct + ch, cl:cl + cw] = y[it:it + ch, il:il + cw]
        x, y = cx, cy
        small = Image.fromarray(y.numpy().astype(np.uint8)).resize((s // FEATURE_STRIDE,) * 2, Image.NEAREST)
        return {"id": image_id, "image": x, "label": torch.from_numpy(np.asarray(small, dtype=np.int64))}


def train_step(model: BoundaryNet, images: torch.Tensor, labels: torch.Tensor, radius: int, precision: str = "fp32",
               channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms of one batch. Shape: images (B, 3, S, S), labels (B, S/4, S/4)."""
    logits = mixed_forward(model, images, precision=precision, channels_last=channels_last)
    boundary = torch.sigmoid(logits)[:, 0]  # fp32: -log(1 + 1e-5 - a) needs a resolution finer than bf16's 2^-8 near 1
    affinity = affinity_from_boundary(boundary, radius)
    return affinity_loss(affinity, *affinity_labels(labels, radius))


def train_irn(cfg: IRNConfig, image_dir: str | os.PathLike, label_dir: str | os.PathLike, ids: list[str],
              checkpoint: str | os.PathLike, progress: bool = True, image_ext: str = ".jpg") -> Path:
    """Train the boundary branch on ``label_dir/<id>.png`` IR labels; write ``checkpoint`` (atomic).

    Resumes from ``checkpoint`` (after its last finished epoch) when it was trained with the same config
    hash; returns at once when all epochs are done.
    """
    tc = cfg.train
    checkpoint = Path(checkpoint)
    device = torch.device(cfg.device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = BoundaryNet(cfg.net.backbone, cfg.net.weights, cfg.net.branch_width, cfg.net.freeze_backbone).to(device)
    dataset = AffinityCrops(image_dir, label_dir, ids, tc.crop_size, tuple(tc.scale_range), tc.hflip, image_ext)
    if len(dataset) < tc.batch_size:
        raise DataError(f"{label_dir}: {len(dataset)} IR labels for a batch of {tc.batch_size}; "
                        f"lower train.batch_size")
    generator = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, generator=generator,
                        worker_init_fn=seed_loader_worker, **affinity_loader_options(tc, device))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=tc.lr, momentum=tc.momentum,
                                weight_decay=tc.weight_decay)
    return fit_affinity_net(model, optimizer, loader, generator, cfg, checkpoint, train_step, device, progress,
                            "IRN")


def load_boundary_net(checkpoint: str | os.PathLike, cfg: IRNConfig, device: str | torch.device = "cpu") -> BoundaryNet:
    """The trained boundary network of ``checkpoint`` (eval mode)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: IRN checkpoint not found; train it first (`fsae irn RUN_DIR`)")
    state = read_weight_file(checkpoint, "IRN checkpoint", unwrap=False)
    net = state.get("config", {}).get("net", {})
    model = BoundaryNet(net.get("backbone", cfg.net.backbone), None, net.get("branch_width", cfg.net.branch_width))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
