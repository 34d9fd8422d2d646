"""Real data set layouts: VOC + SBD -> train_aug, COCO 2014 -> class masks, and the data check.

Tiny trees in the real on-disk formats (JPEG images, VOC palette PNGs, SBD ``GTcls`` .mat structs,
COCO instances JSON with polygon, RLE and crowd annotations); expectations are written by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsae.data.check import Problem, check_dataset, format_disagreements, format_problems, label_disagreements
from fsae.data.coco import COCO_CLASSES, COCODataset, category_mapping
from fsae.data.prepare import prepare_coco, prepare_voc, train_aug_ids
from fsae.data.voc import VOCDataset, xml_image_labels
from fsae.errors import DataError
from fsae.io import write_grey_png, write_mask
from tests.trees import (  # the small hand-made trees and their writers (shared with other tests)
    EXPECTED_VOC_LABELS,
    SBD_MASKS,
    TRAIN_AUG,
    VOC_MASKS,
    VOC_TRAIN,
    VOC_VAL,
    box,
    draw,
    make_coco,
    make_voc,
    random_image,
)

# pycocotools' decode under numpy 2 (a dependency's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ------------------------------------------------------------------------------------ VOC + SBD tree


@pytest.fixture
def voc(tmp_path):
    root, sbd = make_voc(tmp_path)
    prepare_voc(root, sbd, workers=1, progress=False)
    return root


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im).copy()


def test_train_aug_ids_is_voc_train_and_sbd_minus_voc_val():
    ids = train_aug_ids(
        voc_train=["a", "b"], voc_val=["c", "d"], sbd_train=["b", "c", "e"], sbd_val=["d", "f", "e"]
    )
    assert ids == ["a", "b", "e", "f"]


def test_prepare_voc_builds_train_aug_masks_and_labels(tmp_path):
    root, sbd = make_voc(tmp_path)
    report = prepare_voc(root, sbd, workers=2, progress=False)

    split_dir = root / "ImageSets" / "Segmentation"
    assert (split_dir / "train_aug.txt").read_text().split() == TRAIN_AUG
    assert report.written == 8 and report.skipped == 0 and report.warnings == []
    aug = root / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(EXPECTED_VOC_LABELS)
    # SBD-only ids: the .mat's Segmentation array, as a palette PNG, no 255.
    for image_id in ("2008_000100", "2008_000200", "2009_000001"):
        h, w, rects = SBD_MASKS[image_id]
        np.testing.assert_array_equal(read_png(aug / f"{image_id}.png"), draw(h, w, rects))
    # VOC ids (also in SBD for 2007_000039): VOC's own mask with its 255 boundary.
    for image_id in ("2007_000039", "2007_000032", "2007_000042"):
        h, w, rects = VOC_MASKS[image_id]
        got = read_png(aug / f"{image_id}.png")
        np.testing.assert_array_equal(got, draw(h, w, rects, boundary=True))
        assert (got == 255).any()
    assert json.loads((root / "cls_labels.json").read_text()) == EXPECTED_VOC_LABELS

    sample = VOCDataset(root, "train_aug", mask_dir="SegmentationClassAug")[3]
    assert sample["id"] == "2008_000100"
    expected = np.zeros(20, np.float32)
    expected[[11, 12]] = 1  # dog (12) and horse (13)
    np.testing.assert_array_equal(sample["label"], expected)
    assert sample["image"].shape == (10, 14, 3) and sample["mask"].shape == (10, 14)


def test_prepare_voc_second_run_writes_nothing_and_resumes(tmp_path):
    root, sbd = make_voc(tmp_path)
    prepare_voc(root, sbd, workers=1, progress=False)
    before = snapshot(root)
    again = prepare_voc(root, sbd, workers=1, progress=False)
    assert again.written == 0 and again.skipped == 8 and again.files_updated == []
    assert snapshot(root) == before

    (root / "SegmentationClassAug" / "2008_000200.png").unlink()  # an interrupted run
    resumed = prepare_voc(root, sbd, workers=1, progress=False)
    assert resumed.written == 1 and resumed.files_updated == []
    after = snapshot(root)
    assert {p: b for p, (_, b) in after.items()} == {p: b for p, (_, b) in before.items()}


def test_prepare_voc_without_sbd_uses_voc_train_and_warns(tmp_path):
    root, _ = make_voc(tmp_path)
    report = prepare_voc(root, workers=1, progress=False)
    assert (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == VOC_TRAIN
    assert len(report.warnings) == 1 and "SBD" in report.warnings[0]
    labels = json.loads((root / "cls_labels.json").read_text())
    assert labels == {i: EXPECTED_VOC_LABELS[i] for i in VOC_TRAIN + VOC_VAL}


def test_prepare_voc_names_a_corrupt_or_missing_mat_file(tmp_path):
    root, sbd = make_voc(tmp_path)
    bad = sbd / "cls" / "2008_000200.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file garbage" * 3)
    with pytest.raises(DataError, match="2008_000200.mat"):
        prepare_voc(root, sbd, workers=1, progress=False)
    bad.unlink()
    with pytest.raises(DataError, match="2008_000200.mat"):
        prepare_voc(root, sbd, workers=1, progress=False)


def test_prepare_voc_names_a_missing_list(tmp_path):
    root, sbd = make_voc(tmp_path)
    (sbd / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val\.txt"):
        prepare_voc(root, sbd, workers=1, progress=False)


# ------------------------------------------------------------------------------------------ COCO tree




def expected_coco_train_mask(crowd_value: int) -> np.ndarray:
    mask = np.zeros((20, 24), np.uint8)
    mask[3:15, 2:12] = 1  # person
    mask[10:18, 8:20] = 17  # dog
    mask[0:6, 14:24] = crowd_value  # car crowd
    mask[2:4, 20:24] = 1  # person
    return mask


def test_category_mapping_is_sorted_category_ids():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": [], "annotations": [], "categories": [{"id": c} for c in (90, 1, 18, 3, 67)]}
    coco.cats = {c["id"]: c for c in coco.dataset["categories"]}
    assert category_mapping(coco) == {1: 1, 3: 2, 18: 3, 67: 4, 90: 5}


@pytest.mark.parametrize(
    "crowd, crowd_value, train_labels, train_ids",
    [
        ("class", 3, {"COCO_train2014_000000000009": [1, 3, 17], "COCO_train2014_000000000025": [80]},
         ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]),
        ("ignore", 255, {"COCO_train2014_000000000009": [1, 17]}, ["COCO_train2014_000000000009"]),
    ],
)
def test_prepare_coco_masks_labels_and_lists(tmp_path, crowd, crowd_value, train_labels, train_ids):
    root = make_coco(tmp_path)
    report = prepare_coco(root, workers=2, crowd=crowd, progress=False)

    masks = root / "SegmentationClass"
    person_dog_car = read_png(masks / "train2014" / "COCO_train2014_000000000009.png")
    np.testing.assert_array_equal(person_dog_car, expected_coco_train_mask(crowd_value))
    toothbrush = masks / "train2014" / "COCO_train2014_000000000025.png"
    if crowd == "class":
        np.testing.assert_array_equal(read_png(toothbrush), box((10, 12), 2, 8, 3, 9) * 80)
    else:
        assert not toothbrush.exists()
    assert not (masks / "train2014" / "COCO_train2014_000000000030.png").exists()  # no annotation
    table = box((16, 16), 1, 5, 1, 5) + box((16, 16), 8, 12, 8, 14)
    np.testing.assert_array_equal(read_png(masks / "val2014" / "COCO_val2014_000000000042.png"), table * 61)

    assert (root / "ImageSets" / "train.txt").read_text().split() == train_ids
    assert (root / "ImageSets" / "val.txt").read_text().split() == ["COCO_val2014_000000000042"]
    labels = json.loads((root / "cls_labels.json").read_text())
    assert labels == {**train_labels, "COCO_val2014_000000000042": [61]}
    assert report.written == len(train_ids) + 1

    sample = COCODataset(root, "train2014")[0]
    assert sample["id"] == "COCO_train2014_000000000009"
    assert sample["image"].shape == (20, 24, 3) and sample["label"].shape == (80,)
    assert np.flatnonzero(sample["label"]).tolist() == [c - 1 for c in train_labels[sample["id"]]]
    np.testing.assert_array_equal(sample["mask"], expected_coco_train_mask(crowd_value))
    assert COCO_CLASSES[17 - 1] == "dog" and COCO_CLASSES[61 - 1] == "dining table"
    assert check_dataset("coco", root) == []


def test_prepare_coco_second_run_writes_nothing_and_keeps_its_crowd_option(tmp_path):
    root = make_coco(tmp_path)
    prepare_coco(root, workers=1, progress=False)
    before = snapshot(root)
    again = prepare_coco(root, workers=1, progress=False)
    assert again.written == 0 and again.skipped == 3 and again.files_updated == []
    assert snapshot(root) == before
    with pytest.raises(DataError, match="crowd='class'"):
        prepare_coco(root, workers=1, crowd="ignore", progress=False)


def test_prepare_coco_names_a_missing_annotation_file(tmp_path):
    root = make_coco(tmp_path)
    (root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances_val2014.json"):
        prepare_coco(root, workers=1, progress=False)


def test_coco_dataset_names_a_corrupt_image(tmp_path):
    root = make_coco(tmp_path)
    prepare_coco(root, workers=1, progress=False)
    bad = root / "val2014" / "COCO_val2014_000000000042.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DataError, match="COCO_val2014_000000000042.jpg"):
        COCODataset(root, "val2014")[0]


# ---------------------------------------------------------------------------------------- the check


def test_check_passes_a_prepared_voc_tree(voc):
    assert check_dataset("voc", voc) == []
    assert check_dataset("voc", voc, fast=True) == []
    assert check_dataset("voc", voc, split="train_aug", workers=2) == []
    assert format_problems([]) == "no problems found"


def test_check_strict_counts_expects_the_real_sizes(voc):
    problems = check_dataset("voc", voc, fast=True, strict_counts=True)
    assert [str(p) for p in problems] == [
        f"{voc}/ImageSets/Segmentation/train.txt: expected 1464 ids, found 3",
        f"{voc}/ImageSets/Segmentation/train_aug.txt: expected 10582 ids, found 6",
        f"{voc}/ImageSets/Segmentation/val.txt: expected 1449 ids, found 2",
    ]


def _missing_image(root):
    path = root / "JPEGImages" / "2008_000200.jpg"
    path.unlink()
    return path


def _corrupt_jpeg(root):
    path = root / "JPEGImages" / "2007_000032.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _truncated_jpeg(root):
    path = root / "JPEGImages" / "2007_000032.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return path


def _truncated_png(root):
    path = root / "SegmentationClass" / "2007_000033.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def _value_37(root):
    path = root / "SegmentationClassAug" / "2008_000100.png"
    mask = read_png(path)
    mask[0, 0] = 37
    write_mask(path, mask)
    return path


def _wrong_size(root):
    path = root / "SegmentationClass" / "2007_000042.png"
    write_mask(path, draw(15, 16, VOC_MASKS["2007_000042"][2], boundary=True))
    return path


def _set_label(value):
    """A damage that rewrites image 2008_000002's entry in cls_labels.json."""

    def damage(root):
        path = root / "cls_labels.json"
        labels = json.loads(path.read_text())
        labels["2008_000002"] = value
        path.write_text(json.dumps(labels))
        return path

    return damage


