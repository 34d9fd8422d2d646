"""Segmentation stage (DeepLab V1 / V2): ASPP sum, output stride, multi-scale + flip merge, training on
pseudo-masks, resume, the VOC test-server layout on disk, recipe values, errors that name the file."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from fsae.cli import main
from fsae.errors import CheckpointError, DataError
from fsae.io import read_id_list, read_json, read_mask, write_json, write_mask
from fsae.segment.config import SegConfig
from fsae.segment.deeplab import ASPP, build_deeplab, load_pretrained
from fsae.segment.infer import TEST_SERVER_DIR, multiscale_probs
from fsae.segment.train import (IterationBatches, build_seg_optimizer, seg_model_from_checkpoint,
                                train_segmentation)
from fsae.stamps import make_stamp, stamp_path

C = 4  # foreground classes of the generated set


def tiny_config(data_root, mask_dir, **train) -> SegConfig:
    """DeepLab-V2 on a width-8 tinycnn, 48 px crops: milliseconds per iteration. ASPP rates 1-4: the
    6x6 feature map of a 48 px crop has no neighbours at DeepLab's rates 6-24."""
    cfg = SegConfig(name="tiny")
    cfg.data.root, cfg.data.num_classes, cfg.data.mask_dir = str(data_root), C, str(mask_dir)
    cfg.data.crop_size = 48
    cfg.model.backbone, cfg.model.width, cfg.model.weights, cfg.model.freeze_bn = "tinycnn", 8, None, False
    cfg.model.aspp_rates = [1, 2, 3, 4]
    cfg.optim.lr = 0.01
    cfg.train.batch_size, cfg.train.iterations, cfg.train.log_every = 4, 240, 1
    cfg.train.checkpoint_every = 100
    cfg.infer.scales = [0.75, 1.0]
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def eroded(mask: np.ndarray) -> np.ndarray:
    """A CAM-like pseudo-mask: each object shrunk by a 3x3 erosion (its rim becomes background)."""
    m = np.pad(mask, 1, mode="edge")
    same = np.ones_like(mask, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            same &= m[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return np.where(same, mask, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def seg_data(tiny_synthetic, tmp_path_factory):
    """A copy of the tiny set with a 'test' split (val ids, no GT needed) and eroded pseudo-masks."""
    src, _ = tiny_synthetic
    root = tmp_path_factory.mktemp("segdata") / "data"
    shutil.copytree(src, root)
    val_ids = read_id_list(root / "ImageSets/Segmentation/val.txt")
    (root / "ImageSets/Segmentation/test.txt").write_text("\n".join(val_ids[:3]) + "\n")
    pseudo = root.parent / "pseudo"
    for image_id in read_id_list(root / "ImageSets/Segmentation/train.txt"):
        write_mask(pseudo / f"{image_id}.png", eroded(read_mask(root / "SegmentationClass" / f"{image_id}.png")))
    return root, pseudo


@pytest.fixture(scope="module")
def trained_run(seg_data, tmp_path_factory):
    """`fsae seg train` through the CLI on the pseudo-masks (240 iterations, ~40 epochs of 24 images)."""
    root, pseudo = seg_data
    run = tmp_path_factory.mktemp("segrun") / "run"
    recipe = run.parent / "tiny.yaml"
    cfg = tiny_config(root, pseudo)
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["seg", "train", str(recipe), "--out", str(run), "--masks", str(pseudo)]) == 0
    return run, cfg


# ------------------------------------------------------------------------------------------ model


def test_aspp_output_is_the_sum_of_four_dilated_branches():
    torch.manual_seed(0)
    aspp = ASPP(8, 3, rates=(6, 12, 18, 24))
    assert [b.dilation for b in aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(2, 8, 11, 13)
    expected = sum(F.conv2d(x, b.weight, b.bias, padding=r, dilation=r) for b, r in zip(aspp.branches, (6, 12, 18, 24)))
    out = aspp(x)
    assert out.shape == (2, 3, 11, 13)
    torch.testing.assert_close(out, expected)
    # Hand-worked: zero weights, branch i has bias i + 1 -> every output is 1 + 2 + 3 + 4 = 10.
    with torch.no_grad():
        for i, branch in enumerate(aspp.branches):
            branch.weight.zero_()
            branch.bias.fill_(i + 1)
    assert torch.equal(aspp(x), torch.full((2, 3, 11, 13), 10.0))


@pytest.mark.parametrize("arch,backbone", [("deeplabv2", "resnet18"), ("deeplabv1", "resnet18"),
                                           ("deeplabv2", "torchvision:resnet50"), ("deeplabv2", "tinycnn")])
def test_output_stride_8(arch, backbone):
    cfg = SegConfig().model
    cfg.arch, cfg.backbone, cfg.weights, cfg.width, cfg.largefov_channels = arch, backbone, None, 8, 64
    model = build_deeplab(cfg, num_classes=C).eval()
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        features, logits = model.backbone(x), model(x)
    assert features.shape[-2:] == (9, 13)  # ceil(65 / 8), ceil(97 / 8)
    assert logits.shape == (1, C + 1, 9, 13)


def test_multiscale_flip_merge_equals_a_plain_loop():
    torch.manual_seed(0)
    cfg = SegConfig().model
    cfg.backbone, cfg.width, cfg.weights = "tinycnn", 8, None
    model = build_deeplab(cfg, C).eval()
    images = torch.randn(2, 3, 24, 32)  # every scale below gives whole-pixel sizes
    scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    merged = multiscale_probs(model, images, scales, flip=True)

    with torch.no_grad():
        for b in range(2):
            image = images[b:b + 1]
            total = torch.zeros(1, C + 1, 24, 32)
            for s in scales:
                size = (int(24 * s), int(32 * s))
                x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
                for flipped in (False, True):
                    logits = model(torch.flip(x, dims=[3]) if flipped else x)
                    logits = F.interpolate(logits, size=(24, 32), mode="bilinear", align_corners=False)
                    probs = torch.softmax(logits, dim=1)
                    total += torch.flip(probs, dims=[3]) if flipped else probs
            torch.testing.assert_close(merged[b:b + 1], total / 10, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged.sum(1), torch.ones(2, 24, 32))


def test_head_gets_ten_times_the_learning_rate_and_frozen_bn_is_left_out():
    cfg = SegConfig()
    cfg.model.backbone, cfg.model.width, cfg.model.freeze_bn = "tinycnn", 8, True
    model = build_deeplab(cfg.model, C)
    groups = build_seg_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(2.5e-4), pytest.approx(2.5e-3)]
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(id(p) in {id(q) for q in groups[0]["params"]} for m in bn for p in m.parameters())
    model.train()
    assert not any(m.training for m in bn) and model.head.training


def test_iteration_batches_do_not_depend_on_the_start():
    full = list(IterationBatches(10, 3, total=8, seed=1))
    assert list(IterationBatches(10, 3, total=8, seed=1, start=5)) == full[5:]
    for epoch in range(2):  # 3 batches of 3 per epoch: distinct images within an epoch
        ids = [i for batch in full[3 * epoch:3 * epoch + 3] for i, _ in batch]
        assert len(set(ids)) == 9


# ------------------------------------------------------------------------------------------ training


def test_trains_on_pseudo_masks_loss_falls_and_lr_is_poly(trained_run):
    run, cfg = trained_run
    rows = np.loadtxt(run / "metrics.csv", delimiter=",", skiprows=1)
    iteration, lr, loss = rows[:, 0], rows[:, 1], rows[:, 2]
    assert iteration.tolist() == list(range(1, 241))
    # The row of iteration i logs the LR used for it: lr * (1 - (i - 1) / T) ** 0.9.
    np.testing.assert_allclose(lr, 0.01 * (1 - (iteration - 1) / 240) ** 0.9, rtol=1e-5)
    # The head starts near zero (std 0.01), so the first loss is that of uniform scores: ln(C + 1).
    assert loss[0] == pytest.approx(np.log(C + 1), abs=0.05)
    assert loss[-20:].mean() < 0.3 * loss[0]  # measured ~0.23 vs 1.6
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 240 and state["kind"] == "segmentation"


def test_resume_after_interruption_gives_the_uninterrupted_weights(seg_data, tmp_path):
    root, pseudo = seg_data
    cfg = tiny_config(root, pseudo, iterations=8, checkpoint_every=3)
    straight = train_segmentation(cfg, tmp_path / "a", progress=False)

    def interrupt(iteration):
        if iteration == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg, tmp_path / "b", progress=False, on_iteration=interrupt)
    ckpt = tmp_path / "b" / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["iteration"] == 3
    resumed = train_segmentation(cfg, tmp_path / "b", progress=False)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert b["iteration"] == 8
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()
    mtime = ckpt.stat().st_mtime_ns
    train_segmentation(cfg, tmp_path / "b", progress=False)  # finished: nothing to do
    assert ckpt.stat().st_mtime_ns == mtime


def test_a_run_on_masks_made_again_since_is_refused(seg_data, tmp_path, capsys):
    """The pseudo-masks re-made (CRF at another threshold) after a run trained on them: a rerun into the run
    directory would return the old model (finished) or go on with other masks (unfinished); both refused."""
    root, pseudo = seg_data
    masks = tmp_path / "crf"
    shutil.copytree(pseudo, masks)
    write_json(stamp_path(masks), make_stamp("crf", {"seeds": "a1"}, {"threshold": 0.1}))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(root, masks, iterations=4, checkpoint_every=2).to_dict()))
    argv = ["seg", "train", str(recipe), "--out", str(tmp_path / "run"), "--masks", str(masks)]
    assert main(argv) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["masks"]["stamp"]["settings"] == {"threshold": 0.1}
    assert main(argv) == 0  # the same masks: finished, nothing to do

    write_json(stamp_path(masks), make_stamp("crf", {"seeds": "a1"}, {"threshold": 0.5}))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "last.pt: trained on other pseudo-masks" in err and "threshold 0.1, now 0.5" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err

    stamp_path(masks).unlink()  # masks without a stamp (made by hand): their file listing is the record
    assert main([*argv, "--no-resume"]) == 0
    write_mask(masks / sorted(p.name for p in masks.iterdir())[0], np.zeros((8, 8), np.uint8))
    assert main(argv) == 2
    assert "holds now (its files changed since); use a new run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ inference


