"""PASCAL VOC 2012 layout (also used by the generated synthetic set).

On disk, below ``root`` (a ``VOCdevkit/VOC2012``-style folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        GT masks, VOC palette, label space (0 bg, 1..C, 255 ignore)
    SegmentationClassAug/<id>.png     train_aug masks (built by ``fsae data prepare voc``)
    ImageSets/Segmentation/<split>.txt
    Annotations/<id>.xml              VOC object annotations (read by ``xml_image_labels``)
    cls_labels.json                   {"<id>": [labels in 1..C], ...} image-level labels

A sample is a dict: ``id`` (str), ``image`` uint8 (H, W, 3) numpy, ``label`` float32 (C,) multi-hot,
and, where present, ``mask`` uint8 (H, W) and ``saliency`` uint8 (H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from fsae.errors import DataError
from fsae.io import read_id_list, read_image, read_json, read_mask
from fsae.labels import VOC_CLASSES

LABEL_FILE = "cls_labels.json"
ANNOTATION_DIR = "Annotations"


def saliency_folder(root: str | Path, saliency_dir: str | Path | None) -> Path | None:
    """``data.saliency_dir`` as a folder: an absolute path as given; a relative one below ``root``, as
    ``mask_dir`` (``SALImages`` -> ``<root>/SALImages``), except when no such folder exists there but one
    does relative to the working directory (recipes before issue 29 wrote ``data/VOCdevkit/VOC2012/SALImages``,
    the synthetic recipes ``data/synthetic/saliency``). None when unset."""
    if not saliency_dir:
        return None
    path = Path(saliency_dir)
    if path.is_absolute():
        return path
    below_root = Path(root) / path
    return path if not below_root.is_dir() and path.is_dir() else below_root


def xml_objects(path: str | Path) -> tuple[list[int], list[str]]:
    """The classes (sorted, in 1..20) a VOC annotation file's objects name, and the object names that are
    no VOC class (sorted; e.g. a typo ``pottedplants``). DataError naming the file if it does not parse.

    Every ``<object>``'s own ``<name>`` counts, ``difficult`` and ``truncated`` objects included (irn
    voc12/dataloader.py:30-43 reads every ``<name>`` with ``getElementsByTagName('name')``, no ``difficult``
    test); the names of ``<part>``s (``head``, ``hand``, ``foot``) are parts of an object, not objects, and are
    not read. Names are stripped of surrounding whitespace (IRN compares them as they are).
    """
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"{path}: not a readable VOC annotation file ({exc})") from exc
    names = {(obj.findtext("name") or "").strip() for obj in tree.iter("object")}
    known = sorted(VOC_CLASSES.index(n) + 1 for n in names if n in VOC_CLASSES)
    return known, sorted(n for n in names if n not in VOC_CLASSES)


def xml_image_labels(path: str | Path) -> list[int]:
    """The classes (sorted, in 1..20) a VOC annotation file names, as IRN builds its labels (``xml_objects``).

    An object whose name is no VOC class is not dropped silently (IRN drops it, and its image loses a
    label): DataError naming the file, the name and the valid names, so the annotation gets fixed;
    ``fsae data check`` lists every such file (``fsae.data.check``)."""
    known, unknown = xml_objects(path)
    if unknown:
        raise DataError(f"{path}: object name(s) {unknown} are no VOC class; expected one of "
                        f"{', '.join(VOC_CLASSES)}")
    return known


def load_image_labels(path: str | Path, num_classes: int) -> dict[str, np.ndarray]:
    """Image-level labels: ``{id: multi-hot float32 (C,)}`` from a ``cls_labels.json`` file."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object {{id: [labels 1..C]}}")
    out = {}
    for image_id, present in raw.items():
        vec = np.zeros(num_classes, dtype=np.float32)
        for c in present:
            if not isinstance(c, int) or not 1 <= c <= num_classes:
                raise DataError(
                    f"{path}: image {image_id!r} has label {c!r}; labels must be integers in 1..{num_classes}"
                )
            vec[c - 1] = 1.0
        out[str(image_id)] = vec
    return out


class VOCDataset(Dataset):
    """Images, image-level labels and optional GT masks / saliency maps in the VOC layout."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = 20,
        mask_dir: str | None = "SegmentationClass",
        label_file: str | Path | None = None,
        saliency_dir: str | Path | None = None,
        image_dir: str = "JPEGImages",
        split_dir: str = "ImageSets/Segmentation",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root not found")
        self.num_classes = num_classes
        self.split = split
        self.ids = read_id_list(self.root / split_dir / f"{split}.txt")
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir if mask_dir else None
        self.saliency_dir = saliency_folder(self.root, saliency_dir)
        label_path = Path(label_file) if label_file else self.root / LABEL_FILE
        self.labels = load_image_labels(label_path, num_classes)
        missing = [i for i in self.ids if i not in self.labels]
        if missing:
            raise DataError(
                f"{label_path}: no image-level label for {len(missing)} id(s) of split {split!r}, "
                f"e.g. {missing[:3]}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path | None:
        return self.mask_dir / f"{image_id}.png" if self.mask_dir else None

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        sample = {"id": image_id, "image": image, "label": self.labels[image_id]}
        mask_path = self.mask_path(image_id)
        if mask_path is not None and mask_path.exists():
            mask = read_mask(mask_path, self.num_classes)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"{mask_path}: mask size {mask.shape[::-1]} differs from image size "
                    f"{image.shape[1::-1]} of {self.image_path(image_id)}"
                )
            sample["mask"] = mask
        if self.saliency_dir is not None:
            sal_path = self.saliency_dir / f"{image_id}.png"
            sal = read_mask(sal_path)
            if sal.shape != image.shape[:2]:
                raise DataError(f"{sal_path}: saliency size {sal.shape[::-1]} differs from the image's")
            sample["saliency"] = sal
        return sample