_label_disagrees = _set_label([7, 8])
_multi_hot_label = _set_label([0] * 6 + [1] + [0] * 14)  # a multi-hot vector of length 21
_label_out_of_range = _set_label([7, 21])


def _empty_list(root):
    path = root / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n")
    return path


def _missing_list(root):
    path = root / "ImageSets" / "Segmentation" / "train.txt"
    path.unlink()
    return path


@pytest.mark.parametrize(
    "damage, in_fast_check, words",
    [
        (_missing_image, True, "image file not found"),
        (_corrupt_jpeg, False, "cannot read image"),
        (_truncated_jpeg, False, "cannot read image"),
        (_truncated_png, False, "cannot read mask"),
        (_value_37, False, "[37]"),
        (_wrong_size, False, "mask size 16x15 differs from image size 16x14"),
        (_label_disagrees, False, "'2008_000002' is labelled [7, 8] but its mask"),
        (_empty_list, True, "image list is empty"),
        (_missing_list, True, "image list not found"),
        (_multi_hot_label, True, "multi-hot vector of length 21"),
        (_label_out_of_range, True, "labels [21] are outside 1..20"),
    ],
)
def test_check_names_the_damaged_file(voc, damage, in_fast_check, words):
    path = damage(voc)
    problems = check_dataset("voc", voc)
    assert problems, "the damage went unnoticed"
    assert all(isinstance(p, Problem) for p in problems)
    assert any(p.path == str(path) and words in p.message for p in problems), format_problems(problems)
    fast = check_dataset("voc", voc, fast=True)
    assert any(p.path == str(path) for p in fast) == in_fast_check, format_problems(fast)
    text = format_problems(problems)
    assert str(path) in text and text.splitlines()[-1].startswith(f"{len(problems)} problem(s)")


