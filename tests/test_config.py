"""The one config machinery (fsae.settings, filled by fsae.config and the other stages' configs): checked values, one hash of the deciding fields, resume after a
change that does not decide the weights, CRF parameters, file modes and orphan pool workers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fsae.cli import main as cli
from fsae.config import Config, ConfigError, changes, fill_config, load_config, save_config
from fsae.data.check import check_dataset, check_training_data
from fsae.io import read_mask, write_json, write_mask, write_text
from fsae.refine.crf import DEEPLAB_CRF, IRN_LABEL_CRF, PSA_CRF, CrfParams
from fsae.refine.irn.config import IRNConfig, load_irn_config
from fsae.segment.config import SegConfig, load_seg_config
from tests.conftest import alive, child_pids, tiny32_config, tiny32_data

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"cam": Config, "seg": SegConfig, "irn": IRNConfig}


def _leaves(cfg, prefix=""):
    """(dotted name, field, owner) of every non-dataclass field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, cfg


# ------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("root, override, words", [
    (Config, "fsae.enabled=maybe", ["fsae.enabled = 'maybe'", "true or false"]),
    (Config, "fsae.enabled=1", ["fsae.enabled = 1", "true or false"]),
    (Config, "train.epochs=-1", ["train.epochs = -1", "an integer (>= 1)"]),
    (Config, "train.epochs=1.5", ["train.epochs = 1.5", "an integer (>= 1)"]),
    (Config, "train.batch_size=0", ["train.batch_size = 0", ">= 1"]),
    (Config, "optim.lr=-1", ["optim.lr = -1", "a number (> 0)"]),
    (Config, "optim.lr=.nan", ["optim.lr = nan", "a number"]),
    (Config, "model.method=foo", ["model.method = 'foo'", "one of cam, eps, ppc, sipe, mctformer"]),
    (Config, "data.crop_size=0", ["data.crop_size = 0", ">= 1"]),
    (Config, "fsae.tau_fae=1.5", ["fsae.tau_fae = 1.5", ">= 0 and <= 1"]),
    (Config, "fsae.teacher=student", ["fsae.teacher = 'student'", "reuse, separate, ema"]),
    (Config, "model.output_stride=12", ["model.output_stride = 12", "4, 8, 16, 32"]),
    (Config, "train.val_scales=[]", ["train.val_scales = []", "at least one item"]),
    (Config, "infer.scales=[1.0, -0.5]", ["infer.scales = [1.0, -0.5]", "> 0"]),
    (Config, "data.jitter=[0.3, 0.3]", ["data.jitter", "4 items"]),
    (Config, "data.num_classes=null", ["data.num_classes = null", "an integer"]),
    (Config, "eval.sweep=[0.6, 0, 0.01]", ["eval.sweep", "start <= stop"]),
    (Config, "fsae.blur=[2.0, 0.1]", ["fsae.blur", "low <= high"]),
    (SegConfig, "train.iterations=0", ["train.iterations = 0", ">= 1"]),
    (SegConfig, "train.checkpoint_every=0", ["train.checkpoint_every = 0", ">= 1"]),
    (SegConfig, "model.arch=deeplabv3", ["model.arch = 'deeplabv3'", "deeplabv2, deeplabv1"]),
    (SegConfig, "data.crop_size=0", ["data.crop_size = 0", ">= 1"]),
    (SegConfig, "optim.lr=0", ["optim.lr = 0", "> 0"]),
    (SegConfig, "infer.crf.enabled=maybe", ["infer.crf.enabled = 'maybe'", "true or false"]),
    (SegConfig, "infer.crf.bilateral_srgb=0", ["infer.crf.bilateral_srgb = 0", "> 0"]),
    (SegConfig, "data.scale_range=[1.5, 0.5]", ["data.scale_range", "low <= high"]),
    (IRNConfig, "train.epochs=1.5", ["train.epochs = 1.5", "an integer"]),
    (IRNConfig, "train.crop_size=100", ["train.crop_size = 100", "multiple of 16"]),
    (IRNConfig, "ir_label.gt_prob=1", ["ir_label.gt_prob = 1", "> 0 and < 1"]),
    (IRNConfig, "ir_label.bg_threshold=0.5", ["ir_label.bg_threshold = 0.5", "ir_label.fg_threshold"]),
    (IRNConfig, "walk.beta=-1", ["walk.beta = -1", "> 0"]),
    (IRNConfig, "ir_label.crf.iterations=-1", ["ir_label.crf.iterations = -1", ">= 0"]),
])
def test_a_bad_value_names_the_source_field_value_and_what_is_allowed(root, override, words):
    with pytest.raises(ConfigError) as info:
        fill_config(root(), None, [override])
    message = str(info.value)
    assert message.startswith(f"override {override!r}: ") or message.startswith("config: "), message
    for word in words:
        assert word in message, message


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=f"^{path}: train.epochs = 0 is not allowed; expected an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="model.method = 'foo'"):
        Config.from_dict({"model": {"method": "foo"}}, "ckpt.pt")