def test_infer_writes_val_pngs_evaluation_and_test_server_layout(trained_run, seg_data):
    run, cfg = trained_run
    root, _ = seg_data
    assert main(["seg", "infer", str(run), "--set", "data.test_split=test"]) == 0

    test_ids = read_id_list(root / "ImageSets/Segmentation/test.txt")
    server = run / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert server == run / TEST_SERVER_DIR
    assert sorted(p.name for p in server.iterdir()) == sorted(f"{i}.png" for i in test_ids)
    for image_id in test_ids:
        with Image.open(server / f"{image_id}.png") as im:
            assert im.mode == "P" and im.size == Image.open(root / "JPEGImages" / f"{image_id}.jpg").size
            assert set(np.unique(np.asarray(im)).tolist()) <= set(range(C + 1))

    val_ids = read_id_list(root / "ImageSets/Segmentation/val.txt")
    for name in ("val", "val_crf"):
        assert sorted(p.stem for p in (run / "segment" / name).glob("*.png")) == sorted(val_ids)
        # mIoU recomputed here from the PNGs: per-class IoU from a numpy confusion matrix.
        conf = np.zeros((C + 1, C + 1), np.int64)
        for image_id in val_ids:
            pred = np.asarray(Image.open(run / "segment" / name / f"{image_id}.png")).astype(np.int64)
            gt = np.asarray(Image.open(root / "SegmentationClass" / f"{image_id}.png")).astype(np.int64)
            keep = gt != 255
            np.add.at(conf, (gt[keep], pred[keep]), 1)
        union = conf.sum(0) + conf.sum(1) - np.diag(conf)
        iou = np.diag(conf)[union > 0] / union[union > 0]
        assert read_json(run / "eval" / f"seg_{name}.json")["miou"] == pytest.approx(iou.mean())
    # A trained model beats the all-background prediction (mIoU 1 / (C + 1) at best); measured ~0.68.
    assert read_json(run / "eval" / "seg_val.json")["miou"] > 0.4

    # Rerun: every image is there already, nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in server.iterdir()}
    assert main(["seg", "infer", str(run), "--set", "data.test_split=test", "--split", "test"]) == 0
    assert {p: p.stat().st_mtime_ns for p in server.iterdir()} == mtimes


