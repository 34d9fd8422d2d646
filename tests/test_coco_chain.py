"""The COCO chain on the fake COCO tree of test_data_real: fsae train (CAM) -> fsae cam -> fsae crf ->
fsae seg train, with the pseudo-masks where COCO segmentation training reads them (<masks>/train2014/)."""

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_data_real import make_coco  # noqa: E402  (a helper only: importing test_* names would re-collect them)

from fsae.cli import main  # noqa: E402
from fsae.data.coco import COCODataset, ids_by_split, single_split, split_of  # noqa: E402
from fsae.data.prepare import prepare_coco  # noqa: E402
from fsae.errors import DataError  # noqa: E402
from fsae.grid import GridSpec, parse_vary, plan_grid, run_job  # noqa: E402
from fsae.io import read_id_list, read_image, read_json, read_mask  # noqa: E402
from fsae.refine.crf import refine_seed  # noqa: E402
from fsae.seeds import load_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# CPU-sized overrides of the shipped recipes: a width-8 tinycnn, no pretrained file, 16 px crops.
CAM_OVERRIDES = ["model.backbone=tinycnn", "model.cam.freeze_bn=false", "model.cam.freeze_low_stages=false",
                 "model.weights=null", "model.width=8", "model.output_stride=8",
                 "data.long_side=null", "data.crop_size=16", "train.epochs=1", "train.batch_size=2",
                 "train.device=cpu", "data.workers=0", "infer.scales=[1.0]"]
SEG_OVERRIDES = ["model.backbone=tinycnn", "model.weights=null", "model.width=8", "model.freeze_bn=false",
                 "model.aspp_rates=[1,2,3,4]", "data.crop_size=16", "train.iterations=3", "train.batch_size=2",
                 "train.device=cpu", "data.workers=0", "train.checkpoint_every=3", "train.log_every=1"]


def sets(root, overrides):
    return [arg for value in [f"data.root={root}", *overrides] for arg in ("--set", value)]


@pytest.fixture(scope="module")
def coco_chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco_chain")
    root = make_coco(tmp)
    prepare_coco(root, workers=1, progress=False)
    run = tmp / "cam_run"
    assert main(["train", str(REPO / "configs/coco/cam.yaml"), "--out", str(run), *sets(root, CAM_OVERRIDES)]) == 0
    assert main(["cam", str(run)]) == 0
    assert main(["crf", str(run), "--threshold", "0.3", "--workers", "1"]) == 0
    return root, run, tmp


def test_crf_finds_coco_images_and_writes_the_split_folder(coco_chain):
    root, run, _ = coco_chain
    ids = read_id_list(root / "ImageSets/train.txt")
    assert len(ids) >= 2
    assert sorted(p.stem for p in (run / "crf" / "train2014").glob("*.png")) == sorted(ids)
    assert not list((run / "crf").glob("*.png"))  # nothing flat: COCO reads <mask_dir>/<split>/
    for image_id in ids:
        image = read_image(root / "train2014" / f"{image_id}.jpg")
        keys, cams = load_seed(run / "seeds" / f"{image_id}.npz")
        mask = read_mask(run / "crf" / "train2014" / f"{image_id}.png")
        assert mask.shape == image.shape[:2]
        # The CRF ran on this image (its own train2014/ file), not on another one of the same size.
        np.testing.assert_array_equal(mask, refine_seed(image, keys, cams, 0.3))
        assert set(np.unique(mask)) <= {0, *keys.tolist()}


def test_seg_train_reads_the_crf_masks(coco_chain):
    root, run, tmp = coco_chain
    dataset = COCODataset(root, "train2014", mask_dir=str(run / "crf"))
    for index, image_id in enumerate(dataset.ids):
        np.testing.assert_array_equal(dataset[index]["mask"],
                                      read_mask(run / "crf" / "train2014" / f"{image_id}.png"))
    seg = tmp / "seg_run"
    # The command documented in configs/coco/deeplabv2_r101.yaml, run as written plus CPU-sized overrides.
    recipe = (REPO / "configs/coco/deeplabv2_r101.yaml").read_text()
    command = re.search(r"^# Train: `fsae (seg train [^`]+)`$", recipe, re.M).group(1)
    argv = command.replace("runs/<cam run>", str(run)).split()
    argv[2] = str(REPO / argv[2])
    assert main([*argv, "--out", str(seg), *sets(root, SEG_OVERRIDES)]) == 0
    assert (seg / "checkpoints" / "last.pt").is_file()


