"""The vertical slice: method, inference, training, CLI stages chained on a tiny data set."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsae.cli import main as cli
from fsae.config import ConfigError, load_config
from fsae.demo import VARIANTS, demo_config
from fsae.evaluate import load_seed
from fsae.infer import multiscale_cam, normalise_seed
from fsae.methods import build_method
from fsae.methods.cam import CAM
from fsae.train import train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(root, **fsae):
    cfg = demo_config("base", root, seed=0)
    cfg.data.long_side = None
    cfg.data.crop_size = 64
    cfg.model.width = 8
    cfg.model.background_logit = 5.0  # an untrained net's low CAMs are then confident background: FSAE has pixels
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    cfg.train.log_every = 1
    cfg.fsae.start_epoch = 0
    cfg.infer.scales = [1.0, 0.5]
    for k, v in fsae.items():
        setattr(cfg.fsae, k, v)
    return cfg


def test_cam_shapes_and_constant_background_score_map():
    torch.manual_seed(0)
    model = CAM(3, backbone="tinycnn", output_stride=8, width=8, background_logit=3.0).eval()
    x = torch.randn(2, 3, 64, 48)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    out = model(x, labels)
    assert out.logits.shape == (2, 3)
    assert out.score_map.shape == (2, 4, 8, 6)
    cams = out.extras["cams"]
    # eq. 1: class score = GAP of the class score map.
    torch.testing.assert_close(out.logits, cams.mean((2, 3)))
    features = model.backbone(x)  # (2, D, 8, 6)
    # foreground channels: the bias-free 1x1 classifier, written as a plain sum over feature channels
    w = model.classifier.weight[:, :, 0, 0]  # (3, D)
    torch.testing.assert_close(out.score_map[:, :3], torch.einsum("kd,bdhw->bkhw", w, features))
    assert (out.score_map[:, -1] == 3.0).all()  # the background channel LAST: the fixed logit
    assert torch.equal(out.score_map, model(x).score_map)  # the labels do not enter S
    assert model.cam(x).shape == (2, 3, 8, 6) and torch.equal(model.cam(x), cams.clamp(min=0))


def test_multiscale_flip_merge_equals_a_loop():
    torch.manual_seed(1)
    model = CAM(3, backbone="tinycnn", output_stride=8, width=8).eval()
    images = torch.randn(2, 3, 40, 56)
    scales = (0.5, 1.0, 1.5)
    merged = multiscale_cam(model, images, scales, flip=True)
    for b in range(2):
        expected = torch.zeros(3, 40, 56)
        for s in scales:
            for flip in (False, True):
                x = images[b:b + 1]
                x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
                x = x.flip(-1) if flip else x
                cam = F.relu(model.cam(x))
                cam = F.interpolate(cam, size=(40, 56), mode="bilinear", align_corners=False)[0]
                expected += cam.flip(-1) if flip else cam
        torch.testing.assert_close(merged[b], expected, rtol=1e-4, atol=1e-5)
    keys, cams = normalise_seed(merged[0], torch.tensor([0.0, 1.0, 1.0]))
    assert keys.tolist() == [2, 3]
    raw_max = merged[0, 1:].flatten(1).max(1).values.numpy()
    np.testing.assert_allclose(cams.reshape(2, -1).max(1), raw_max / (raw_max + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(cams, (merged[0, 1:] / (merged[0, 1:].flatten(1).max(1).values[:, None, None]
                                                       + 1e-5)).numpy(), rtol=1e-6)


def test_training_loss_decreases_and_fsae_logs(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_config(root, enabled=True)
    cfg.train.epochs = 20
    cfg.optim.lr = 1e-2
    cfg.model.width = 16
    cfg.train.val_every = 5
    train(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    cls = [float(r["cls"]) for r in rows]
    assert np.mean(cls[-9:]) < np.mean(cls[:9]) - 0.05
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # 20 epochs of 24 // 8 steps, each logged
    # every row has the FSAE term, its mask ratio and (the set has GT masks) the pseudo-label accuracy:
    # an empty cell fails float()
    assert all(float(r["fsae"]) > 0 and 0 < float(r["mask_ratio"]) <= 1 for r in rows)
    assert all(0 <= float(r["pl_accuracy"]) <= 1 for r in rows)
    epochs = list(csv.DictReader(open(tmp_path / "run" / "epochs.csv")))
    assert len(epochs) == 20
    assert [e["epoch"] for e in epochs if e["val_miou"]] == ["5", "10", "15", "20"]
    assert all(0 < float(e["val_miou"]) <= 1 for e in epochs if e["val_miou"])


def test_start_epoch_zero_before_and_nonzero_after(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_config(root, enabled=True, start_epoch=1)
    train(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    before = [float(r["fsae"]) for r in rows if r["epoch"] == "0"]
    after = [float(r["fsae"]) for r in rows if r["epoch"] == "1"]
    assert before and all(v == 0.0 for v in before)
    assert after and any(v > 0.0 for v in after)


def test_cli_stages_chained(tiny_synthetic, tmp_path, capsys):
    root, spec = tiny_synthetic
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text((REPO / "configs/synthetic/cam_fsae.yaml").read_text())
    run = tmp_path / "run"
    overrides = ["--set", f"data.root={root}", "--set", "train.epochs=1", "--set", "train.batch_size=8",
                 "--set", "model.width=8", "--set", "data.crop_size=64", "--set", "data.long_side=null",
                 "--set", "fsae.start_epoch=0", "--set", "infer.scales=[1.0]"]
    assert cli(["train", str(cfg_path), "--out", str(run), *overrides]) == 0
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()
    assert cli(["cam", str(run)]) == 0
    seeds = sorted((run / "seeds").glob("*.npz"))
    assert len(seeds) == spec.num_train
    keys, cams = load_seed(seeds[0])
    assert cams.shape[1:] == (spec.image_size, spec.image_size) and cams.max() <= 1.0
    out_json = tmp_path / "eval.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", "4", "--sweep", "0", "0.6", "0.05", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["count"] == spec.num_train and 0 < result["best"]["miou"] <= 1
    # A rerun skips finished seeds.
    capsys.readouterr()
    assert cli(["cam", str(run)]) == 0
    assert "0 written" in capsys.readouterr().out


def test_demo_reads_the_recipes_which_differ_only_in_fsae():
    recipes = {v: load_config(REPO / "configs" / "synthetic" / name) for v, name in VARIANTS.items()}
    assert set(recipes) == {"base", "fae", "fsae"}
    # Table 6's rows: the same training except the FSAE switches
    for section in ("data", "model", "optim", "train", "infer", "eval"):
        assert getattr(recipes["base"], section) == getattr(recipes["fae"], section) == \
            getattr(recipes["fsae"], section), section
    assert (recipes["base"].fsae.enabled, recipes["fae"].fsae.enabled, recipes["fsae"].fsae.enabled) == \
        (False, True, True)
    assert (recipes["fae"].fsae.use_sae, recipes["fsae"].fsae.use_sae) == (False, True)
    cfg = demo_config("fsae", "/data/x", seed=3)
    assert (cfg.data.root, cfg.train.seed, cfg.name) == ("/data/x", 3, "demo_fsae")
    cfg.data.root, cfg.train.seed, cfg.name = recipes["fsae"].data.root, 0, recipes["fsae"].name
    assert cfg == recipes["fsae"]
    # the demo's numbers come from these values (README's demo table)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.fsae.start_epoch, cfg.model.background_logit,
            cfg.model.output_stride, cfg.model.depth) == (48, 16, 6, 2.5, 4, 5)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fsae:\n  tau_faee: 0.9\n")
    with pytest.raises(ConfigError, match="bad.yaml.*fsae.tau_faee"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["fsae.enabled"])


@pytest.mark.parametrize("line, kept, key", [("background: learned", "background: constant", "model.background"),
                                             ("sipe: {score_map: is_cam}", "sipe: {score_map: cam}",
                                              "model.sipe.score_map")])
def test_removed_score_map_options_are_refused_by_name(tmp_path, line, kept, key):
    # measured and removed (docs/decisions.md): a recipe that still sets a removed choice is refused by name
    old = tmp_path / "old.yaml"
    old.write_text(f"model:\n  {line}\n")
    with pytest.raises(ConfigError, match=f"old.yaml: '{key}: .*' was removed"):
        load_config(old)
    # a run saved before the removal holds the value that stayed: it still loads, as the default recipe
    old.write_text(f"model:\n  {kept}\n")
    assert load_config(old).hash() == load_config(None).hash()


def test_a_checkpoint_saved_before_a_removal_resumes(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_config(root)
    cfg.train.epochs = 1
    ckpt = train(cfg, tmp_path / "run", progress=False)
    state = torch.load(ckpt, weights_only=False)
    state["config"]["model"]["background"] = "constant"  # what a checkpoint from before the removal holds
    state["config_hash"] = "0123456789abcdef"  # and the hash of that config, computed with the field
    torch.save(state, ckpt)
    assert train(cfg, tmp_path / "run", progress=False) == ckpt  # resumes (finished: nothing left to train)
    rows = list(csv.DictReader(open(tmp_path / "run" / "epochs.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    state["config"]["model"]["background"] = "learned"
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match="'model.background: learned' was removed"):
        train(cfg, tmp_path / "run", progress=False)


def test_checkpoint_of_other_class_count_is_refused(tiny_synthetic, tmp_path):
    from fsae.errors import CheckpointError
    from fsae.train import load_checkpoint

    root, _ = tiny_synthetic
    cfg = tiny_config(root)
    cfg.train.epochs = 1
    ckpt = train(cfg, tmp_path / "run", progress=False)
    cfg.data.num_classes = 5
    with pytest.raises(CheckpointError, match="last.pt.*5"):
        load_checkpoint(ckpt, cfg)
    build_method(cfg.model, 5)


def test_training_refuses_a_broken_data_set(tiny_synthetic, tmp_path):
    import shutil

    from fsae.errors import DataError

    root, _ = tiny_synthetic
    broken = tmp_path / "data"
    shutil.copytree(root, broken)
    victim = sorted((broken / "JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    cfg = tiny_config(broken)
    with pytest.raises(DataError, match=victim.name):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overrides_are_converted_to_the_field_type():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-4", "train.epochs=3", "optim.grad_clip=1"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0005 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


def test_interrupted_training_resumes_to_the_same_weights(tiny_synthetic, tmp_path, train_killed_after_epoch):
    root, _ = tiny_synthetic
    cfg = tiny_config(root, enabled=True, start_epoch=1)
    cfg.train.epochs = 3
    cfg.train.val_every = 0
    straight = torch.load(train(cfg, tmp_path / "straight", progress=False), weights_only=True)

    calls = []
    train_killed_after_epoch(cfg, tmp_path / "resumed", 2, calls)
    resumed = torch.load(train(cfg, tmp_path / "resumed", progress=False), weights_only=True)
    assert calls == [1, 2] and resumed["epoch"] == 3 and resumed["step"] == straight["step"]
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    # The per-epoch log continues instead of starting again.
    epochs = list(csv.DictReader(open(tmp_path / "resumed" / "epochs.csv")))
    assert [e["epoch"] for e in epochs] == ["1", "2", "3"]


def test_resume_with_another_config_is_refused(tiny_synthetic, tmp_path):
    from fsae.errors import CheckpointError

    root, _ = tiny_synthetic
    cfg = tiny_config(root)
    cfg.train.epochs = 1
    train(cfg, tmp_path / "run", progress=False)
    cfg.fsae.tau_fae = 0.9
    with pytest.raises(CheckpointError, match="last.pt.*another config"):
        train(cfg, tmp_path / "run", progress=False)


def test_non_finite_loss_stops_naming_step_terms_and_ids(tiny_synthetic, tmp_path, monkeypatch):
    from fsae.errors import FsaeError
    from fsae.methods.cam import CAM

    root, _ = tiny_synthetic
    cfg = tiny_config(root)
    original = CAM.losses

    def nan_losses(self, batch, output):
        terms = original(self, batch, output)
        terms["cls"] = terms["cls"] * float("nan")
        return terms

    monkeypatch.setattr(CAM, "losses", nan_losses)
    with pytest.raises(FsaeError, match=r"non-finite loss at step 0: terms \{'cls': nan\}; batch ids \['train_"):
        train(cfg, tmp_path / "run", progress=False)


def test_cli_crf_then_eval_masks(tiny_synthetic, tmp_path):
    root, spec = tiny_synthetic
    run = tmp_path / "run"
    cfg = tiny_config(root)
    cfg.train.epochs = 1
    train(cfg, run, progress=False)
    assert cli(["cam", str(run)]) == 0
    assert cli(["crf", str(run), "--threshold", "0.3", "--workers", "1"]) == 0
    masks = sorted((run / "crf").glob("*.png"))
    assert len(masks) == spec.num_train
    out_json = tmp_path / "masks.json"
    assert cli(["eval", "--masks", str(run / "crf"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", "4", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["count"] == spec.num_train
    assert result["miou"] + result["fpr"] + result["fnr"] == pytest.approx(1.0)


SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__")


@pytest.mark.parametrize("teacher", ["ema"])
def test_no_host_sync_in_a_non_log_step(tiny_synthetic, tmp_path, monkeypatch, teacher):
    """Count the host syncs fsae code makes per training step; every step that does not log has none.

    A sync is a call of ``Tensor.item / cpu / tolist / numpy / __bool__ / __float__`` from an ``fsae``
    module. ``fsae.augment`` reads its random draws from CPU generators (scalars of at most 9 values,
    never images or losses): host numbers, not device syncs; they are checked to be only that.
    """
    import sys

    import fsae.train as train_module

    root, _ = tiny_synthetic
    cfg = tiny_config(root, enabled=True, teacher=teacher)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every, cfg.train.val_every = 2, 6, 1000, 0
    steps, syncs, draws = [0], {}, []
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module == "fsae.augment":
                draws.append((caller.f_code.co_name, self.numel(), self.requires_grad))
            elif module.startswith("fsae"):
                syncs.setdefault(steps[0], []).append(f"{module}.{caller.f_code.co_name}: {_name}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = train_module.train_step

    def numbered_step(*args, **kwargs):
        steps[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", numbered_step)
    train(cfg, tmp_path / "run", progress=False)
    per_epoch = 24 // 6
    assert steps[0] == 2 * per_epoch
    # steps 4 and 8 end an epoch (finiteness check, checkpoint) and 8 logs; the others must not sync
    quiet = [s for s in range(1, steps[0] + 1) if s % per_epoch]
    assert {s: syncs[s] for s in quiet if s in syncs} == {}
    assert syncs.get(steps[0])  # the check counts: the last step's log does sync
    assert draws and all(numel <= 9 and not grad for _, numel, grad in draws)


def test_best_checkpoint_is_the_first_epoch_with_the_top_heldout_miou(tiny_synthetic, tmp_path, capsys):
    from fsae.train import model_from_checkpoint, run_checkpoint

    root, _ = tiny_synthetic
    cfg = tiny_config(root, enabled=True, start_epoch=1)
    cfg.train.epochs = 4
    train(cfg, tmp_path / "run", progress=False)
    epochs = list(csv.DictReader(open(tmp_path / "run" / "epochs.csv")))
    scores = [float(e["val_miou"]) for e in epochs]
    expected = scores.index(max(scores)) + 1  # the first epoch reaching the maximum (6 printed digits)
    best = torch.load(run_checkpoint(tmp_path / "run", "best"), weights_only=True)
    assert best["best"]["epoch"] == best["epoch"] == expected
    assert best["best"]["val_miou"] == pytest.approx(max(scores), rel=1e-5)
    last = torch.load(run_checkpoint(tmp_path / "run"), weights_only=True)
    assert last["best"] == best["best"] and last["epoch"] == 4
    model, _ = model_from_checkpoint(run_checkpoint(tmp_path / "run", "best"))
    for key, value in best["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    # one console line per epoch, the same lines in log.txt
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    logged = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert printed == logged and len(logged) == 4
    assert logged[1].startswith("epoch 2/4 step 6: loss ") and " fsae " in logged[1]
    assert f"val mIoU {100 * scores[1]:.2f}" in logged[1]


def test_resume_says_where_and_a_refused_start_leaves_the_run_dir(tiny_synthetic, tmp_path, capsys,
                                                                   train_killed_after_epoch):
    from fsae.errors import CheckpointError, DataError
    from fsae.train import run_checkpoint

    root, _ = tiny_synthetic
    cfg = tiny_config(root)
    cfg.train.epochs, cfg.train.val_every = 2, 0
    with pytest.raises(CheckpointError, match="no such checkpoint.*val_every"):
        run_checkpoint(tmp_path / "run", "best")
    train_killed_after_epoch(cfg, tmp_path / "run", 1)
    capsys.readouterr()
    train(cfg, tmp_path / "run", progress=False)
    assert "resuming from step 3 (epoch 2)" in capsys.readouterr().out
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()  # epoch 1's line died with its checkpoint
    assert log[0].startswith("resuming from step 3 (epoch 2)") and log[1].startswith("epoch 2/2 step 6: loss ")
    assert len(log) == 2
    # a refused resume (another model) keeps the run's config.yaml and names the differing field
    saved = (tmp_path / "run" / "config.yaml").read_text()
    cfg.model.width = 16
    with pytest.raises(CheckpointError, match=r"model.width 8 -> 16\)") as error:
        train(cfg, tmp_path / "run", progress=False)
    assert "ModelConfig(" not in str(error.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    # a failed start into a new directory leaves no directory
    cfg.data.train_split = "missing"
    with pytest.raises(DataError):
        train(cfg, tmp_path / "new" / "run", progress=False)
    assert not (tmp_path / "new" / "run").exists()


def test_run_config_stores_absolute_data_paths(tiny_synthetic, tmp_path, monkeypatch):
    root, _ = tiny_synthetic
    monkeypatch.chdir(root.parent)
    cfg = tiny_config(root.name)  # relative to the working directory
    cfg.train.epochs, cfg.train.val_every = 1, 0
    train(cfg, tmp_path / "run", progress=False)
    monkeypatch.chdir(tmp_path)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.root == str(root.resolve()) and Path(saved.data.root, "cls_labels.json").is_file()