# ------------------------------------------------------------------------------------------ errors


def test_missing_mask_file_is_named(seg_data, tmp_path):
    root, pseudo = seg_data
    partial = tmp_path / "pseudo"
    shutil.copytree(pseudo, partial)
    (partial / "train_00003.png").unlink()
    with pytest.raises(DataError, match=r"train_00003\.png: mask file not found"):
        train_segmentation(tiny_config(root, partial), tmp_path / "run", progress=False)


def test_wrong_checkpoints_are_named(trained_run, seg_data, tmp_path):
    run, cfg = trained_run
    root, pseudo = seg_data
    not_seg = tmp_path / "cam.pt"
    torch.save({"model": {}, "config": {}}, not_seg)
    with pytest.raises(CheckpointError, match=r"cam\.pt: not a segmentation checkpoint"):
        seg_model_from_checkpoint(not_seg)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: cannot read"):
        seg_model_from_checkpoint(garbage)
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint has 4 classes, the config 20"):
        seg_model_from_checkpoint(last, num_classes=20)
    # Resuming a run directory with another config.
    other = tmp_path / "run"
    shutil.copytree(run, other)
    changed = tiny_config(root, pseudo)
    changed.optim.lr = 0.02
    with pytest.raises(CheckpointError, match=r"last\.pt: written by another config"):
        train_segmentation(changed, other, progress=False)