def test_split_of_reads_the_name_then_the_folders(tmp_path):
    root = make_coco(tmp_path)
    assert split_of(root, "COCO_val2014_000000000042") == "val2014"
    (root / "val2014" / "COCO_val2014_000000000042.jpg").rename(root / "val2014" / "000042.jpg")
    assert split_of(root, "000042") == "val2014"  # no split in the name: the folder holding it
    assert ids_by_split(root, ["COCO_train2014_000000000025", "000042", "COCO_train2014_000000000009"]) == {
        "train2014": ["COCO_train2014_000000000025", "COCO_train2014_000000000009"], "val2014": ["000042"]}
    with pytest.raises(DataError, match="no image 000099.jpg in train2014/ or val2014/"):
        split_of(root, "000099")


# SIPE at CPU size: a narrow resnet18 (the tests' tiny SIPE, tests/test_sipe.py), no pretrained file, 32 px crops.
SIPE_OVERRIDES = ["model.backbone=resnet18", "model.weights=null", "model.sipe.channels=[8,16,16,32]",
                  "model.sipe.side_channels=[4,4,8,8]", "model.sipe.freeze_bn=false",
                  "model.sipe.freeze_low_stages=false", "data.long_side=null", "data.crop_size=32",
                  "train.epochs=1", "train.batch_size=2", "train.device=cpu", "data.workers=0",
                  "infer.scales=[1.0]", "fsae.start_epoch=0"]


@pytest.mark.parametrize("recipe", ["coco/sipe.yaml", "coco/sipe_fsae.yaml"])
def test_sipe_coco_recipes_train_and_infer_on_the_fake_tree(recipe, tmp_path):
    root = make_coco(tmp_path)
    prepare_coco(root, workers=1, progress=False)
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs" / recipe), "--out", str(run), *sets(root, SIPE_OVERRIDES)]) == 0
    assert main(["cam", str(run)]) == 0
    ids = read_id_list(root / "ImageSets/train.txt")
    assert sorted(p.stem for p in (run / "seeds").glob("*.npz")) == sorted(ids)  # infer.split train2014
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["gsc"]) >= 0 for r in rows)  # SIPE's GSC term was trained
    assert all((r["fsae"] != "") == recipe.endswith("_fsae.yaml") for r in rows)  # FSAE's term: +FSAE only


IRN_OVERRIDES = ["train.epochs=1", "train.batch_size=2", "train.crop_size=16", "net.branch_width=8",
                 "ir_label.workers=1"]


def test_irn_reads_the_split_folder_and_writes_the_masks_coco_training_reads(coco_chain):
    root, run, _ = coco_chain
    sets_irn = [arg for value in IRN_OVERRIDES for arg in ("--set", value)]
    assert main(["irn", str(run), "--config", str(REPO / "configs/synthetic/irn.yaml"), *sets_irn]) == 0
    ids = read_id_list(root / "ImageSets/train.txt")
    assert sorted(p.stem for p in (run / "irn_masks" / "train2014").glob("*.png")) == sorted(ids)
    assert not list((run / "irn_masks").glob("*.png"))  # nothing flat: COCO reads <mask_dir>/<split>/
    dataset = COCODataset(root, "train2014", mask_dir=str(run / "irn_masks"))
    for index, image_id in enumerate(dataset.ids):
        # each mask has its own image's size: the walk read that image from train2014/
        assert dataset[index]["mask"].shape == read_image(root / "train2014" / f"{image_id}.jpg").shape[:2]


def test_a_random_walk_over_both_splits_is_refused(coco_chain, capsys):
    root, run, tmp = coco_chain
    both = tmp / "both.txt"
    both.write_text("COCO_train2014_000000000009\nCOCO_val2014_000000000042\n")
    with pytest.raises(DataError, match=r"images are in train2014 \(1\), val2014 \(1\); IRN and PSA train on one"):
        single_split(root, read_id_list(both))
    assert main(["irn", str(run), "--ids", str(both)]) == 2
    assert "pass --ids with one split's ids" in capsys.readouterr().err


def test_grid_crf_masks_go_to_the_split_folder(coco_chain):
    root, run, tmp = coco_chain
    spec = GridSpec(str(REPO / "configs/coco/cam.yaml"), [parse_vary("fsae.enabled=false")], [0], tmp / "grid",
                    masks="crf", overrides=[f"data.root={root}", *CAM_OVERRIDES])
    (job,) = plan_grid(spec)
    run_job(job, spec)
    ids = read_id_list(root / "ImageSets/train.txt")
    assert sorted(p.stem for p in (job.run_dir / "crf" / "train2014").glob("*.png")) == sorted(ids)
    assert not list((job.run_dir / "crf").glob("*.png"))
    scored = read_json(job.run_dir / "eval" / "crf.json")
    assert scored["count"] == len(ids) and scored["scored"]["dir"].endswith("crf/train2014")


