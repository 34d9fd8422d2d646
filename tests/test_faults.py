"""Never lose work: SIGKILL mid-run then resume (train, cam, crf); NaN steps skipped; bad inputs named.

The SIGKILL runs are real ``fsae`` subprocesses that kill themselves (``os.kill(getpid(), SIGKILL)``: no
cleanup, no ``finally``) at a fixed point: while an output file is half written (its temp file exists,
the rename has not happened), so the test lands mid-run on every machine, however fast.
"""

import csv
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsae.cli import main as cli
from fsae.config import Config, save_config
from fsae.io import read_mask, write_mask
from fsae.methods.cam import CAM
from fsae.train import train
from tests.conftest import run_fsae, tiny32_config, tiny32_data

REPO = Path(__file__).resolve().parents[1]

def tiny_data(root: Path) -> Path:
    """16 train / 4 val images of 32 x 32 px in the VOC layout."""
    return tiny32_data(root)


def tiny_config(root) -> Config:
    cfg = tiny32_config(root)
    cfg.fsae.enabled, cfg.fsae.start_epoch = True, 0
    cfg.infer.scales = [1.0, 0.5]
    return cfg


def run_killed(tmp_path: Path, target: str, n: int, *fsae_args: str) -> subprocess.CompletedProcess:
    """``fsae FSAE_ARGS`` SIGKILLed in the n-th call of ``target`` (an atomic_write), mid-write."""
    proc = run_fsae(*fsae_args, killed_at=(target, n), tmp=tmp_path, timeout=600)
    assert proc.returncode == -9, f"expected death by SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def array_digest(path: Path) -> str:
    """Hash of a seed file's arrays (np.savez stamps the zip members with the write time)."""
    with np.load(path) as data:
        return hashlib.sha256(b"".join(data[k].tobytes() for k in sorted(data.files))).hexdigest()


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("fault_run") / "run"
    train(tiny_config(data_root), run, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its seeds are compared with those of OMP_NUM_THREADS=1 subprocesses
    try:
        assert cli(["cam", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# ---------------------------------------------------------------------------------------- SIGKILL


def test_training_killed_mid_epoch_resumes_to_the_same_weights(data_root, tmp_path, one_thread):
    cfg = tiny_config(data_root)
    cfg.train.epochs, cfg.train.checkpoint_every, cfg.train.deterministic = 3, 3, True
    straight = torch.load(train(cfg, tmp_path / "straight", progress=False), weights_only=True)
    assert straight["step"] == 12  # 4 steps an epoch; checkpoints at steps 3, 4, 6, 8, 9, 12

    save_config(cfg, tmp_path / "cfg.yaml")
    run = tmp_path / "killed"
    # Killed while writing the 4th checkpoint (step 8): last.pt still holds step 6, mid-epoch 2.
    run_killed(tmp_path, "fsae.train.atomic_write", 4, "train", str(tmp_path / "cfg.yaml"), "--out", str(run))
    left = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert left["step"] == 6 and left["epoch"] == 1
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".last.pt")]  # the half write
    with open(run / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))  # logged past the checkpoint

    resumed = torch.load(train(cfg, run, progress=False), weights_only=True)
    assert resumed["step"] == 12
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key], value, rtol=0, atol=0)
    # The logs continue where the checkpoint was: rows 7 and 8 of the killed run are not doubled.
    assert (run / "metrics.csv").read_text() == (tmp_path / "straight" / "metrics.csv").read_text()
    with open(run / "epochs.csv") as f:
        assert [(r["epoch"], r["step"]) for r in csv.DictReader(f)] == [("1", "4"), ("2", "8"), ("3", "12")]


def test_cam_killed_mid_write_resumes_to_the_same_seeds(trained_run, tmp_path, one_thread):
    out = tmp_path / "seeds"
    run_killed(tmp_path, "fsae.seeds.atomic_write", 6, "cam", str(trained_run), "--out", str(out))
    done = outputs(out, ".npz")
    assert len(done) == 5 and all(array_digest(p) for p in done)  # five whole files, none half written
    assert len(list(out.glob(".*"))) == 1  # the sixth is only a hidden temp file
    assert cli(["cam", str(trained_run), "--out", str(out)]) == 0
    expected = outputs(trained_run / "seeds", ".npz")
    assert [p.name for p in outputs(out, ".npz")] == [p.name for p in expected] and len(expected) == 16
    for path in expected:
        assert array_digest(out / path.name) == array_digest(path), path.name