def test_pretrained_weights_load_and_mismatches_are_named(tmp_path):
    cfg = SegConfig().model
    cfg.backbone, cfg.width, cfg.weights = "tinycnn", 8, None
    source = build_deeplab(cfg, C)
    imagenet = {**source.backbone.state_dict(), "fc.weight": torch.zeros(10, 32), "fc.bias": torch.zeros(10)}
    good = tmp_path / "imagenet.pth"
    torch.save({"state_dict": imagenet}, good)
    target = build_deeplab(cfg, C)
    assert load_pretrained(target, good) == {"backbone": True, "head": False}
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value)

    # A whole DeepLab checkpoint with another class count: backbone loaded, head left new.
    whole = tmp_path / "coco.pt"
    torch.save({"model": build_deeplab(cfg, 80).state_dict()}, whole)
    assert load_pretrained(build_deeplab(cfg, C), whole) == {"backbone": True, "head": False}

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in imagenet.items() if not k.startswith("body.4.")}, missing)  # a BatchNorm: 4 tensors
    with pytest.raises(CheckpointError, match=r"missing\.pth: does not fit the backbone: missing 4 tensors"):
        load_pretrained(build_deeplab(cfg, C), missing)
    wider = SegConfig().model
    wider.backbone, wider.width, wider.weights = "tinycnn", 16, None
    shaped = tmp_path / "wider.pth"
    torch.save(build_deeplab(wider, C).backbone.state_dict(), shaped)
    with pytest.raises(CheckpointError, match=r"wider\.pth: does not fit the backbone: .*wrong shape"):
        load_pretrained(build_deeplab(cfg, C), shaped)
    cfg.weights = str(tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match=r"nowhere\.pth: weight file not found"):
        build_deeplab(cfg, C)


# ------------------------------------------------------------------------------------------ recipes

