"""Training AffinityNet on the affinity labels (PSA ``train_aff.py``, ``voc12/data.py`` ``VOC12AffDataset``).

A sample (``AffinityCrops``), in PSA's order: colour jitter of the image (brightness, contrast, saturation
0.3, hue 0.1); a random ``crop_size`` crop of image and both posteriors together (``RandomCrop``: zero
padding where the image is smaller); normalisation; a random horizontal flip; the posteriors 8 x 8
average-pooled and turned into the label map (``affinity_label_map``; padding -> ignore). The pair
labels are made from that map in the training step. PSA does not rescale its training images.

Loop: SGD (the backbone's trainable weights at ``lr``, the head at ``new_layer_lr_mult x lr``, weight
decay on both, PSA's momentum quirk), poly decay over all steps, ``affinity_loss`` on the window pairs
(the loop is IRN's too: ``fsae.refine.affinity.fit_affinity_net``).
The checkpoint (``psa.pt``, atomic) is written after each epoch; a rerun with the same settings
continues after its last finished epoch, or returns at once when it is complete.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import ColorJitter

from fsae.augment import normalize
from fsae.errors import CheckpointError, DataError
from fsae.io import read_image
from fsae.weights import read_weight_file
from fsae.refine.affinity import affinity_loader_options, affinity_loss, fit_affinity_net, seed_loader_worker
from fsae.refine.psa.aff_labels import affinity_label_map, load_aff_label
from fsae.refine.psa.affinity import pair_affinity, psa_affinity_labels
from fsae.refine.psa.config import FEATURE_STRIDE, AffNetConfig, PSAConfig
from fsae.refine.psa.network import AffinityNet
from fsae.speed import mixed_forward


def random_crop_box(size: tuple[int, int], crop: int) -> tuple[slice, slice, slice, slice]:
    """PSA's ``RandomCrop`` placement (tool/imutils.py:27-60): ``(container rows, cols, image rows, cols)``.

    Along each side a larger image is cut at a random offset, a smaller one is pasted at a random offset
    into the zero container (width drawn first, as PSA).
    """
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    cont_left, img_left = (0, random.randrange(w_space + 1)) if w_space > 0 else (random.randrange(-w_space + 1), 0)
    cont_top, img_top = (0, random.randrange(h_space + 1)) if h_space > 0 else (random.randrange(-h_space + 1), 0)
    return (slice(cont_top, cont_top + ch), slice(cont_left, cont_left + cw),
            slice(img_top, img_top + ch), slice(img_left, img_left + cw))


def pool(scores: np.ndarray, k: int = FEATURE_STRIDE) -> np.ndarray:
    """``k x k`` block means (skimage ``block_reduce(.., np.mean)``). Shape: (C, S, S) -> (C, S/k, S/k)."""
    c, h, w = scores.shape
    return scores.reshape(c, h // k, k, w // k, k).mean(axis=(2, 4))


class AffinityCrops(Dataset):
    """Images + affinity-label posteriors -> training crops (module docstring).

    A sample: ``image`` (3, S, S) float normalised, ``label`` (S/8, S/8) int64 label space (255 ignore).
    """

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike, ids: list[str], crop_size: int,
                 color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1), hflip: bool = True,
                 image_ext: str = ".jpg"):
        if crop_size % FEATURE_STRIDE:
            raise ValueError(f"crop_size must be a multiple of {FEATURE_STRIDE}, got {crop_size}")
        if not ids:
            raise DataError(f"{label_dir}: no affinity labels to train on")
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.ids, self.crop_size, self.hflip, self.image_ext = list(ids), crop_size, hflip, image_ext
        self.jitter = ColorJitter(*color_jitter) if any(color_jitter) else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.image_dir / f"{image_id}{self.image_ext}")
        label_path = self.label_dir / f"{image_id}.npz"
        keys, la, ha = load_aff_label(label_path)
        if la.shape[1:] != image.shape[:2]:
            raise DataError(f"{label_path}: affinity label size {la.shape[1:]} does not match its image "
                            f"{image.shape[:2]}")
        if self.jitter is not None:
            image = np.asarray(self.jitter(Image.fromarray(image)))
        s = self.crop_size
        rows, cols, img_rows, img_cols = random_crop_box(image.shape[:2], s)
        pixels = np.zeros((3, s, s), np.float32)
        pixels[:, rows, cols] = np.transpose(image, (2, 0, 1))[:, img_rows, img_cols]
        scores = np.zeros((2 * la.shape[0], s, s), np.float32)
        scores[:, rows, cols] = np.concatenate([la, ha])[:, img_rows, img_cols]
        x = normalize(torch.from_numpy(pixels).div_(255.0))  # the zero padding is normalised too (PSA)
        if self.hflip and random.getrandbits(1):
            x, scores = x.flip(-1), scores[..., ::-1]
        pooled_la, pooled_ha = np.split(pool(np.ascontiguousarray(scores)), 2)
        label = affinity_label_map(pooled_la, pooled_ha, keys)
        return {"id": image_id, "image": x, "label": torch.from_numpy(label.astype(np.int64))}


def train_step(model: AffinityNet, images: torch.Tensor, labels: torch.Tensor, radius: int, precision: str = "fp32",
               channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms of one batch. Shape: images (B, 3, S, S), labels (B, S/8, S/8)."""
    features = mixed_forward(model, images, precision=precision, channels_last=channels_last)
    affinity = pair_affinity(features, radius)  # fp32: exp(-|f_i - f_j|) and the log-loss near 1 need fp32
    return affinity_loss(affinity, *psa_affinity_labels(labels, radius))