def test_crf_killed_mid_write_resumes_to_the_same_masks(trained_run, data_root, tmp_path):
    common = ["--seeds", str(trained_run / "seeds"), "--images", str(data_root / "JPEGImages"),
              "--threshold", "0.3", "--workers", "1"]
    assert cli(["crf", *common, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "crf"
    # the 5th write: the first is the folder's stamp (fsae.stamps), then three whole PNGs
    run_killed(tmp_path, "fsae.io.atomic_write", 5, "crf", *common, "--out", str(out))
    assert len(outputs(out, ".png")) == 3 and len(list(out.glob(".*"))) == 1
    assert cli(["crf", *common, "--out", str(out)]) == 0
    one = {p.name: p.read_bytes() for p in outputs(tmp_path / "straight", ".png")}
    two = {p.name: p.read_bytes() for p in outputs(out, ".png")}
    assert len(one) == 16 and one == two


# ---------------------------------------------------------------------------------------- NaN / Inf


def test_skip_nonfinite_counts_skipped_steps_and_leaves_the_weights(data_root, tmp_path, monkeypatch):
    cfg = tiny_config(data_root)
    cfg.train.epochs, cfg.train.batch_size = 2, 8  # 2 steps an epoch
    saved = {}
    real_save = __import__("fsae.train", fromlist=["save_checkpoint"]).save_checkpoint

    def keep(path, state):
        saved[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}
        real_save(path, state)

    monkeypatch.setattr("fsae.train.save_checkpoint", keep)
    train(cfg, tmp_path / "clean", progress=False)

    original, calls = CAM.losses, []

    def nan_in_epoch_two(self, batch, output):
        calls.append(1)
        terms = original(self, batch, output)
        if len(calls) > 2:  # every step of the second epoch
            terms["cls"] = terms["cls"] * float("inf")
        return terms

    monkeypatch.setattr(CAM, "losses", nan_in_epoch_two)
    cfg.train.skip_nonfinite = True
    final = torch.load(train(cfg, tmp_path / "skipping", progress=False), weights_only=True)
    with open(tmp_path / "skipping" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["skipped"] for r in rows] == ["0", "0", "1", "2"] and final["skipped"] == 2
    assert rows[-1]["loss"] == "inf"  # logged as it was
    # No update after epoch one: the parameters are those of the clean run's first epoch (same steps, same
    # learning rates); BatchNorm running statistics still move, the forward passes did happen.
    params = {name for name, _ in CAM(4, width=8, output_stride=8).named_parameters()}
    for name in params:
        torch.testing.assert_close(final["model"][name], saved[1][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- bad inputs


def _corrupt_jpeg(root):
    path = root / "JPEGImages" / "train_00005.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    return path, "cannot read image"


def _truncated_png(root):
    path = root / "SegmentationClass" / "train_00006.png"
    path.write_bytes(path.read_bytes()[:60])
    return path, "cannot read mask"


def _label_vector(root):
    path = root / "cls_labels.json"
    labels = json.loads(path.read_text())
    labels["train_00003"] = [0, 1, 0, 0]  # a multi-hot vector instead of class numbers
    path.write_text(json.dumps(labels))
    return path, "train_00003"


def _mask_value(root):
    path = root / "SegmentationClass" / "train_00007.png"
    mask = read_mask(path)
    mask[0, 0] = 9
    write_mask(path, mask)
    return path, "[9] are outside 0..4"


def _empty_list(root):
    path = root / "ImageSets" / "Segmentation" / "train.txt"
    path.write_text("\n")
    return path, "image list is empty"


def _file_in_the_way(root):
    blocker = root.parent / "blocker"
    blocker.write_text("a file where the output folder should go")
    return blocker / "out", "cannot create the output folder"


def _read_only_folder(root):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = root.parent / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "out", "cannot create the output folder"


def _stage_command(stage, run, root, out, tmp_path):
    """The CLI call of ``stage`` on the (damaged) data set ``root``, writing to ``out``."""
    ids = root / "ImageSets" / "Segmentation" / "train.txt"
    if stage == "train":
        save_config(tiny_config(root), tmp_path / "cfg.yaml")
        return ["train", str(tmp_path / "cfg.yaml"), "--out", str(out)]
    if stage == "cam":
        return ["cam", str(run), "--out", str(out), "--set", f"data.root={root}"]
    if stage == "crf":
        return ["crf", "--seeds", str(run / "seeds"), "--images", str(root / "JPEGImages"), "--out", str(out),
                "--ids", str(ids), "--threshold", "0.3", "--workers", "1"]
    return ["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"), "--ids", str(ids),
            "--num-classes", "4", "--out", str(out / "eval.json")]


def _damaged(stage, damage):
    """A row from a damage of the data set (or of the output folder) and the stage that meets it."""

    def build(ctx):
        path, words = damage(ctx.root)
        out = path if path.name == "out" else ctx.out  # the damage is to the output folder
        return _stage_command(stage, ctx.run, ctx.root, out, ctx.tmp), out, [str(path), words]

    return build


def _seg_recipe(ctx):
    """A DeepLab recipe on a width-8 tinycnn over the tiny data set."""
    from fsae.segment.config import SegConfig

    cfg = SegConfig()
    cfg.data.root, cfg.data.num_classes, cfg.data.mask_dir, cfg.data.crop_size = str(ctx.root), 4, "SegmentationClass", 32
    cfg.model.backbone, cfg.model.width, cfg.model.weights = "tinycnn", 8, None
    cfg.train.iterations, cfg.train.batch_size = 2, 2
    cfg.save(ctx.tmp / "seg.yaml")
    return str(ctx.tmp / "seg.yaml")


def _train(*extra, device=None):
    def build(ctx):
        save_config(tiny_config(ctx.root), ctx.tmp / "cfg.yaml")
        argv = ["train", str(ctx.tmp / "cfg.yaml"), "--out", str(ctx.out), *extra]
        return argv + (["--device", device] if device else []), ctx.out, []
    return build


def _setting(command, key_value, *words):
    """``fsae COMMAND ... --set KEY=VALUE`` for train, seg train and irn; the message names KEY and ``words``."""

    def build(ctx):
        if command == "train":
            argv, out, _ = _train("--set", key_value)(ctx)
        elif command == "seg":
            argv, out = ["seg", "train", _seg_recipe(ctx), "--out", str(ctx.out), "--allow-gt", "--set", key_value], ctx.out
        else:
            out = ctx.tmp / "irn_run"
            argv = ["irn", str(out), "--set", key_value]
        return argv, out, [key_value.split("=")[0], *words]

    return build


def _device(command, device):
    def build(ctx):
        if command == "train":
            argv, out, _ = _train(device=device)(ctx)
        elif command == "cam":
            out = ctx.out
            argv = ["cam", str(ctx.run), "--out", str(out), "--device", device]
        elif command == "irn":
            out = ctx.tmp / "irn_run"
            argv = ["irn", str(out), "--device", device]
        elif command == "seg train":
            out = ctx.out
            argv = ["seg", "train", _seg_recipe(ctx), "--out", str(out), "--allow-gt", "--device", device]
        else:
            out = ctx.out
            argv = ["seg", "infer", _seg_recipe(ctx), "--checkpoint", str(ctx.tmp / "none.pt"), "--out", str(out),
                    "--device", device]
        return argv, out, ["--device", repr(device)]

    return build


def _plain(*argv_words, out_name="out", words=()):
    """A fixed command line; ``{out}``, ``{run}``, ``{root}`` filled in."""

    def build(ctx):
        fill = {"out": ctx.tmp / out_name, "run": ctx.run, "root": ctx.root}
        argv = [a.format(**fill) for a in argv_words]
        return argv, ctx.tmp / out_name, list(words)

    return build


def _missing_val_mask(ctx):
    path = ctx.root / "SegmentationClass" / "val_00001.png"
    path.unlink()
    cfg = tiny_config(ctx.root)
    cfg.data.val_split, cfg.train.val_every = "val", 1
    save_config(cfg, ctx.tmp / "cfg.yaml")
    return ["train", str(ctx.tmp / "cfg.yaml"), "--out", str(ctx.out)], ctx.out, [str(path), "mask file not found"]


def _resume_after_deciding_change(ctx):
    run = ctx.tmp / "run"
    shutil.copytree(ctx.run, run)
    save_config(tiny_config(ctx.data_root), ctx.tmp / "cfg.yaml")
    argv = ["train", str(ctx.tmp / "cfg.yaml"), "--out", str(run), "--set", "fsae.tau_fae=0.9"]
    return argv, run, ["written by another config", "fsae.tau_fae 0.95 -> 0.9"]


def _cam_model_mismatch(ctx):
    argv = ["cam", str(ctx.run), "--out", str(ctx.out), "--set", "model.width=16"]
    return argv, ctx.out, ["model differs", "model.width 8 -> 16"]


def _out_is_a_folder(command):
    """``--out`` an existing folder, for the commands that write one file (issue 32)."""

    def build(ctx):
        out = ctx.tmp / "existing"
        out.mkdir()
        if command == "eval":
            argv = ["eval", "--seeds", str(ctx.run / "seeds"), "--gt", str(ctx.root / "SegmentationClass"),
                    "--num-classes", "4", "--out", str(out)]
        elif command == "report":
            argv = ["report", str(ctx.run), "--no-compute", "--out", str(out)]
        else:
            argv = ["compare", str(ctx.run), "--no-compute", "--out", str(out)]
        return argv, out, [str(out), "is a folder"]

    return build


def _eval_out_foreign_file(ctx):
    out = ctx.tmp / "mine"
    out.mkdir()
    (out / "notes.json").write_text('{"my": "notes"}')
    argv = ["eval", "--seeds", str(ctx.run / "seeds"), "--gt", str(ctx.root / "SegmentationClass"), "--num-classes",
            "4", "--out", str(out / "notes.json")]
    return argv, out, [str(out / "notes.json"), "not an fsae evaluation", "not overwritten"]


def _deeplab_checkpoint_to_cam(ctx):
    torch.save({"kind": "segmentation", "model": {}, "config": {"data": {"test_split": "test"}}, "iteration": 1},
               ctx.tmp / "deeplab.pt")
    argv = ["cam", str(ctx.run), "--checkpoint", str(ctx.tmp / "deeplab.pt"), "--out", str(ctx.out)]
    return argv, ctx.out, ["a DeepLab checkpoint", "`fsae seg infer` takes it"]


def _cam_checkpoint_to_seg_infer(ctx):
    argv = ["seg", "infer", _seg_recipe(ctx), "--checkpoint", str(ctx.run / "checkpoints" / "last.pt"),
            "--out", str(ctx.out)]
    return argv, ctx.out, ["a CAM checkpoint", "`fsae cam` takes it"]


def _truncated_checkpoint(ctx):
    run = ctx.tmp / "run"
    shutil.copytree(ctx.run, run)
    path = run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return ["cam", str(run), "--out", str(ctx.out)], ctx.out, [str(path), "truncated or corrupt", "--no-resume"]


def _wrong_size_first_mask(ctx):
    first = (ctx.root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    write_mask(ctx.root / "SegmentationClass" / f"{first}.png", np.zeros((5, 7), np.uint8))
    argv = ["cam", str(ctx.run), "--out", str(ctx.out), "--set", f"data.root={ctx.root}"]
    return argv, ctx.out, [f"{first}.png", "differs from image size"]


def _seg_train_on_ground_truth(ctx):
    (ctx.root / "meta.json").unlink()  # a data set of one's own, not a generated one
    argv = ["seg", "train", _seg_recipe(ctx), "--out", str(ctx.out)]
    return argv, ctx.out, ["ground-truth folder", "--allow-gt"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
SYNTHETIC = ["data", "synthetic", "{out}", "--train", "2", "--val", "1"]
EVAL = ["eval", "--seeds", "{run}/seeds", "--gt", "{root}/SegmentationClass", "--num-classes", "4",
        "--out", "{out}/eval.json"]
CRF = ["crf", "--seeds", "{run}/seeds", "--images", "{root}/JPEGImages", "--out", "{out}", "--threshold", "0.3"]

# (id, build(ctx) -> (argv, output folder, words the one-line message must hold), fails before any output)
BAD_INPUTS = [
    *[pytest.param(_damaged(stage, damage), fresh, id=f"{stage}-{damage.__name__[1:]}") for stage, damage, fresh in [
        ("train", _corrupt_jpeg, False), ("train", _truncated_png, False), ("train", _label_vector, True),
        ("train", _mask_value, False), ("train", _empty_list, True), ("train", _file_in_the_way, True),
        ("train", _read_only_folder, True),
        ("cam", _corrupt_jpeg, False), ("cam", _label_vector, True), ("cam", _empty_list, True),
        ("cam", _file_in_the_way, True),
        ("crf", _corrupt_jpeg, False), ("crf", _empty_list, True), ("crf", _file_in_the_way, True),
        ("crf", _read_only_folder, True),
        ("eval", _truncated_png, False), ("eval", _mask_value, False), ("eval", _empty_list, True),
        ("eval", _file_in_the_way, True),
    ]],
    # Values checked, not only types (#18): each names the field, the value and what is allowed.
    pytest.param(_setting("train", "fsae.enabled=maybe", "'maybe'", "true or false"), True, id="set-fsae.enabled=maybe"),
    pytest.param(_setting("train", "train.epochs=-1", "-1", "an integer (>= 1)"), True, id="set-epochs=-1"),
    pytest.param(_setting("train", "train.epochs=1.5", "1.5", "an integer (>= 1)"), True, id="set-epochs=1.5"),
    pytest.param(_setting("train", "train.batch_size=0", "= 0", ">= 1"), True, id="set-batch_size=0"),
    pytest.param(_setting("train", "optim.lr=-1", "-1", "> 0"), True, id="set-lr=-1"),
    pytest.param(_setting("train", "model.method=foo", "'foo'", "cam, eps, ppc, sipe, mctformer"), True, id="set-method=foo"),
    pytest.param(_setting("train", "model.backbone=resnet999", "'resnet999'", "timm model"), True, id="set-backbone=resnet999"),
    pytest.param(_setting("train", "data.crop_size=0", ">= 1"), True, id="set-crop_size=0"),
    pytest.param(_setting("train", "fsae.tau_fae=1.5", "1.5", ">= 0 and <= 1"), True, id="set-tau_fae=1.5"),
    pytest.param(_setting("train", "optim.name=rmsprop", "sgd, adam, adamw"), True, id="set-optim=rmsprop"),
    pytest.param(_setting("train", "data.kind=pascal", "voc, coco"), True, id="set-kind=pascal"),
    pytest.param(_setting("train", "data.long_side=[512]", "2 items"), True, id="set-long_side=[512]"),
    pytest.param(_setting("train", "eval.sweep=[0, 0.6, 0]", "step > 0"), True, id="set-sweep-step-0"),
    pytest.param(_setting("train", "fsae.kernel_size=4", "odd"), True, id="set-kernel_size=4"),
    pytest.param(_setting("train", "train.epoch=3", "unknown config key"), True, id="set-unknown-key"),
    pytest.param(_setting("seg", "train.iterations=0", ">= 1"), True, id="seg-set-iterations=0"),
    pytest.param(_setting("seg", "model.arch=deeplabv3", "deeplabv2, deeplabv1"), True, id="seg-set-arch"),
    pytest.param(_setting("seg", "data.scale_range=[1.5, 0.5]", "low <= high"), True, id="seg-set-reversed-scale_range"),
    pytest.param(_setting("seg", "model.backbone=resnet999", "timm model"), True, id="seg-set-backbone=resnet999"),
    pytest.param(_setting("irn", "train.crop_size=100", "multiple of 16"), True, id="irn-set-crop_size=100"),
    pytest.param(_setting("irn", "ir_label.gt_prob=1.5", "> 0 and < 1"), True, id="irn-set-gt_prob=1.5"),
    pytest.param(_setting("irn", "ir_label.crf.iterations=-1", ">= 0"), True, id="irn-set-crf-iterations=-1"),
    # A device this machine does not have (#18 section 3), in every stage that takes --device.
    pytest.param(_device("train", "cuda"), True, id="train-device-cuda", marks=NO_CUDA),
    pytest.param(_device("train", "gpu"), True, id="train-device-gpu"),
    pytest.param(_device("train", "mps"), True, id="train-device-mps", marks=NO_MPS),
    pytest.param(_device("cam", "cuda"), True, id="cam-device-cuda", marks=NO_CUDA),
    pytest.param(_device("irn", "cuda"), True, id="irn-device-cuda", marks=NO_CUDA),
    pytest.param(_device("seg train", "cuda"), True, id="seg-train-device-cuda", marks=NO_CUDA),
    pytest.param(_device("seg infer", "gpu"), True, id="seg-infer-device-gpu"),
    # Flags checked before any work.
    pytest.param(_plain(*EVAL, "--sweep", "0", "0.6", "0", words=["--sweep", "step > 0"]), True, id="eval-sweep-step-0"),
    pytest.param(_plain(*EVAL, "--sweep", "0.6", "0", "0.01", words=["--sweep", "start <= stop"]), True,
                 id="eval-sweep-reversed"),
    pytest.param(_plain(*EVAL, "--threshold", "1.5", words=["--threshold", "[0, 1]"]), True, id="eval-threshold"),
    pytest.param(_plain(*CRF, "--workers", "0", words=["--workers 0", ">= 1"]), True, id="crf-workers-0"),
    pytest.param(_plain(*SYNTHETIC, "--size", "8", words=["--size 8", ">= 39"]), True, id="synthetic-size-8"),
    pytest.param(_plain(*SYNTHETIC, "--classes", "0", words=["--classes 0", ">= 1"]), True, id="synthetic-classes-0"),
    pytest.param(_plain("data", "synthetic", "{out}", "--train", "-5", words=["--train -5", ">= 1"]), True,
                 id="synthetic-train-5"),
    pytest.param(_plain("data", "check", "voc", "--root", "{root}", "--num-classes", "0", words=["num_classes = 0"]),
                 True, id="data-check-classes-0"),
    # Every split the run reads is checked before it starts; a refused resume names the change.
    pytest.param(_missing_val_mask, True, id="train-missing-val-mask"),
    pytest.param(_resume_after_deciding_change, True, id="train-resume-after-deciding-change"),
    pytest.param(_cam_model_mismatch, True, id="cam-model-mismatch"),
    # Issue 32: --out a folder or a file fsae did not write; checkpoints of the wrong kind or truncated; a stage
    # that stops before its first output leaves no (stamped) folder; the ground truth as DeepLab's masks.
    *[pytest.param(_out_is_a_folder(c), True, id=f"{c}-out-is-a-folder") for c in ("eval", "report", "compare")],
    pytest.param(_eval_out_foreign_file, True, id="eval-out-foreign-file"),
    pytest.param(_deeplab_checkpoint_to_cam, True, id="cam-deeplab-checkpoint"),
    pytest.param(_cam_checkpoint_to_seg_infer, True, id="seg-infer-cam-checkpoint"),
    pytest.param(_truncated_checkpoint, True, id="cam-truncated-checkpoint"),
    pytest.param(_wrong_size_first_mask, True, id="cam-wrong-size-mask-no-empty-seeds"),
    pytest.param(_seg_train_on_ground_truth, True, id="seg-train-on-ground-truth"),
]


class _Context:
    def __init__(self, tmp, data_root, run):
        self.tmp, self.data_root, self.run = tmp, data_root, run
        self.root = tmp / "data"
        self.out = tmp / "out"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder``: (size, mtime) by relative path; {} when there is no folder."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def _whole(path: Path) -> None:
    if path.suffix == ".png":
        Image.open(path).load()
    elif path.suffix == ".npz":
        array_digest(path)
    elif path.suffix == ".json":
        json.loads(path.read_text())


@pytest.mark.parametrize("build, fresh", BAD_INPUTS)
def test_bad_input_stops_with_one_line_and_leaves_nothing(build, fresh, trained_run, data_root, tmp_path, capsys):
    """Exit code 2, one ``fsae: error:`` line holding the words, no traceback; nothing half written in the
    output folder, and for a failure before the stage starts nothing new at all."""
    ctx = _Context(tmp_path, data_root, trained_run)
    shutil.copytree(data_root, ctx.root)
    argv, out, words = build(ctx)
    before = _files(out)
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("fsae: error:") == 1 and "Traceback" not in err, err
    message = err[err.index("fsae: error:"):]  # after any progress bar
    assert all(w in message for w in words), message
    if "is not allowed" in message:  # a value refused: the message says what is allowed
        assert "expected" in message, message
    after = _files(out)
    assert not [name for name in after if Path(name).name.startswith(".")], after  # no temp file left
    for name in after:
        _whole(out / name)
    if fresh:
        assert after == before, sorted(set(after) ^ set(before))


def test_resume_refusal_names_the_changed_fields():
    from fsae.train import config_changes

    saved = Config().to_dict()
    cfg = Config()
    cfg.name, cfg.fsae.tau_fae, cfg.train.epochs = "other name", 0.9, 4
    assert config_changes(saved, cfg) == "fsae.tau_fae 0.95 -> 0.9, train.epochs 15 -> 4"
    cfg.optim.lr, cfg.optim.momentum, cfg.data.crop_size = 0.5, 0.5, 16
    assert config_changes(saved, cfg, limit=2) == ("data.crop_size 128 -> 16, fsae.tau_fae 0.95 -> 0.9, ... "
                                                   "(5 fields)")