COMMON = {
    "data.kind": "voc", "data.root": "data/VOCdevkit/VOC2012", "data.num_classes": 20,
    "data.train_split": "train_aug", "data.val_split": "val", "data.test_split": "test",
    "data.mask_dir": None, "data.gt_dir": "SegmentationClass", "data.crop_size": 321,
    "data.scale_range": [0.5, 1.5], "data.hflip": True, "data.workers": 8,
    "model.backbone": "resnet101_deeplab", "model.output_stride": 8, "model.weights": "imagenet", "model.freeze_bn": True,
    "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "optim.poly_power": 0.9, "optim.head_lr_mult": 10.0,
    "train.iterations": 20000, "train.batch_size": 10, "train.device": "cuda", "train.checkpoint_every": 1000,
    "infer.scales": [0.5, 0.75, 1.0, 1.25, 1.5], "infer.flip": True, "infer.crf.enabled": True,
    "infer.crf.iterations": 10, "infer.crf.gaussian_sxy": 1.0, "infer.crf.gaussian_compat": 3.0,
    "infer.crf.bilateral_sxy": 67.0, "infer.crf.bilateral_srgb": 3.0, "infer.crf.bilateral_compat": 4.0,
}
RECIPES = {
    "configs/voc/deeplabv2_r101.yaml": {
        **COMMON, "name": "voc_deeplabv2_r101", "model.arch": "deeplabv2", "model.aspp_rates": [6, 12, 18, 24],
        "optim.lr": 2.5e-4,
        "optim.bias_lr_mult": 2.0, "optim.bias_weight_decay": False, "train.msc_scales": [0.5, 0.75],  # issue 29
    },
    "configs/voc/deeplabv1_r101.yaml": {
        **COMMON, "name": "voc_deeplabv1_r101", "model.arch": "deeplabv1", "model.largefov_dilation": 12,
        "model.largefov_channels": 1024, "model.dropout": 0.5, "optim.lr": 1e-3,
    },
    "configs/coco/deeplabv2_r101.yaml": {
        **COMMON, "name": "coco_deeplabv2_r101", "model.arch": "deeplabv2", "model.aspp_rates": [6, 12, 18, 24],
        "optim.lr": 2.5e-4, "data.kind": "coco", "data.root": "data/COCO", "data.num_classes": 80,
        "data.train_split": "train2014", "data.val_split": "val2014", "data.test_split": "",
        "data.gt_dir": "SegmentationClass/val2014", "train.iterations": 100000, "train.checkpoint_every": 5000,
        "optim.bias_lr_mult": 2.0, "optim.bias_weight_decay": False, "train.msc_scales": [0.5, 0.75],  # issue 29
    },
    # The CPU-sized recipe behind the numbers of the synthetic experiment (docs: README, seg section).
    "configs/synthetic/deeplabv2_r18.yaml": {
        "name": "synthetic_deeplabv2_r18", "data.kind": "voc", "data.root": "data/synthetic", "data.num_classes": 4,
        "data.train_split": "train", "data.val_split": "val", "data.test_split": "", "data.mask_dir": None,
        "data.gt_dir": "SegmentationClass", "data.crop_size": 96, "data.scale_range": [0.5, 1.5],
        "data.hflip": True, "model.arch": "deeplabv2", "model.backbone": "resnet18", "model.weights": None,
        "model.output_stride": 8, "model.freeze_bn": False, "model.aspp_rates": [6, 12, 18, 24],
        "optim.lr": 0.01, "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "optim.poly_power": 0.9,
        "optim.head_lr_mult": 10.0, "train.iterations": 200, "train.batch_size": 10, "train.device": "cpu",
        "train.log_every": 10, "train.checkpoint_every": 50, "infer.scales": [0.5, 0.75, 1.0, 1.25, 1.5],
        "infer.flip": True, "infer.crf.enabled": True,
    },
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_fields_match_the_table(recipe, check_seg_recipe):
    check_seg_recipe(recipe, RECIPES[recipe])