def test_report_scores_and_shows_the_split_folder_masks(coco_chain):
    root, run, _ = coco_chain
    assert main(["report", str(run)]) == 0
    scored = read_json(run / "eval" / "crf.json")
    assert scored["count"] == len(read_id_list(root / "ImageSets/train.txt"))
    assert scored["scored"]["dir"].endswith("crf/train2014")
    assert 'alt="image / CAM / seed (t=0.15) / pseudo-mask (CRF) / GT"' in (run / "report.html").read_text()


def test_eval_masks_of_a_coco_run_scores_its_split_folder(coco_chain, tmp_path, capsys):
    """`fsae eval --masks RUN/crf` on a COCO run scores crf/train2014/, where `fsae crf` wrote the masks and
    `fsae seg train` reads them (the flat folder holds none)."""
    from fsae.evaluate import evaluate_masks

    root, run, _ = coco_chain
    gt = root / "SegmentationClass" / "train2014"
    ids = read_id_list(root / "ImageSets/train.txt")
    assert main(["eval", "--masks", str(run / "crf"), "--gt", str(gt), "--num-classes", "80",
                 "--out", str(tmp_path / "crf.json")]) == 0
    assert f"scored: {run / 'crf' / 'train2014'}" in capsys.readouterr().out
    result = read_json(tmp_path / "crf.json")
    expected = evaluate_masks(run / "crf" / "train2014", gt, ids, 80, progress=False)
    assert result["count"] == len(ids) and result["miou"] == pytest.approx(expected["miou"])


def _sipe_coco_run(tmp_path):
    """A SIPE COCO run directory by hand: the recipe's config.yaml and one seed whose four vertical stripes
    have CAM 0 / 0.05 / 0.3 / 0.9 under a constant IS-CAM background of 0.4, on an image of four grey stripes."""
    import yaml

    from fsae.config import load_config
    from fsae.seeds import save_seed

    root = make_coco(tmp_path)
    image_id = read_id_list(root / "ImageSets/train.txt")[0] if (root / "ImageSets/train.txt").is_file() else None
    if image_id is None:
        prepare_coco(root, workers=1, progress=False)
        image_id = read_id_list(root / "ImageSets/train.txt")[0]
    from PIL import Image

    h, w = 48, 128  # the image replaced: four grey stripes, each as wide as the CRF's bilateral reach
    edges = [round(k * w / 4) for k in range(5)]
    image = np.zeros((h, w, 3), np.uint8)
    for k, grey in enumerate((30, 90, 150, 210)):
        image[:, edges[k]:edges[k + 1]] = grey
    Image.fromarray(image).save(root / "train2014" / f"{image_id}.jpg", quality=95)
    run = tmp_path / "sipe_run"
    run.mkdir()
    cfg = load_config(REPO / "configs/coco/sipe.yaml", [f"data.root={root}"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cams = np.zeros((1, h, w), np.float32)
    for k, value in enumerate((0.0, 0.05, 0.3, 0.9)):
        cams[0, :, edges[k]:edges[k + 1]] = value
    save_seed(run / "seeds" / f"{image_id}.npz", np.array([3]), cams, background=np.full((h, w), 0.4, np.float32))
    return run, image_id, edges, h


def test_sipe_coco_crf_makes_its_cam2ir_labels_not_a_zero_threshold(tmp_path, capsys):
    """SIPE's COCO pseudo-masks (SIPE cam2ir.py:26-42): confident foreground = argmax over [background, cams],
    confident background = argmax over [0.5 * background, cams], a class where the first says foreground, 0 where
    both say background, 255 (ignore) between. With background 0.4: CAM 0 and 0.05 lose to 0.4 and 0.2 -> 0;
    0.3 loses to 0.4, beats 0.2 -> 255; 0.9 beats both -> class 3. A 0.0 threshold made them bg / fg / fg / fg."""
    run, image_id, edges, h = _sipe_coco_run(tmp_path)
    assert main(["crf", str(run), "--workers", "1"]) == 0
    assert "cam2ir" in capsys.readouterr().out
    mask = read_mask(run / "crf" / "train2014" / f"{image_id}.png")
    centres = [mask[h // 2, (edges[k] + edges[k + 1]) // 2] for k in range(4)]
    assert centres == [0, 0, 255, 3]
