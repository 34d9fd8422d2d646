"""Label spaces, in one place (docs/architecture.md, "Label spaces").

Segmentation label space (on disk, in metrics): 0 = background, 1..C = classes, 255 = ignore.
Image-level labels: multi-hot float vector of length C, class ``c + 1`` at index ``c``.
Score-map channel space (``fsae.fsae``): C + 1 channels, foreground ``0..C-1`` first, background LAST
(index ``C``), the layout of the authors' EPS/PPC code.

``channel_to_label`` / ``label_to_channel`` are the only conversions between the two; every stage uses
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is not imported at run time: the CRF workers use this module without it
    import torch

IGNORE_INDEX = 255


def channel_to_label(channels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Score-map channel indices -> segmentation label space.

    Channel ``c < C`` (foreground) becomes label ``c + 1``; channel ``C`` (background) becomes 0.
    Values already equal to ``IGNORE_INDEX`` stay ``IGNORE_INDEX``.
    """
    out = (channels + 1).masked_fill(channels == num_classes, 0)
    return out.masked_fill(channels == IGNORE_INDEX, IGNORE_INDEX)


def label_to_channel(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Segmentation label space -> score-map channel indices (inverse of ``channel_to_label``)."""
    out = (labels - 1).masked_fill(labels == 0, num_classes)
    return out.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, index 255 included when ``n == 256``."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