def test_values_are_converted_to_the_field_type():
    cfg = load_config(None, ["optim.lr=1e-4", "optim.weight_decay=0", "train.epochs=3.0", "data.val_split=2012"])
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.weight_decay) is float and cfg.optim.weight_decay == 0.0
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.data.val_split == "2012"


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_every_default_is_allowed_by_its_own_rule(root):
    cfg = fill_config(root())  # validates every field
    assert cfg == root()


@pytest.mark.parametrize("recipe", sorted(p.relative_to(REPO / "configs").as_posix()
                                          for p in (REPO / "configs").rglob("*.yaml")
                                          if p.parent.name != "paper"))  # rows / tiny: tests/test_paper_rows.py
def test_every_recipe_passes_the_checks(recipe):
    name = Path(recipe).stem
    from fsae.refine.psa import load_psa_config

    loader = {"irn": load_irn_config, "psa": load_psa_config}.get(name) or \
        (load_seg_config if name.startswith("deeplab") else load_config)
    loader(REPO / "configs" / recipe)


# each method of ``model.method``'s choices, the synthetic recipe it builds from and the class it must build
METHOD_RECIPES = {"cam": ("cam.yaml", "CAM"), "eps": ("ppc_eps.yaml", "EPS"), "ppc": ("ppc_eps.yaml", "PPC"),
                  "sipe": ("sipe.yaml", "SIPE"), "mctformer": ("mctformer.yaml", "MCTformerV2")}


def test_method_choices_are_the_methods_build_method_knows():
    from fsae.config import METHODS
    from fsae.methods import build_method

    assert sorted(METHODS) == sorted(METHOD_RECIPES)
    for method, (recipe, cls) in METHOD_RECIPES.items():
        cfg = load_config(REPO / "configs" / "synthetic" / recipe)
        cfg.model.method = method
        built = build_method(cfg.model, 4)
        assert type(built).__name__ == cls, method  # EPS / PPC share a recipe: the name alone decides the class
    cfg = Config()
    cfg.model.method = "foo"
    with pytest.raises(ValueError, match="unknown method"):
        build_method(cfg.model, 4)


def test_the_method_tables_agree():
    # Adding a method touches three tables (fsae/methods/__init__.py says which): a missing entry is red here.
    from fsae.config import METHODS as CHOICES
    from fsae.methods import METHODS as CLASSES
    from fsae.protocol import METHOD_PROTOCOLS, PROTOCOLS

    assert set(CHOICES) == set(CLASSES) == set(METHOD_PROTOCOLS)
    assert all(PROTOCOLS[m].method == m for m in METHOD_PROTOCOLS)


def test_backbone_names_are_checked_before_building():
    from fsae.models.backbones import check_backbone

    for name in ("tinycnn", "resnet38", "resnet50_irn", "resnet50", "torchvision:resnet101"):
        check_backbone(name)
    with pytest.raises(ConfigError, match="model.backbone = 'resnet999' is not a backbone"):
        check_backbone("resnet999")
    with pytest.raises(ConfigError, match="torchvision has no ResNet 'vgg16'"):
        check_backbone("torchvision:vgg16")