def test_check_saliency_maps(voc):
    sal = voc / "SALImages"  # PFAN maps as EPS distributes them: greyscale PNGs, train_aug ids
    sal.mkdir()
    for image_id in TRAIN_AUG:
        h, w = {**SBD_MASKS, **VOC_MASKS}[image_id][:2]
        write_grey_png(sal / f"{image_id}.png", random_image(h, w, 0)[..., 0])
    assert check_dataset("saliency", voc) == []
    assert check_dataset("voc", voc, saliency=sal) == []
    sample = VOCDataset(voc, "train_aug", saliency_dir=sal)[0]
    assert sample["saliency"].shape == sample["image"].shape[:2]

    (sal / "2008_000100.png").unlink()
    write_grey_png(sal / "2008_000200.png", np.zeros((5, 5), np.uint8))
    problems = check_dataset("saliency", voc)
    assert [(Path(p.path).name, p.message.split(" of ")[0]) for p in problems] == [
        ("2008_000100.png", "saliency map file not found"),
        ("2008_000200.png", "saliency map size 5x5 differs from image size 12x12"),
    ]
    assert [Path(p.path).name for p in check_dataset("saliency", voc, fast=True)] == ["2008_000100.png"]
    missing = check_dataset("saliency", voc, saliency=voc / "nowhere")
    assert [str(p) for p in missing] == [f"{voc}/nowhere: saliency folder not found"]


