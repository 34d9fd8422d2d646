"""MS COCO 2014 in the layout WSSS papers use (80 classes, image-level labels from the annotations).

On disk, below ``root``::

    train2014/<id>.jpg, val2014/<id>.jpg     the COCO images; an id is the file stem,
                                             e.g. ``COCO_train2014_000000000009``
    annotations/instances_{train,val}2014.json
    SegmentationClass/{train2014,val2014}/<id>.png   class masks (built by ``fsae data prepare coco``):
                                             VOC palette, 0 bg, 1..80, 255 ignore
    ImageSets/train.txt, ImageSets/val.txt   ids with at least one image-level label
    cls_labels.json                          {"<id>": [labels in 1..80], ...} for both splits

COCO category ids (1..90 with gaps) map to classes 1..80 in sorted category-id order
(``category_mapping``); ``COCO_CLASSES[c - 1]`` names class ``c``.

A sample is the same dict as ``VOCDataset``'s: ``id``, ``image`` uint8 (H, W, 3), ``label`` float32
(80,) multi-hot and, where present, ``mask`` uint8 (H, W) and ``saliency`` uint8 (H, W).
"""

from __future__ import annotations

from pathlib import Path

from fsae.data.voc import VOCDataset
from fsae.errors import DataError

COCO_SPLITS = ("train2014", "val2014")

# The 80 category ids of the COCO 2014/2017 instance annotations, sorted.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

# Class c (1..80) is COCO_CLASSES[c - 1]: the category names in COCO_CATEGORY_IDS order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def category_mapping(coco) -> dict[int, int]:
    """COCO category id -> contiguous class ``1..N`` in sorted category-id order (0 is background).

    ``coco`` is a ``pycocotools.coco.COCO``; for the real annotation files the result maps
    ``COCO_CATEGORY_IDS[i]`` to ``i + 1``.
    """
    return {cat_id: index + 1 for index, cat_id in enumerate(sorted(coco.getCatIds()))}


def split_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Where a COCO split lives below ``root``: ``images``, ``masks`` (folders), ``list`` (file)."""
    if split not in COCO_SPLITS:
        raise DataError(f"unknown COCO split {split!r}; use one of {', '.join(COCO_SPLITS)}")
    root = Path(root)
    return {
        "images": root / split,
        "masks": root / "SegmentationClass" / split,
        "list": root / "ImageSets" / f"{split[: -len('2014')]}.txt",
        "annotations": root / "annotations" / f"instances_{split}.json",
    }


class COCODataset(VOCDataset):
    """Images, image-level labels and optional class masks / saliency maps of a COCO 2014 split."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train2014",
        num_classes: int = 80,
        mask_dir: str | None = "SegmentationClass",
        label_file: str | Path | None = None,
        saliency_dir: str | Path | None = None,
    ):
        paths = split_paths(root, split)
        super().__init__(
            root,
            split=paths["list"].stem,
            num_classes=num_classes,
            mask_dir=f"{mask_dir}/{split}" if mask_dir else None,
            label_file=label_file,
            saliency_dir=saliency_dir,
            image_dir=split,
            split_dir="ImageSets",
        )
        self.split = split


def split_of(root: str | Path, image_id: str) -> str:
    """The COCO split (``train2014`` / ``val2014``) whose image folder holds ``<image_id>.jpg``.

    COCO file names carry their split (``COCO_val2014_000000000042``); an id without one is looked up in
    both folders. DataError naming the id when no folder holds it.
    """
    named = [s for s in COCO_SPLITS if f"_{s}_" in image_id]
    for split in named + [s for s in COCO_SPLITS if s not in named]:
        if (Path(root) / split / f"{image_id}.jpg").is_file():
            return split
    raise DataError(f"{root}: no image {image_id}.jpg in {' or '.join(f'{s}/' for s in COCO_SPLITS)}")


def ids_by_split(root: str | Path, ids) -> dict[str, list[str]]:
    """``ids`` grouped by the split folder holding each image, in their given order (``split_of``)."""
    groups: dict[str, list[str]] = {}
    for image_id in ids:
        groups.setdefault(split_of(root, image_id), []).append(image_id)
    return groups


def single_split(root: str | Path, ids) -> str:
    """The one split holding every image of ``ids`` (a random walk trains on one split); DataError otherwise."""
    groups = ids_by_split(root, ids)
    if len(groups) != 1:
        counts = ", ".join(f"{split} ({len(group)})" for split, group in groups.items()) or "none"
        raise DataError(f"{root}: the seeds' images are in {counts}; IRN and PSA train on one split: pass --ids "
                        f"with one split's ids")
    return next(iter(groups))
