"""SIPE: its maps and losses against plain restatements, frozen layers, training + argmax seeds, recipes."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsae.cli import main as cli
from fsae.config import load_config
from fsae.evaluate import SeedEvaluator, confusion_matrix, load_seed, seed_to_mask
from fsae.infer import save_seed
from fsae.methods import build_method
from fsae.methods.sipe import (SIPE, gsc_loss, hierarchical_features, is_cam, seed_prototypes, sipe_norm_cam,
                               structure_seeds)
from fsae.train import train
from tests.conftest import assert_finished_without_nan, assert_nan_stops_training

REPO = Path(__file__).resolve().parents[1]


def tiny_sipe(**kw):
    args = dict(backbone="resnet18", channels=[8, 16, 16, 32], side_channels=[4, 4, 8, 8], freeze_bn=False,
                freeze_low_stages=False)
    args.update(kw)
    return SIPE(3, **args)


def test_norm_cam_hand_worked():
    # One image, 2 classes, 1 x 3 pixels; class 2 absent.
    cams = torch.tensor([[[[2.0, 1.0, -1.0]], [[0.0, 3.0, 1.5]]]])
    out = sipe_norm_cam(cams, torch.tensor([[1.0, 0.0]]))
    n1 = [2 / (2 + 1e-5), 1 / (2 + 1e-5), 0.0]
    n2 = [0.0, 3 / (3 + 1e-5), 1.5 / (3 + 1e-5)]
    background = [1 - max(a, b) for a, b in zip(n1, n2)]  # over ALL classes, before the label gate
    expected = torch.tensor([[[n1], [[0.0, 0.0, 0.0]], [background]]])
    torch.testing.assert_close(out, expected)


def test_seeds_prototypes_and_is_cam_against_loops():
    gen = torch.Generator().manual_seed(0)
    b, k, h, w, d = 2, 3, 3, 4, 5
    norm_cam = torch.rand(b, k, h, w, generator=gen)
    feature = torch.randn(b, d, h, w, generator=gen)
    gate = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    seeds = structure_seeds(norm_cam, gate, feature)
    protos = seed_prototypes(seeds, feature)
    maps = is_cam(protos, feature)
    for n in range(b):
        f = feature[n].reshape(d, -1)
        f = f / (f.norm(dim=0, keepdim=True) + 1e-5)
        pixels = h * w
        for i in range(pixels):
            ious = []
            for c in range(k):
                m = norm_cam[n, c].reshape(-1)
                corr = [max(float(f[:, i] @ f[:, j]), 0.0) for j in range(pixels)]
                inter = sum(corr[j] * float(m[j]) for j in range(pixels))
                union = sum(corr) + float(m.sum()) - inter
                ious.append(inter / union * (0.5 if c == k - 1 else 1.0))  # background LAST, halved
            best = int(np.argmax(ious))
            for c in range(k):
                assert seeds[n, c].reshape(-1)[i] == (1.0 if c == best and gate[n, c] > 0 else 0.0)
        for c in range(k):
            proto = (seeds[n, c][None] * feature[n]).sum((1, 2)) / pixels
            torch.testing.assert_close(protos[n, c], proto)
            for y in range(h):
                for x in range(w):
                    v = feature[n, :, y, x]
                    cos = float(v @ proto) / max(float(v.norm() * proto.norm()), 1e-8)
                    assert maps[n, c, y, x].item() == pytest.approx(max(cos, 0.0), abs=1e-5)


def test_gsc_loss_and_hierarchical_features_restated():
    gen = torch.Generator().manual_seed(1)
    norm_cam, maps = torch.rand(2, 3, 4, 4, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :, 2:] = False
    target = maps / (maps.amax((2, 3), keepdim=True) + 1e-5)
    total, count = 0.0, 0
    for n in range(2):
        for c in range(3):
            for y in range(4):
                for x in range(4):
                    if valid[n, y, x]:
                        total += abs(norm_cam[n, c, y, x] - target[n, c, y, x]).item()
                        count += 1
    assert gsc_loss(norm_cam, maps, valid).item() == pytest.approx(total / count, rel=1e-5)
    assert gsc_loss(norm_cam, maps).item() == pytest.approx((norm_cam - target).abs().mean().item(), rel=1e-6)
    sides = [torch.randn(1, 2, 8, 8, generator=gen), torch.randn(1, 3, 4, 4, generator=gen)]
    hie = hierarchical_features(sides, (4, 4))
    assert hie.shape == (1, 5, 4, 4)
    first = F.interpolate(sides[0] / (sides[0].norm(dim=1, keepdim=True) + 1e-5), size=(4, 4), mode="bilinear")
    torch.testing.assert_close(hie[:, :2], first)
    torch.testing.assert_close(hie[:, 2:].norm(dim=1), torch.ones(1, 4, 4), atol=1e-4, rtol=0)


def test_forward_score_map_and_losses():
    torch.manual_seed(0)
    model = tiny_sipe().train()
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = model(x, labels)
    assert out.logits.shape == (2, 3) and out.score_map.shape == (2, 4, 4, 4)
    norm_cam, maps = out.extras["norm_cam"], out.extras["is_cam"]
    torch.testing.assert_close(out.score_map, 10 * norm_cam)
    assert (out.score_map[0, 1] == 0).all()  # absent class gated
    losses = model.losses({"label": labels, "valid": torch.ones(2, 64, 64, dtype=torch.bool)}, out)
    y = labels
    p = torch.sigmoid(out.logits)
    mlsm = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert losses["cls"].item() == pytest.approx(mlsm.item(), rel=1e-5)
    assert losses["gsc"].item() == pytest.approx(gsc_loss(norm_cam, maps).item(), rel=1e-6)
    model.eval()
    assert model.cam(x).shape == (2, 3, 4, 4)
    fg = model.cam(x, labels)  # C foreground channels, like every method; the background separately
    assert fg.shape == (2, 3, 4, 4) and (fg[0, 1] == 0).all() and (fg >= 0).all()
    fg2, bg = model.cam_with_background(x, labels)
    assert torch.equal(fg, fg2) and bg.shape == (2, 4, 4) and (bg >= 0).all()


def test_frozen_batchnorm_and_low_stages():
    torch.manual_seed(0)
    model = tiny_sipe(freeze_bn=True, freeze_low_stages=True).train()
    bns = [m for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = {k: v.clone() for k, v in model.features.state_dict().items() if "running" in k}
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = model(x, labels)
    sum(model.losses({"label": labels}, out).values()).backward()
    after = model.features.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # running statistics untouched
    for name, p in model.features.named_parameters():
        trainable = name.startswith(("layer3", "layer4"))
        assert p.requires_grad == trainable
        assert (p.grad is not None) == trainable, name
    backbone, new = model.param_groups()
    assert new["new"] and not backbone["new"]
    assert len(new["params"]) == 5  # classifier + 4 side convs


def test_argmax_seed_with_background_plane(tmp_path):
    keys = np.array([2, 3])
    cams = np.array([[[0.9, 0.2, 0.5]], [[0.1, 0.8, 0.5]]], dtype=np.float32)
    background = np.array([[0.5, 0.95, 0.5]], dtype=np.float32)
    assert seed_to_mask(keys, cams, 0.0, background).tolist() == [[2, 0, 0]]  # ties go to background
    save_seed(tmp_path / "a.npz", keys, cams, background)
    k, c, bg = load_seed(tmp_path / "a.npz", with_background=True)
    assert bg.shape == (1, 3) and load_seed(tmp_path / "a.npz")[0].tolist() == [2, 3]
    gt = np.array([[2, 0, 3]], dtype=np.uint8)
    ev = SeedEvaluator(3, [0.1, 0.3])
    ev.update(k, c, gt, bg)
    expected = confusion_matrix(np.array([[2, 0, 0]]), gt, 3)
    assert all(torch.equal(m, expected) for m in ev.confusions)  # the same for every threshold


def tiny_run_config(root, **fsae):
    cfg = load_config(REPO / "configs/synthetic/sipe_fsae.yaml")
    cfg.data.root = str(root)
    cfg.data.long_side = None
    cfg.data.crop_size = 64
    cfg.model.sipe.channels = [8, 16, 16, 32]
    cfg.model.sipe.side_channels = [4, 4, 8, 8]
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    cfg.train.log_every = 1
    cfg.infer.scales = [1.0, 0.5]
    for k, v in fsae.items():
        setattr(cfg.fsae, k, v)
    return cfg


def test_trains_with_fsae_from_start_epoch_and_seeds_evaluate(tiny_synthetic, tmp_path):
    root, spec = tiny_synthetic
    cfg = tiny_run_config(root, start_epoch=1)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    rows = assert_finished_without_nan(run, cfg, spec.num_train)  # 6 rows: 2 epochs of 24 // 8 steps
    before = [float(r["fsae"]) for r in rows if r["epoch"] == "0"]
    after = [float(r["fsae"]) for r in rows if r["epoch"] == "1"]
    assert before and all(v == 0.0 for v in before)
    assert after and any(v > 0.0 for v in after)
    assert cli(["cam", str(run)]) == 0
    keys, cams, background = load_seed(next((run / "seeds").glob("*.npz")), with_background=True)
    assert background is not None and background.shape == (spec.image_size, spec.image_size)
    assert 0 <= background.min() and background.max() <= 1.0
    out_json = tmp_path / "eval.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", "4", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["count"] == spec.num_train and 0 < result["best"]["miou"] <= 1



def test_a_nan_in_the_sipe_loss_stops_training(tiny_synthetic, tmp_path, nan_at_call):
    """What the finite-loss checks here rely on: a NaN step stops the run before its row is written."""
    root, _ = tiny_synthetic
    nan_at_call(SIPE, 1)
    assert_nan_stops_training(train, tiny_run_config(root, start_epoch=0), tmp_path / "run")


@pytest.mark.slow
def test_loss_falls_without_nan(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_run_config(root, enabled=False)
    cfg.train.epochs = 15
    train(cfg, tmp_path / "run", progress=False)
    loss = [float(r["loss"]) for r in assert_finished_without_nan(tmp_path / "run", cfg, 24)]  # 45 rows
    assert np.mean(loss[-6:]) < np.mean(loss[:6]) - 0.05


# The recipes, field by field, against SIPE's train_resnet50_SIPE.py / make_cam.py and the paper's §4.1.3.
SIPE_VOC = {
    "data.num_classes": 20, "data.train_split": "train_aug", "data.long_side": [320, 640], "data.crop_size": 512,
    "data.hflip": True, "model.method": "sipe", "model.backbone": "resnet50_irn", "model.output_stride": 16,
    "model.sipe.side_channels": [128, 128, 256, 256], "model.sipe.freeze_bn": True,
    "model.sipe.freeze_low_stages": True, "optim.name": "sgd", "optim.lr": 0.1, "optim.new_layer_lr_mult": 10.0,
    "optim.weight_decay": 1e-4, "optim.schedule": "poly", "optim.poly_power": 0.9, "optim.grad_clip": 1.0,
    "train.epochs": 5, "train.batch_size": 16, "infer.scales": [1.0, 0.5, 1.5, 2.0], "infer.flip": True,
    "infer.split": "train", "fsae.enabled": False,
}
SIPE_FSAE_VOC = {**SIPE_VOC, "optim.lr": 0.05, "train.epochs": 10, "train.batch_size": 16, "fsae.enabled": True,
                 "fsae.tau_fae": 0.95, "fsae.tau_sae": 0.8, "fsae.kernel_size": 3, "fsae.weight": 1.0}


def field(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name, table", [("sipe", SIPE_VOC), ("sipe_fsae", SIPE_FSAE_VOC)])
def test_voc_recipes(name, table):
    cfg = load_config(REPO / "configs" / "voc" / f"{name}.yaml")
    for key, value in table.items():
        assert field(cfg, key) == value, key
    # The recipe's model builds (without its ImageNet file: loading it is tests/test_weights.py's).
    cfg.model.weights = None
    model = build_method(cfg.model, cfg.data.num_classes)
    assert isinstance(model, SIPE) and model.freeze_bn