def build_affinity_net(cfg: PSAConfig, weights: str | None = None) -> AffinityNet:
    n = cfg.net
    return AffinityNet(n.width, weights, tuple(n.feature_channels), n.freeze_bn, n.freeze_stem)


def train_psa(cfg: PSAConfig, image_dir: str | os.PathLike, label_dir: str | os.PathLike, ids: list[str],
              checkpoint: str | os.PathLike, progress: bool = True, image_ext: str = ".jpg") -> Path:
    """Train AffinityNet on ``label_dir/<id>.npz``; write ``checkpoint`` (atomic) after each epoch.

    Resumes from ``checkpoint`` when it was trained with the same config hash; returns at once when all
    epochs are done.
    """
    tc = cfg.train
    checkpoint = Path(checkpoint)
    device = torch.device(cfg.device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_affinity_net(cfg, cfg.net.weights).to(device)
    dataset = AffinityCrops(image_dir, label_dir, ids, tc.crop_size, tuple(tc.color_jitter), tc.hflip, image_ext)
    if len(dataset) < tc.batch_size:
        raise DataError(f"{label_dir}: {len(dataset)} affinity labels for a batch of {tc.batch_size}; "
                        f"lower train.batch_size")
    generator = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, generator=generator,
                        worker_init_fn=seed_loader_worker, **affinity_loader_options(tc, device))
    optimizer = torch.optim.SGD([
        {"params": model.backbone_parameters(), "lr_mult": 1.0},
        {"params": model.head_parameters(), "lr_mult": tc.new_layer_lr_mult},
    ], lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)  # train_aff.py:68-74
    return fit_affinity_net(model, optimizer, loader, generator, cfg, checkpoint, train_step, device, progress,
                            "PSA")


def load_affinity_net(checkpoint: str | os.PathLike, cfg: PSAConfig, device: str | torch.device = "cpu") -> AffinityNet:
    """The trained AffinityNet of ``checkpoint`` (eval mode), built with the settings it was trained with."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: PSA checkpoint not found; train it first (`fsae psa RUN_DIR`)")
    state = read_weight_file(checkpoint, "PSA checkpoint", unwrap=False)
    net = state.get("config", {}).get("net")
    trained = PSAConfig(net=AffNetConfig(**net)) if net else cfg
    model = build_affinity_net(trained)  # no weight file: the checkpoint holds every weight
    model.load_state_dict(state["model"])
    return model.to(device).eval()
