"""VOC- and COCO-shaped data trees in the real on-disk formats, for tests (plain functions, no fixtures).

``make_voc`` / ``make_coco``: the small hand-checked trees of tests/test_data_real.py (16-24 px images; the
expectations there are written against these exact masks). ``make_voc_tree`` / ``make_coco_tree``: fuller
trees every stage of a paper row can run on, in seconds on a CPU:

- VOC (``VOCdevkit/VOC2012`` + SBD ``benchmark_RELEASE/dataset``): 72-96 px JPEG images (PSA's walk of
  radius 5 at stride 8 needs 72 px), VOC palette PNGs in
  ``SegmentationClass/`` (train and val, 255 object outlines), ``Annotations/<id>.xml`` naming the objects,
  SBD ``cls/<id>.mat`` (GTcls) and ``inst/<id>.mat`` (GTinst) for SBD's ids, greyscale saliency maps in
  ``SALImages/`` (the objects, as PFAN maps are), ``ImageSets/Segmentation/{train,val,test}.txt``. SBD has ids
  outside VOC train, so ``fsae data prepare voc`` makes a train_aug (``VOC_TREE_TRAIN_AUG``) larger than train;
  with ``prepare=True`` it is run (``SegmentationClassAug/``, ``train_aug.txt``, ``cls_labels.json``).
- COCO (``coco/``): ``train2014/``, ``val2014/`` JPEGs named ``COCO_<split>_<12 digits>.jpg``,
  ``annotations/instances_{train,val}2014.json`` with polygon annotations (pycocotools reads them), saliency
  maps in ``SALImages/`` for the training images (PPC/EPS on COCO); ``prepare=True`` runs ``fsae data prepare coco``.

The image pixels follow the masks (each class its own colour, plus noise), so the trees are also a task a
network can learn a little of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from pycocotools import mask as mask_utils
from scipy.io import savemat

from fsae.data.coco import COCO_CATEGORY_IDS, COCO_CLASSES
from fsae.io import write_grey_png, write_image, write_mask
from fsae.labels import VOC_CLASSES, voc_palette

# ------------------------------------------------------------------------ small VOC + SBD tree (test_data_real)

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000002"]
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2007_000039", "2008_000100", "2008_000200", "2007_000033"]
SBD_VAL = ["2009_000001", "2007_000042", "2008_000100"]
TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000100", "2008_000200", "2009_000001"]

# id: (height, width, [(class, y0, y1, x0, x1), ...])
VOC_MASKS = {
    "2007_000032": (16, 20, [(1, 2, 8, 3, 9), (15, 9, 14, 10, 18)]),
    "2007_000039": (16, 20, [(20, 4, 12, 4, 12)]),
    "2008_000002": (12, 18, [(7, 2, 10, 2, 16)]),
    "2007_000033": (16, 20, [(1, 3, 9, 3, 9)]),
    "2007_000042": (14, 16, [(19, 2, 6, 2, 6), (2, 8, 12, 8, 14)]),
}
SBD_MASKS = {
    "2007_000039": (16, 20, [(9, 1, 5, 1, 5)]),  # VOC has this id: its VOC mask must win
    "2008_000100": (10, 14, [(12, 1, 9, 1, 7), (13, 2, 8, 7, 13)]),
    "2008_000200": (12, 12, [(3, 0, 12, 0, 6)]),
    "2007_000033": (16, 20, [(5, 1, 3, 1, 3)]),  # VOC val: not in train_aug
    "2009_000001": (18, 10, [(11, 10, 18, 0, 10), (15, 2, 9, 3, 7)]),
    "2007_000042": (14, 16, [(4, 1, 3, 1, 3)]),
}
EXPECTED_VOC_LABELS = {
    "2007_000032": [1, 15],
    "2007_000039": [20],
    "2008_000002": [7],
    "2007_000033": [1],
    "2007_000042": [2, 19],
    "2008_000100": [12, 13],
    "2008_000200": [3],
    "2009_000001": [11, 15],
}


def draw(height, width, rects, boundary=False):
    mask = np.zeros((height, width), np.uint8)
    for cls, y0, y1, x0, x1 in rects:
        if boundary:  # VOC outlines objects with 255 (ignore)
            mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = 255
        mask[y0:y1, x0:x1] = cls
    return mask


def random_image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_sbd_mat(path: Path, seg: np.ndarray, classes: list[int]) -> None:
    """The SBD cls/<id>.mat layout: a 1x1 struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=float)
    gt = {"Segmentation": seg, "Boundaries": boundaries, "CategoriesPresent": np.array(classes, np.uint8)}
    savemat(path, {"GTcls": gt})