def test_check_coco_names_damaged_files(tmp_path):
    root = make_coco(tmp_path)
    prepare_coco(root, workers=1, progress=False)
    mask_path = root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png"
    mask = read_png(mask_path)
    mask[0, 0] = 81
    write_mask(mask_path, mask)
    labels_path = root / "cls_labels.json"
    labels = json.loads(labels_path.read_text())
    labels["COCO_val2014_000000000042"] = [61, 62]  # a label the mask lacks: allowed for COCO
    labels["COCO_train2014_000000000025"] = []  # a mask class the labels lack: not allowed
    labels_path.write_text(json.dumps(labels))
    problems = check_dataset("coco", root)
    assert [Path(p.path).name for p in problems] == ["COCO_train2014_000000000009.png", "cls_labels.json"]
    assert problems[0].message == "mask values [81] are outside 0..80 and 255 (ignore): out of range for 80 classes"
    assert problems[1].message.startswith("image 'COCO_train2014_000000000025' is labelled [] but its mask")
    assert check_dataset("coco", root, split="val2014", strict_counts=True, fast=True) == [
        Problem(str(root / "ImageSets" / "val.txt"), "expected 40137 ids, found 1")
    ]


def test_check_reports_a_missing_folder_or_label_file_once(voc):
    shutil.rmtree(voc / "SegmentationClassAug")
    (voc / "cls_labels.json").unlink()
    problems = check_dataset("voc", voc)
    assert [str(p) for p in problems] == [
        f"{voc}/SegmentationClassAug: folder not found; run `fsae data prepare voc`",
        f"{voc}/cls_labels.json: file not found; run `fsae data prepare voc`",
    ]
    with pytest.raises(DataError, match="unknown data set kind 'ade'"):
        check_dataset("ade", voc)


# ------------------------------------------------------------------- image-level labels from the XML


