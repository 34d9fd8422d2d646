"""The real-data recipes (configs/voc/cam.yaml, configs/coco/cam.yaml) and `fsae data prepare|check`.

The fake VOCdevkit + SBD and COCO 2014 trees come from ``test_data_real`` (same folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_data_real import (  # noqa: E402  (helpers only: importing test_* names would re-collect them)
    EXPECTED_VOC_LABELS,
    SBD_MASKS,
    TRAIN_AUG,
    VOC_MASKS,
    VOC_TRAIN,
    VOC_VAL,
    expected_coco_train_mask,
    make_coco,
    make_voc,
)

from fsae.cli import main  # noqa: E402
from fsae.config import load_config  # noqa: E402
from fsae.data import build_dataset  # noqa: E402

# pycocotools' decode under numpy 2 (a dependency's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOC_CAM = CONFIGS / "voc" / "cam.yaml"
COCO_CAM = CONFIGS / "coco" / "cam.yaml"

COCO_TRAIN_LABELS = {"COCO_train2014_000000000009": [1, 3, 17], "COCO_train2014_000000000025": [80]}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# ---------------------------------------------------------------------------------------- recipes

COMMON = {
    "model.method": "cam",
    "model.backbone": "resnet50_irn",
    "model.output_stride": 16,
    "model.weights": "imagenet",
    "model.background_logit": 5.0,
    "optim.name": "sgd",
    "optim.lr": 0.1,
    "optim.weight_decay": 1e-4,
    "optim.momentum": 1e-4,  # IRN misc/torchutils.py:12 SGD(params, lr, weight_decay): the decay in the momentum slot
    "optim.poly_power": 0.9,
    "optim.new_layer_lr_mult": 10.0,
    "train.batch_size": 16,
    "train.epochs": 5,
    "data.crop_size": 512,
    "data.long_side": [320, 640],
    "infer.scales": [1.0, 0.5, 1.5, 2.0],
    "infer.flip": True,
    "fsae.enabled": False,
}
RECIPES = {
    VOC_CAM: {
        **COMMON,
        "name": "voc_cam",
        "data.kind": "voc",
        "data.root": "data/VOCdevkit/VOC2012",
        "data.num_classes": 20,
        "data.train_split": "train_aug",
        "data.val_split": "val",
        "data.mask_dir": "SegmentationClassAug",
        "infer.split": "train",
    },
    COCO_CAM: {
        **COMMON,
        "name": "coco_cam",
        "data.kind": "coco",
        "data.root": "data/COCO",
        "data.num_classes": 80,
        "data.train_split": "train2014",
        "data.val_split": "val2014",
        "data.mask_dir": "SegmentationClass",  # COCODataset appends /<split>
        "infer.split": "train2014",
    },
}


@pytest.mark.parametrize(
    "path, key, expected",
    [(path, key, value) for path, table in RECIPES.items() for key, value in table.items()],
    ids=lambda v: v.parent.name if isinstance(v, Path) else None,
)
def test_recipe_field(path, key, expected):
    value = _get(load_config(path), key)
    assert value == expected and type(value) is type(expected), f"{path.name}: {key} = {value!r}"


# -------------------------------------------------------------------------------------------- VOC


def test_cli_prepare_and_check_voc(tmp_path, capsys):
    root, sbd = make_voc(tmp_path)
    assert main(["data", "prepare", "voc", "--root", str(root), "--sbd", str(sbd), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 8 mask(s) written, 0 already there" in out
    assert f"{root / 'ImageSets' / 'Segmentation' / 'train_aug.txt'}: {len(TRAIN_AUG)} ids" in out
    assert "warning" not in out
    assert (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == TRAIN_AUG

    assert main(["data", "check", "voc", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "no problems found"

    bad = root / "SegmentationClassAug" / "2008_000100.png"
    bad.write_bytes(b"\x89PNG garbage, not a mask" * 4)
    assert main(["data", "check", "voc", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out, out
    assert out.strip().splitlines()[-1].endswith("problem(s) in 1 file(s)")
    assert main(["data", "check", "voc", "--root", str(root), "--split", "train_aug"]) == 1
    assert str(bad) in capsys.readouterr().out
    # The fast check opens no image or mask: a corrupt but present file passes it.
    assert main(["data", "check", "voc", "--root", str(root), "--fast"]) == 0
    capsys.readouterr()


def test_cli_prepare_voc_second_run_writes_nothing(tmp_path, capsys):
    root, sbd = make_voc(tmp_path)
    args = ["data", "prepare", "voc", "--root", str(root), "--sbd", str(sbd), "--workers", "1"]
    assert main(args) == 0
    assert main(args) == 0
    assert f"{root}: 0 mask(s) written, 8 already there" in capsys.readouterr().out


def test_cli_prepare_voc_error_exits_2(tmp_path, capsys):
    root, sbd = make_voc(tmp_path)
    (sbd / "cls" / "2008_000200.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage" * 3)
    assert main(["data", "prepare", "voc", "--root", str(root), "--sbd", str(sbd), "--workers", "1"]) == 2
    assert "2008_000200.mat" in capsys.readouterr().err


def test_voc_recipe_builds_the_prepared_tree(tmp_path):
    root, sbd = make_voc(tmp_path)
    assert main(["data", "prepare", "voc", "--root", str(root), "--sbd", str(sbd), "--workers", "1"]) == 0
    cfg = load_config(VOC_CAM, [f"data.root={root}", "data.train_split=train_aug"])
    sizes = {i: spec[:2] for i, spec in {**SBD_MASKS, **VOC_MASKS}.items()}

    for split, ids in ((cfg.data.train_split, TRAIN_AUG), (cfg.data.val_split, VOC_VAL),
                       (cfg.infer.split, VOC_TRAIN)):
        dataset = build_dataset(cfg.data, split)
        assert dataset.ids == ids
        for sample in dataset:
            image_id = sample["id"]
            expected = np.zeros(20, np.float32)
            expected[[c - 1 for c in EXPECTED_VOC_LABELS[image_id]]] = 1
            assert sample["label"].dtype == np.float32 and sample["label"].shape == (20,)
            np.testing.assert_array_equal(sample["label"], expected)
            assert sample["image"].shape == (*sizes[image_id], 3)
            assert sample["mask"].shape == sizes[image_id]
            shown = sorted(set(np.unique(sample["mask"]).tolist()) - {0, 255})
            assert shown == EXPECTED_VOC_LABELS[image_id]


# ------------------------------------------------------------------------------------------- COCO


def test_cli_prepare_and_check_coco(tmp_path, capsys):
    root = make_coco(tmp_path)
    assert main(["data", "prepare", "coco", "--root", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 3 mask(s) written, 0 already there" in out
    assert f"{root / 'ImageSets' / 'train.txt'}: 2 ids" in out
    assert f"{root / 'ImageSets' / 'val.txt'}: 1 ids" in out

    assert main(["data", "check", "coco", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "no problems found"

    bad = root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000009.png"
    bad.write_bytes(b"\x00\x01garbage" * 16)
    assert main(["data", "check", "coco", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out, out
    assert main(["data", "check", "coco", "--root", str(root), "--split", "val2014"]) == 0
    capsys.readouterr()


def test_coco_recipe_builds_the_prepared_tree(tmp_path):
    root = make_coco(tmp_path)
    assert main(["data", "prepare", "coco", "--root", str(root), "--workers", "1"]) == 0
    cfg = load_config(COCO_CAM, [f"data.root={root}"])

    train = build_dataset(cfg.data, "train2014")
    assert train.ids == sorted(COCO_TRAIN_LABELS)
    for sample in train:
        expected = np.zeros(80, np.float32)
        expected[[c - 1 for c in COCO_TRAIN_LABELS[sample["id"]]]] = 1
        np.testing.assert_array_equal(sample["label"], expected)
        assert sample["mask"].shape == sample["image"].shape[:2]
    np.testing.assert_array_equal(train[0]["mask"], expected_coco_train_mask(3))  # crowd drawn as its class

    assert build_dataset(cfg.data, cfg.infer.split).ids == train.ids
    val = build_dataset(cfg.data, cfg.data.val_split)
    assert val.ids == ["COCO_val2014_000000000042"]
    assert np.flatnonzero(val[0]["label"]).tolist() == [60]  # dining table, class 61
    assert val[0]["mask"].shape == (16, 16)


def test_coco_recipe_honours_label_file_and_mask_dir(tmp_path):
    root = make_coco(tmp_path)
    assert main(["data", "prepare", "coco", "--root", str(root), "--workers", "1"]) == 0
    labels = tmp_path / "other_labels.json"
    labels.write_text('{"COCO_train2014_000000000009": [5], "COCO_train2014_000000000025": [6]}')
    cfg = load_config(COCO_CAM, [f"data.root={root}", f"data.label_file={labels}", "data.mask_dir=null"])
    sample = build_dataset(cfg.data, "train2014")[0]
    assert np.flatnonzero(sample["label"]).tolist() == [4]
    assert "mask" not in sample