def write_list(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_voc(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    sizes = {i: spec[:2] for i, spec in {**SBD_MASKS, **VOC_MASKS}.items()}
    for seed, (image_id, (h, w)) in enumerate(sorted(sizes.items())):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", random_image(h, w, seed))
    for image_id, (h, w, rects) in VOC_MASKS.items():
        write_mask(root / "SegmentationClass" / f"{image_id}.png", draw(h, w, rects, boundary=True))
    write_list(root / "ImageSets" / "Segmentation" / "train.txt", VOC_TRAIN)
    write_list(root / "ImageSets" / "Segmentation" / "val.txt", VOC_VAL)
    (sbd / "cls").mkdir(parents=True)
    for image_id, (h, w, rects) in SBD_MASKS.items():
        write_sbd_mat(sbd / "cls" / f"{image_id}.mat", draw(h, w, rects), sorted({r[0] for r in rects}))
    write_list(sbd / "train.txt", SBD_TRAIN)
    write_list(sbd / "val.txt", SBD_VAL)
    return root, sbd


# ------------------------------------------------------------------------------ small COCO tree (test_data_real)


def uncompressed_rle(binary: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths, starting with a run of zeros."""
    counts, current, run = [], 0, 0
    for value in binary.flatten(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(binary.shape), "counts": counts}


def compressed_rle(binary: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rect_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    categories = [{"id": c, "name": n, "supercategory": "x"} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    train_images = [
        {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 20, "width": 24},
        {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": 10, "width": 12},
        {"id": 30, "file_name": "COCO_train2014_000000000030.jpg", "height": 8, "width": 8},
    ]
    train_anns = [
        # person, polygon
        {"id": 101, "image_id": 9, "category_id": 1, "iscrowd": 0,
         "segmentation": [rect_polygon(2, 3, 12, 15)]},
        # dog, compressed RLE, drawn over part of the person
        {"id": 102, "image_id": 9, "category_id": 18, "iscrowd": 0,
         "segmentation": compressed_rle(box((20, 24), 10, 18, 8, 20))},
        # car crowd, uncompressed RLE
        {"id": 103, "image_id": 9, "category_id": 3, "iscrowd": 1,
         "segmentation": uncompressed_rle(box((20, 24), 0, 6, 14, 24))},
        # person, polygon drawn over part of the crowd
        {"id": 104, "image_id": 9, "category_id": 1, "iscrowd": 0,
         "segmentation": [rect_polygon(20, 2, 24, 4)]},
        # toothbrush crowd, the only annotation of image 25
        {"id": 105, "image_id": 25, "category_id": 90, "iscrowd": 1,
         "segmentation": uncompressed_rle(box((10, 12), 2, 8, 3, 9))},
    ]
    val_images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 16, "width": 16}]
    val_anns = [  # dining table, a polygon in two parts
        {"id": 201, "image_id": 42, "category_id": 67, "iscrowd": 0,
         "segmentation": [rect_polygon(1, 1, 5, 5), rect_polygon(8, 8, 14, 12)]},
    ]
    for split, images, anns in (("train2014", train_images, train_anns), ("val2014", val_images, val_anns)):
        for anno in anns:
            anno.update(area=1.0, bbox=[0, 0, 1, 1])
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
        for seed, info in enumerate(images):
            write_image(root / split / info["file_name"], random_image(info["height"], info["width"], seed))
    return root


# ------------------------------------------------------------------------- VOC + SBD tree for whole chains

# id: (height, width, [(class 1..20, y0, y1, x0, x1), ...]); the same objects in VOC's and SBD's masks
VOC_TREE_OBJECTS = {
    # VOC train
    "2007_000032": (72, 96, [(1, 8, 40, 10, 50), (15, 36, 68, 56, 90)]),  # aeroplane, person
    "2007_000039": (80, 80, [(20, 16, 60, 16, 60)]),  # tvmonitor
    "2007_000063": (72, 88, [(12, 10, 54, 8, 44), (9, 20, 60, 52, 84)]),  # dog, chair
    "2007_000068": (96, 72, [(3, 20, 70, 10, 60)]),  # bird
    "2007_000121": (72, 72, [(7, 8, 40, 4, 60), (15, 40, 62, 20, 44)]),  # car, person
    "2007_000170": (88, 72, [(13, 12, 80, 8, 56)]),  # horse
    # VOC val
    "2007_000033": (72, 80, [(1, 10, 50, 10, 70)]),  # aeroplane
    "2007_000042": (72, 96, [(19, 8, 40, 6, 60), (2, 30, 60, 60, 90)]),  # train, bicycle
    "2007_000061": (80, 72, [(8, 20, 70, 10, 50)]),  # cat
    # SBD only
    "2008_000100": (72, 72, [(12, 8, 50, 6, 40), (13, 20, 66, 40, 70)]),  # dog, horse
    "2008_000200": (72, 80, [(3, 4, 60, 4, 40)]),  # bird
    "2008_000300": (96, 72, [(11, 50, 94, 0, 64), (15, 10, 48, 16, 46)]),  # diningtable, person
}
VOC_TREE_TRAIN = ["2007_000032", "2007_000039", "2007_000063", "2007_000068", "2007_000121", "2007_000170"]
VOC_TREE_VAL = ["2007_000033", "2007_000042", "2007_000061"]
VOC_TREE_TEST = {"2008_000400": (72, 80), "2008_000401": (80, 72)}  # images only (the evaluation server's split)
VOC_TREE_SBD_TRAIN = ["2007_000039", "2007_000063", "2008_000100", "2008_000200", "2007_000033"]  # a VOC val id
VOC_TREE_SBD_VAL = ["2008_000300", "2007_000042"]
# (VOC train | SBD train | SBD val) - VOC val, sorted: by hand
VOC_TREE_TRAIN_AUG = ["2007_000032", "2007_000039", "2007_000063", "2007_000068", "2007_000121", "2007_000170",
                      "2008_000100", "2008_000200", "2008_000300"]


@dataclass(frozen=True)
class VOCTree:
    root: Path  # VOCdevkit/VOC2012
    sbd: Path  # benchmark_RELEASE/dataset
    train: list[str]
    val: list[str]
    train_aug: list[str]
    test: list[str]
    labels: dict[str, list[int]]  # id -> its classes 1..20, sorted


def object_mask(height: int, width: int, rects, boundary: bool = False) -> np.ndarray:
    """(H, W) uint8 label mask of ``rects`` [(class, y0, y1, x0, x1)], later ones on top; ``boundary``: VOC's
    255 outline one pixel wide around each object."""
    return draw(height, width, rects, boundary=boundary)


def object_image(height: int, width: int, rects, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: grey noise with each object filled in its class's palette colour (plus noise)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(110, 25, (height, width, 3))
    palette = voc_palette(32).astype(float)
    for cls, y0, y1, x0, x1 in rects:
        image[y0:y1, x0:x1] = palette[cls] * 0.8 + rng.normal(25, 15, (y1 - y0, x1 - x0, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sbd_inst_mat(path: Path, rects, height: int, width: int) -> None:
    """The SBD inst/<id>.mat layout: a 1x1 struct GTinst with Segmentation (instance index, 0 = none),
    Boundaries (one sparse map per instance) and Categories (the class of each instance)."""
    seg = np.zeros((height, width), np.uint8)
    for index, (_, y0, y1, x0, x1) in enumerate(rects, start=1):
        seg[y0:y1, x0:x1] = index
    boundaries = np.empty((len(rects), 1), dtype=object)
    for i in range(len(rects)):
        boundaries[i, 0] = scipy.sparse.csc_matrix((height, width), dtype=float)
    categories = np.array([[r[0]] for r in rects], np.uint8)
    savemat(path, {"GTinst": {"Segmentation": seg, "Boundaries": boundaries, "Categories": categories}})


def voc_annotation(image_id: str, height: int, width: int, rects) -> str:
    """``Annotations/<id>.xml`` as VOC2012 writes it: size, and one object per rectangle (1-based box)."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{VOC_CLASSES[cls - 1]}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n"
        f"\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for cls, y0, y1, x0, x1 in rects)
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>1</segmented>\n{objects}</annotation>\n")


def make_voc_tree(tmp_path: Path, prepare: bool = False) -> VOCTree:
    """The VOC2012 + SBD download layout below ``tmp_path`` (module docstring); ``prepare``: also run
    ``fsae data prepare voc`` on it (one process)."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    for seed, (image_id, (h, w, rects)) in enumerate(sorted(VOC_TREE_OBJECTS.items())):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", object_image(h, w, rects, seed))
        write_grey_png(root / "SALImages" / f"{image_id}.png", (object_mask(h, w, rects) > 0).astype(np.uint8) * 255)
        xml = root / "Annotations" / f"{image_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(voc_annotation(image_id, h, w, rects))
    for seed, (image_id, (h, w)) in enumerate(sorted(VOC_TREE_TEST.items()), start=100):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", random_image(h, w, seed))
    for image_id in VOC_TREE_TRAIN + VOC_TREE_VAL:
        h, w, rects = VOC_TREE_OBJECTS[image_id]
        write_mask(root / "SegmentationClass" / f"{image_id}.png", object_mask(h, w, rects, boundary=True))
    lists = root / "ImageSets" / "Segmentation"
    for name, ids in (("train", VOC_TREE_TRAIN), ("val", VOC_TREE_VAL), ("test", sorted(VOC_TREE_TEST))):
        write_list(lists / f"{name}.txt", ids)
    (sbd / "cls").mkdir(parents=True)
    (sbd / "inst").mkdir()
    for image_id in sorted(set(VOC_TREE_SBD_TRAIN) | set(VOC_TREE_SBD_VAL)):
        h, w, rects = VOC_TREE_OBJECTS[image_id]
        write_sbd_mat(sbd / "cls" / f"{image_id}.mat", object_mask(h, w, rects), sorted({r[0] for r in rects}))
        write_sbd_inst_mat(sbd / "inst" / f"{image_id}.mat", rects, h, w)
    write_list(sbd / "train.txt", VOC_TREE_SBD_TRAIN)
    write_list(sbd / "val.txt", VOC_TREE_SBD_VAL)
    if prepare:
        from fsae.data.prepare import prepare_voc

        prepare_voc(root, sbd, workers=1, progress=False)
    labels = {i: sorted({r[0] for r in rects}) for i, (_, _, rects) in VOC_TREE_OBJECTS.items()}
    return VOCTree(root, sbd, list(VOC_TREE_TRAIN), list(VOC_TREE_VAL), list(VOC_TREE_TRAIN_AUG),
                   sorted(VOC_TREE_TEST), labels)


# ------------------------------------------------------------------------------- COCO tree for whole chains

# image number: (height, width, [(COCO category id, polygon [x0, y0, x1, y1, ...]), ...])
COCO_TREE_TRAIN_OBJECTS = {
    9: (72, 96, [(1, rect_polygon(8, 10, 40, 60)), (18, rect_polygon(50, 20, 90, 66))]),  # person, dog
    25: (64, 64, [(3, rect_polygon(4, 8, 60, 40))]),  # car
    30: (80, 72, [(62, [10, 70, 36, 10, 62, 70])]),  # chair, a triangle
    42: (96, 80, [(1, rect_polygon(20, 10, 60, 90)), (44, rect_polygon(62, 40, 78, 60))]),  # person, bottle
    49: (64, 88, [(17, rect_polygon(10, 10, 50, 56))]),  # cat
    61: (88, 64, [(18, rect_polygon(6, 30, 58, 84)), (3, rect_polygon(0, 0, 64, 20))]),  # dog, car
    77: (64, 64, []),  # no annotation: prepare leaves it out of the lists
}
COCO_TREE_VAL_OBJECTS = {
    139: (72, 72, [(1, rect_polygon(10, 10, 50, 70))]),  # person
    285: (64, 96, [(18, rect_polygon(30, 8, 90, 60))]),  # dog
    632: (80, 80, [(62, rect_polygon(10, 20, 40, 70)), (44, rect_polygon(50, 30, 70, 76))]),  # chair, bottle
}


@dataclass(frozen=True)
class COCOTree:
    root: Path
    train: list[str]  # the ids prepare lists (images with an annotation)
    val: list[str]
    labels: dict[str, list[int]]  # id -> its classes 1..80 (fsae's contiguous numbering), sorted


def coco_id(split: str, number: int) -> str:
    return f"COCO_{split}_{number:012d}"


def _coco_split(root: Path, split: str, objects: dict, first_ann: int) -> dict[str, list[int]]:
    """Write one split's images, saliency maps (train only) and instances JSON; return id -> labels."""
    images, anns, labels = [], [], {}
    contiguous = {c: i + 1 for i, c in enumerate(COCO_CATEGORY_IDS)}
    for seed, (number, (h, w, polys)) in enumerate(sorted(objects.items())):
        image_id = coco_id(split, number)
        images.append({"id": number, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        shape = np.zeros((h, w), np.uint8)
        for category, poly in polys:
            anns.append({"id": first_ann + len(anns), "image_id": number, "category_id": category, "iscrowd": 0,
                         "segmentation": [poly], "area": 1.0, "bbox": [0, 0, 1, 1]})
            rle = mask_utils.frPyObjects([poly], h, w)
            shape |= mask_utils.decode(mask_utils.merge(rle)).astype(np.uint8)
        image = random_image(h, w, seed + first_ann)
        image[shape > 0] = (image[shape > 0] // 4 + 160).astype(np.uint8)
        write_image(root / split / f"{image_id}.jpg", image)
        if split == "train2014":
            write_grey_png(root / "SALImages" / f"{image_id}.png", shape * 255)
        if polys:
            labels[image_id] = sorted({contiguous[c] for c, _ in polys})
    categories = [{"id": c, "name": n, "supercategory": "x"} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return labels


def make_coco_tree(tmp_path: Path, prepare: bool = False) -> COCOTree:
    """The COCO 2014 download layout below ``tmp_path / "coco"`` (module docstring); ``prepare``: also run
    ``fsae data prepare coco`` on it (one process)."""
    root = tmp_path / "coco"
    labels = _coco_split(root, "train2014", COCO_TREE_TRAIN_OBJECTS, 1000)
    val_labels = _coco_split(root, "val2014", COCO_TREE_VAL_OBJECTS, 2000)
    if prepare:
        from fsae.data.prepare import prepare_coco

        prepare_coco(root, workers=1, progress=False)
    return COCOTree(root, sorted(labels), sorted(val_labels), {**labels, **val_labels})
