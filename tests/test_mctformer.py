"""MCTformer V2: attention and CAMs against plain restatements, the LR schedule, timm's transform,
training + seeds, recipes."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsae.augment import normalize, timm_train_transform, timm_train_view
from fsae.cli import main as cli
from fsae.config import DataConfig, OptimConfig, load_config
from fsae.methods import build_method
from fsae.methods.mctformer import MCTformerV2, attention_cams, attention_probs, vit_state_dict
from fsae.train import TrainViews, build_optimizer, learning_rate, train
from tests.conftest import assert_finished_without_nan, assert_nan_stops_training

REPO = Path(__file__).resolve().parents[1]


def tiny_mct(**kw):
    args = dict(embed_dim=32, depth=3, num_heads=2, img_size=64, drop_path=0.0, attention_layers=2)
    args.update(kw)
    return MCTformerV2(3, **args)


def test_attention_probs_restated_and_equal_to_timm_internal():
    torch.manual_seed(0)
    model = tiny_mct().eval()
    blk = model.vit.blocks[0]
    x = torch.randn(2, 7, 32)
    probs = attention_probs(blk.attn, x)
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    qkv = x @ w.T + b
    heads, dh = 2, 16
    expected = torch.zeros(2, 7, 7)
    for h in range(heads):
        q = qkv[..., h * dh:(h + 1) * dh]
        k = qkv[..., 32 + h * dh:32 + (h + 1) * dh]
        expected += torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) / heads
    torch.testing.assert_close(probs, expected)
    # timm's own non-fused path computes the same weights (captured at its attention dropout).
    seen = []
    blk.attn.fused_attn = False
    handle = blk.attn.attn_drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    blk.attn(x)
    handle.remove()
    torch.testing.assert_close(seen[0].mean(1), probs)


def test_attention_cams_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    c, h, w, layers, b = 2, 2, 3, 4, 1
    n = c + h * w
    attn = torch.rand(layers, b, n, n, generator=gen)
    patch_cams = torch.randn(b, c, h, w, generator=gen)
    out = attention_cams(attn, patch_cams, num_layers=2, refine=True)
    plain = attention_cams(attn, patch_cams, num_layers=2, refine=False)
    for k in range(c):
        fused = []
        for i in range(h * w):
            att = sum(attn[l, 0, k, c + i].item() for l in (2, 3))  # the last 2 layers
            fused.append(att * max(patch_cams[0, k].reshape(-1)[i].item(), 0.0))
        assert plain[0, k].reshape(-1).tolist() == pytest.approx(fused, rel=1e-5)
        for i in range(h * w):
            refined = sum(sum(attn[l, 0, c + i, c + j].item() for l in range(layers)) * fused[j]
                          for j in range(h * w))
            assert out[0, k].reshape(-1)[i].item() == pytest.approx(refined, rel=1e-5)


def test_forward_scores_score_map_and_losses():
    torch.manual_seed(0)
    model = tiny_mct(background_logit=4.0).train()
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = model(x, labels)
    tokens, grid, _ = model._encode(x)  # same weights, drop path 0: deterministic
    torch.testing.assert_close(out.logits, tokens[:, :3].mean(-1))
    patch_cams = out.extras["patch_cams"]
    assert patch_cams.shape == (2, 3, 4, 4) and grid == (4, 4)
    torch.testing.assert_close(out.extras["patch_logits"], patch_cams.mean((2, 3)))
    assert out.score_map.shape == (2, 4, 4, 4)
    assert (out.score_map[:, -1] == 4.0).all()
    torch.testing.assert_close(out.score_map[:, :3], patch_cams)
    losses = model.losses({"label": labels}, out)

    def mlsm(z):
        p = torch.sigmoid(z)
        return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean().item()

    assert losses["cls"].item() == pytest.approx(mlsm(out.logits), rel=1e-5)
    assert losses["patch"].item() == pytest.approx(mlsm(out.extras["patch_logits"]), rel=1e-5)


def test_cam_at_other_sizes_and_its_parts():
    torch.manual_seed(0)
    model = tiny_mct().eval()
    x = torch.randn(1, 3, 64, 64)
    tokens, grid, attn = model._encode(x, with_attention=True)
    assert attn.shape == (3, 1, 19, 19)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 1, 19))
    expected = attention_cams(attn, model._patch_cams(tokens, grid), 2, True)
    torch.testing.assert_close(model.cam(x), expected)
    assert model.cam(torch.randn(2, 3, 100, 72)).shape == (2, 3, 6, 4)  # positions resampled
    assert (model.cam(x) >= 0).all()


def test_weight_decay_groups_follow_timm_rule():
    model = tiny_mct()
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, new_layer_lr_mult=1.0))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, p in named.items():
        no_decay = p.ndim <= 1 or name in ("vit.pos_embed", "class_tokens", "class_pos")
        assert decay[id(p)] == (0.0 if no_decay else 0.05), name
    assert len(decay) == len(named)


def test_pretrained_vit_state_maps_onto_the_class_free_vit():
    torch.manual_seed(0)
    model = tiny_mct()
    src = {k: torch.randn_like(v) for k, v in model.vit.state_dict().items()}
    src["pos_embed"] = torch.randn(1, 1 + 16, 32)  # a class token's position first
    src["cls_token"] = torch.randn(1, 1, 32)
    src["head.weight"] = torch.randn(1000, 32)
    mapped = vit_state_dict({"model": src}, model.vit, (4, 4), "ckpt")
    assert "head.weight" not in mapped and "cls_token" not in mapped
    torch.testing.assert_close(mapped["pos_embed"], src["pos_embed"][:, 1:])


def test_learning_rate_formula_and_timm_cosine():
    from timm.scheduler import CosineLRScheduler

    cfg = OptimConfig(lr=5e-4, schedule="cosine", warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    spe, total = 10, 60
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    ref = CosineLRScheduler(opt, t_initial=total, lr_min=cfg.min_lr, warmup_t=20, warmup_lr_init=cfg.warmup_lr,
                            t_in_epochs=False)
    for step in range(total):
        if step < 20:
            plain = 1e-6 + (5e-4 - 1e-6) * step / 20
        else:
            plain = 1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + math.cos(math.pi * step / total))
        assert learning_rate(cfg, step, total, spe) == pytest.approx(plain, rel=1e-9)
        ref.step_update(step)
        assert learning_rate(cfg, step, total, spe) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    poly = OptimConfig(lr=0.1, schedule="poly", poly_power=0.9)
    assert learning_rate(poly, 30, 100, 10) == pytest.approx(0.1 * (1 - 30 / 100) ** 0.9)
    with pytest.raises(Exception, match="unknown optim.schedule"):
        learning_rate(OptimConfig(schedule="step"), 0, 10, 1)


def test_timm_view_is_timms_transform_output_exactly():
    import random

    cfg = DataConfig(transform="timm", crop_size=48, re_prob=1.0)
    transform = timm_train_transform(cfg)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in kinds
    assert type(transform.transforms[-1]).__name__ == "RandomErasing" and transform.transforms[-1].probability == 1.0
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    view = timm_train_view(image, transform, seed=7)
    assert view.shape == (3, 48, 48)
    from PIL import Image

    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = transform(Image.fromarray(image))
    torch.testing.assert_close(normalize(view), expected, atol=1e-5, rtol=0)  # no double normalisation
    torch.testing.assert_close(timm_train_view(image, transform, seed=7), view)
    assert not torch.equal(timm_train_view(image, transform, seed=8), view)


def test_train_views_with_timm_transform(tiny_synthetic):
    from fsae.data import build_dataset

    root, _ = tiny_synthetic
    cfg = load_config(REPO / "configs/synthetic/mctformer.yaml", [f"data.root={root}", "data.transform=timm",
                                                                   "data.crop_size=48"])
    views = TrainViews(build_dataset(cfg.data, "train"), cfg.data, seed=0)
    item = views[3]
    assert item["image"].shape == (3, 48, 48) and item["valid"].all() and "mask" not in item
    torch.testing.assert_close(views[3]["image"], item["image"])
    views.epoch = 1
    assert not torch.equal(views[3]["image"], item["image"])


def tiny_run_config(root, **fsae):
    cfg = load_config(REPO / "configs/synthetic/mctformer_fsae.yaml")
    cfg.data.root = str(root)
    cfg.data.long_side = None
    cfg.data.crop_size = 64
    cfg.model.mct.img_size = 64
    cfg.model.mct.embed_dim = 32
    cfg.model.mct.depth = 3
    cfg.model.mct.num_heads = 2
    cfg.model.mct.attention_layers = 2
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
    # Warm-up then cosine, as logged.
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(cfg.optim.warmup_lr) and max(lrs) <= cfg.optim.lr
    assert cli(["cam", str(run)]) == 0
    out_json = tmp_path / "eval.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", "4", "--sweep", "0", "0.6", "0.05", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["count"] == spec.num_train and 0 < result["best"]["miou"] <= 1


def test_one_epoch_with_timm_transform(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_run_config(root, start_epoch=0)
    cfg.data.transform = "timm"
    cfg.data.jitter = None
    cfg.train.epochs = 1
    train(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows and all(math.isfinite(float(r["loss"])) for r in rows)
    # the logged loss is the sum of the logged terms (to the 6 printed digits), FSAE among them
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["cls"]) + float(r["patch"]) + float(r["fsae"]), rel=2e-5)
    assert any(float(r["fsae"]) > 0 for r in rows)



def test_a_nan_in_the_mctformer_loss_stops_training(tiny_synthetic, tmp_path, nan_at_call):
    """What the finite-loss checks here rely on: a NaN step stops the run before its row is written."""
    root, _ = tiny_synthetic
    nan_at_call(MCTformerV2, 1)
    assert_nan_stops_training(train, tiny_run_config(root, start_epoch=0), tmp_path / "run")


@pytest.mark.slow
def test_loss_falls_without_nan(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_run_config(root, enabled=False)
    cfg.train.epochs = 25
    train(cfg, tmp_path / "run", progress=False)
    loss = [float(r["loss"]) for r in assert_finished_without_nan(tmp_path / "run", cfg, 24)]  # 75 rows
    assert np.mean(loss[-6:]) < np.mean(loss[:6]) - 0.05


# The recipes, field by field, against the base repo's main.py defaults / run.sh and the issue.
MCT_VOC = {
    "data.num_classes": 20, "data.train_split": "train_aug", "data.transform": "timm", "data.crop_size": 224,
    "data.auto_augment": "rand-m9-mstd0.5-inc1", "data.re_prob": 0.25, "data.hflip": True, "data.jitter": None,
    "model.method": "mctformer", "model.backbone": "deit_small_patch16_224", "model.mct.img_size": 224,
    "model.mct.embed_dim": None, "model.mct.depth": None, "model.mct.num_heads": None, "model.mct.drop_path": 0.1,
    "model.mct.attention_layers": 3, "model.mct.patch_refine": True, "optim.name": "adamw",
    "optim.lr": 5e-4 * 64 / 512, "optim.weight_decay": 0.05, "optim.new_layer_lr_mult": 1.0,
    "optim.schedule": "cosine", "optim.warmup_epochs": 5, "optim.warmup_lr": 1e-6, "optim.min_lr": 1e-5,
    "train.epochs": 60, "train.batch_size": 64, "infer.scales": [1.0], "infer.flip": True,
    "infer.split": "train", "fsae.enabled": False,
}
MCT_FSAE_VOC = {**MCT_VOC, "fsae.enabled": True, "fsae.start_epoch": 10, "fsae.tau_fae": 0.95,
                "fsae.tau_sae": 0.8, "fsae.kernel_size": 3, "fsae.weight": 1.0}


def field(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name, table", [("mctformer", MCT_VOC), ("mctformer_fsae", MCT_FSAE_VOC)])
def test_voc_recipes(name, table):
    cfg = load_config(REPO / "configs" / "voc" / f"{name}.yaml")
    for key, value in table.items():
        assert field(cfg, key) == value, key
    transform = timm_train_transform(cfg.data)
    assert transform.transforms[0].size == (224, 224)
    cfg.model.mct.embed_dim, cfg.model.mct.depth, cfg.model.mct.num_heads = 32, 3, 2  # builds; tiny for speed
    cfg.model.weights = None  # loading the DeiT file: tests/test_weights.py
    model = build_method(cfg.model, cfg.data.num_classes)
    assert isinstance(model, MCTformerV2) and model.class_tokens.shape == (1, 20, 32)
    assert model.vit.patch_embed.patch_size == (16, 16) and model.grid == (14, 14)