def test_devices_are_checked_against_the_machine():
    from fsae.config import check_device

    assert check_device("cpu") == "cpu" and check_device("cpu:0") == "cpu:0"
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        check_device("gpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_device("cuda:1")


def test_stage_configs_take_the_machinery_from_settings_not_from_the_cam_schema():
    import ast

    import fsae

    package = Path(fsae.__file__).parent
    for rel in ["settings.py", "segment/config.py", "refine/irn/config.py", "refine/psa/config.py", "refine/crf.py"]:
        tree = ast.parse((package / rel).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "fsae.config" not in imported, rel


def test_removed_keys_belong_to_the_cam_config_alone():
    assert Config.removed_keys == {"model.background": "constant", "model.sipe.score_map": "cam"}
    assert load_config(overrides=["model.background=constant"]).hash() == Config().hash()  # the kept value loads
    with pytest.raises(ConfigError, match="'model.background: learned' was removed; only 'constant' remains"):
        load_config(overrides=["model.background=learned"])
    assert SegConfig.removed_keys == {} and IRNConfig.removed_keys == {}


# --------------------------------------------------------------------------------------------- hash

# What each stage's hash leaves out (the reasons are next to ``not_hashed`` in each class).
NOT_HASHED = {
    Config: {"name", "data.root", "data.label_file", "data.saliency_dir", "data.mask_dir", "data.val_split",
             "data.workers", "data.prefetch", "train.device", "train.log_every", "train.tensorboard", "train.val_every",
             "train.val_scales", "train.checkpoint_every", "train.channels_last", "train.compile", "infer", "eval"},
    SegConfig: {"name", "data.root", "data.mask_dir", "data.gt_dir", "data.label_file", "data.saliency_dir",
                "data.val_split", "data.test_split", "data.workers", "data.prefetch", "train.device", "train.log_every",
                "train.checkpoint_every", "train.channels_last", "infer"},
    IRNConfig: {"name", "device", "ir_label.workers", "train.workers", "train.prefetch", "train.channels_last", "walk"},
}


def _other_value(value, f):
    """A different allowed value of field ``f``."""
    rule = f.metadata.get("rule")
    if rule is not None and rule.choices:
        return next(c for c in rule.choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return [v * 0.5 if isinstance(v, float) else v + 1 for v in value]
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 2 if "int" in str(f.type) else "x"
    return value + "_other"


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_the_hash_covers_every_field_but_the_excluded_ones(root):
    assert set(root.not_hashed) == NOT_HASHED[root]
    names = {name for name, _, _ in _leaves(root())}
    for excluded in root.not_hashed:  # every exclusion names a field or a section
        assert excluded in names or any(n.startswith(excluded + ".") for n in names), excluded
    base = root().hash()
    for name, f, _ in _leaves(root()):
        cfg = root()
        owner = cfg
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        setattr(owner, f.name, _other_value(getattr(owner, f.name), f))
        excluded = any(name == n or name.startswith(n + ".") for n in root.not_hashed)
        assert (cfg.hash() == base) == excluded, name
        assert (changes(root(), cfg) == []) == excluded, name


def test_changes_name_the_deciding_fields_only():
    old, new = Config(), Config()
    new.train.log_every, new.train.device, new.fsae.tau_fae, new.optim.lr = 50, "cpu:0", 0.9, 0.5
    assert changes(old, new) == ["fsae.tau_fae 0.95 -> 0.9", "optim.lr 0.001 -> 0.5"]
    assert "train.log_every 10 -> 50" in changes(old, new, hashed_only=False)
    assert changes(old, new, within="optim") == ["optim.lr 0.001 -> 0.5"]


def test_save_and_from_dict_round_trip(tmp_path):
    for root in ROOTS.values():
        cfg = root()
        path = cfg.save(tmp_path / f"{root.__name__}.yaml")
        again = root.from_dict(yaml.safe_load(path.read_text()), str(path))
        assert again == cfg and again.hash() == cfg.hash()


# ----------------------------------------------------------------------------------------- resume


def _tiny(root) -> Config:
    cfg = tiny32_config(root)
    cfg.train.epochs = 2
    return cfg


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny32_data(tmp_path_factory.mktemp("config_data"), num_train=8, seed=2)


def test_training_resumes_after_a_change_that_does_not_decide_the_weights(tiny_data, tmp_path, capsys,
                                                                          monkeypatch):
    import fsae.train

    recipe = save_config(_tiny(tiny_data), tmp_path / "cfg.yaml")  # 2 epochs of 2 steps
    run = tmp_path / "run"
    real_save = fsae.train.save_checkpoint

    def save_then_ctrl_c(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(fsae.train, "save_checkpoint", save_then_ctrl_c)
    assert cli(["train", str(recipe), "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert f"fsae: interrupted: finished outputs in {run} are kept; rerun `fsae train {recipe} --out {run}` " \
           f"to resume" in err and "Traceback" not in err, err
    monkeypatch.setattr(fsae.train, "save_checkpoint", real_save)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # epoch 1 of 2

    moved = tmp_path / "moved_data"
    shutil.copytree(tiny_data, moved)
    # The first resume trains epoch 2; the others find the run finished and pass the same hash check.
    for extra in (["--set", "train.log_every=50"], ["--set", "infer.batch_size=2"], ["--device", "cpu:0"],
                  ["--set", f"data.root={moved}"], ["--set", "eval.sweep=[0, 0.5, 0.05]"],
                  ["--set", "train.tensorboard=true", "--set", "data.workers=1"]):
        assert cli(["train", str(recipe), "--out", str(run), *extra]) == 0, capsys.readouterr().err
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    capsys.readouterr()

    config_text = (run / "config.yaml").read_text()
    assert cli(["train", str(recipe), "--out", str(run), "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "written by another config (optim.lr 0.001 -> 0.5)" in err and "Traceback" not in err, err
    assert (run / "config.yaml").read_text() == config_text  # a refused start writes nothing


def test_train_checks_every_split_it_reads(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    cfg = _tiny(root)
    assert check_training_data(cfg) == []
    (root / "SegmentationClass" / "val_00002.png").unlink()
    assert check_training_data(cfg) == []  # no held-out evaluation: val is not read
    cfg.data.val_split, cfg.train.val_every = "val", 1
    problems = check_training_data(cfg)
    assert [(p.path, p.message) for p in problems] == [
        (str(root / "SegmentationClass" / "val_00002.png"), "mask file not found")]
    cfg.data.saliency_dir = str(root / "saliency_elsewhere")
    assert str(root / "saliency_elsewhere") in {p.path for p in check_training_data(cfg)}


# ------------------------------------------------------------------------------------- data check


def test_data_check_takes_the_class_count_and_says_out_of_range(tiny_data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    labels_path = root / "cls_labels.json"
    labels = json.loads(labels_path.read_text())
    labels["train_00001"] = [7]
    labels_path.write_text(json.dumps(labels))
    mask_path = root / "SegmentationClass" / "train_00002.png"
    mask = read_mask(mask_path)
    mask[0, 0] = 6
    write_mask(mask_path, mask)

    for argv in (["--num-classes", "4"], []):  # given, or read from the generated set's meta.json
        assert cli(["data", "check", "voc", "--root", str(root), *argv]) == 1
        out = capsys.readouterr().out
        assert "'train_00001': labels [7] are outside 1..4: out of range for 4 classes" in out, out
        assert f"{mask_path}: mask values [6] are outside 0..4 and 255 (ignore): out of range" in out, out
        assert "train_00002' is labelled" not in out  # not reported as a label disagreement
    problems = check_dataset("voc", root, num_classes=20)  # a 20-class reading: 7 and 6 are classes
    assert not any("out of range" in p.message for p in problems)


# ------------------------------------------------------------------------------------------- CRF


def test_one_crf_parameter_class_with_each_stage_values():
    # PSA tool/imutils.py crf_inference: Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, t=10.
    assert PSA_CRF.kwargs() == {"iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0,
                                "bilateral_sxy": 80.0, "bilateral_srgb": 13.0, "bilateral_compat": 10.0}
    # IRN misc/imutils.py crf_inference_label: Gaussian 3/3, bilateral sxy 50 srgb 5 compat 10, t=10.
    assert IRN_LABEL_CRF.kwargs() == {"iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0,
                                      "bilateral_sxy": 50.0, "bilateral_srgb": 5.0, "bilateral_compat": 10.0}
    # DeepLab's CRF (configs/voc/deeplabv2_r101.yaml): Gaussian 1/3, bilateral 67/3/4, t=10.
    assert DEEPLAB_CRF.kwargs() == {"iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0,
                                    "bilateral_sxy": 67.0, "bilateral_srgb": 3.0, "bilateral_compat": 4.0}
    assert SegConfig().infer.crf.kwargs() == DEEPLAB_CRF.kwargs() and SegConfig().infer.crf.enabled
    assert IRNConfig().ir_label.crf_params() == IRN_LABEL_CRF.kwargs()
    assert load_irn_config(REPO / "configs/voc/irn.yaml").ir_label.crf == IRN_LABEL_CRF
    with pytest.raises(ValueError, match=r"unknown CRF parameter\(s\) \['sigma'\]"):
        CrfParams.from_kwargs(sigma=1.0)


# ------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "b.json", {"a": 1}),
                 write_mask(tmp_path / "c.png", np.zeros((4, 4), np.uint8))]
    finally:
        os.umask(old)
    for path in paths:
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------- orphan workers

POOL = """
import os, time
from fsae.parallel import map_jobs

if __name__ == "__main__":  # spawned workers import this file too
    print(os.getpid(), flush=True)
    map_jobs(time.sleep, [60.0] * 4, workers=2, progress=False)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        pid = int(parent.stdout.readline())
        deadline = time.time() + 60
        while time.time() < deadline:
            workers = [c for c in child_pids(pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, workers
        time.sleep(1.0)  # the workers are inside time.sleep(60)
        assert all(alive(w) for w in workers) and parent.poll() is None
        os.kill(pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 5
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "pool workers outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in workers:  # a failed run leaves them behind
            if alive(w):
                os.kill(w, signal.SIGKILL)