def voc_xml(image_id: str, objects: list[tuple[str, int, list[str]]]) -> str:
    """A VOC2012 ``Annotations/<id>.xml`` as the data set writes it: (name, difficult, part names) per object."""
    body = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        f"<ymax>5</ymax></bndbox>\n"
        + "".join(f"\t\t<part>\n\t\t\t<name>{part}</name>\n\t\t\t<bndbox><xmin>1</xmin><ymin>1</ymin>"
                  f"<xmax>2</xmax><ymax>2</ymax></bndbox>\n\t\t</part>\n" for part in parts)
        + "\t</object>\n"
        for name, difficult, parts in objects)
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t\t<annotation>PASCAL VOC2007"
            f"</annotation>\n\t\t<image>flickr</image>\n\t</source>\n\t<size>\n\t\t<width>20</width>\n"
            f"\t\t<height>16</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>1</segmented>\n"
            f"{body}</annotation>\n")


# id -> objects; labels by hand (VOC class numbers: aeroplane 1, bicycle 2, chair 9, dog 12, horse 13,
# person 15, train 19, tvmonitor 20). IRN counts every <name> that is a class, difficult ones too
# (irn voc12/dataloader.py:33-41); part names are not classes.
VOC_XML = {
    "2007_000032": [("aeroplane", 0, []), ("person", 0, ["head", "hand"])],  # [1, 15]: as the label file
    "2007_000039": [("tvmonitor", 0, []), ("chair", 1, [])],                 # [9, 20]: a difficult chair
    "2008_000100": [("dog", 0, []), ("dog", 0, [])],                         # [12]: the file has [12, 13]
    "2007_000042": [("\n\t\tbicycle ", 0, []), ("train", 0, [])],           # [2, 19]: whitespace stripped
}  # 2008_000002 and the others: no XML, not compared


def write_voc_xml(root: Path) -> None:
    for image_id, objects in VOC_XML.items():
        path = root / "Annotations" / f"{image_id}.xml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(voc_xml(image_id, objects))


def test_xml_image_labels_count_difficult_objects_and_skip_parts(tmp_path):
    write_voc_xml(tmp_path)
    got = {i: xml_image_labels(tmp_path / "Annotations" / f"{i}.xml") for i in VOC_XML}
    assert got == {"2007_000032": [1, 15], "2007_000039": [9, 20], "2008_000100": [12], "2007_000042": [2, 19]}
    (tmp_path / "broken.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(DataError, match=r"broken.xml: not a readable VOC annotation file"):
        xml_image_labels(tmp_path / "broken.xml")


def test_check_reports_ids_whose_xml_labels_differ(voc, capsys):
    from fsae.cli import main

    write_voc_xml(voc)
    found = label_disagreements(voc)
    assert [(d.image_id, d.xml_labels, d.file_labels) for d in found] == [
        ("2007_000039", (9, 20), (20,)), ("2008_000100", (12,), (12, 13))]
    assert label_disagreements(voc, split="train") == found[:1]  # 2008_000100 is in train_aug only
    labels = voc / "cls_labels.json"
    lines = [f"{voc}/Annotations/2007_000039.xml: image '2007_000039': the XML names [9 chair, 20 tvmonitor], "
             f"{labels} has [20 tvmonitor]",
             f"{voc}/Annotations/2008_000100.xml: image '2008_000100': the XML names [12 dog], "
             f"{labels} has [12 dog, 13 horse]"]
    assert format_disagreements(found).splitlines() == lines + [
        "2 image(s) whose labels differ from their annotation XML (IRN's labels; fsae's come from the masks)"]
    assert check_dataset("voc", voc) == []  # a report, not a problem: the data set is still usable
    capsys.readouterr()
    assert main(["data", "check", "voc", "--root", str(voc)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "no problems found" and out[1:3] == lines
    # Issue 32: a malformed XML and an object of no VOC class are problems, counted; never "no problems found"
    # before an error.
    (voc / "Annotations" / "2007_000032.xml").write_text("<annotation>")
    (voc / "Annotations" / "2007_000033.xml").write_text(
        "<annotation><object><name>aeroplane</name></object><object><name>aeroplanes</name></object></annotation>")
    assert main(["data", "check", "voc", "--root", str(voc)]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[:3] == [f"{voc}/Annotations/2007_000032.xml: not a readable VOC annotation file (no element found: "
                       f"line 1, column 12)",
                       f"{voc}/Annotations/2007_000033.xml: object name(s) ['aeroplanes'] are no VOC class (IRN's "
                       f"labels drop them)",
                       "2 problem(s) in 2 file(s)"]
    assert "no problems found" not in captured.out and captured.err == ""
