"""Run-directory choices of the CLI: `fsae cam --checkpoint best|last|PATH`, `fsae crf --threshold best`."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsae.cli import main as cli
from fsae.stamps import file_digest, read_stamp

REPO = Path(__file__).resolve().parents[1]


def _tiny_run(tiny32, run: Path, epochs: int = 2, val_every: int = 1) -> Path:
    sets = {"data.root": tiny32, "train.epochs": epochs, "train.batch_size": 8, "model.width": 8,
            "data.crop_size": 32, "data.long_side": "null", "fsae.start_epoch": 0, "infer.scales": "[1.0]",
            "train.val_every": val_every}
    overrides = [f"--set={k}={v}" for k, v in sets.items()]
    assert cli(["train", str(REPO / "configs/synthetic/cam_fsae.yaml"), "--out", str(run), *overrides]) == 0
    return run


@pytest.fixture(scope="module")
def run(tiny32, tmp_path_factory):
    return _tiny_run(tiny32, tmp_path_factory.mktemp("cli_run") / "run")




@pytest.mark.parametrize("which", ["best", "last"])
def test_cam_checkpoint_by_name_uses_that_file(run, which):
    ckpt = run / "checkpoints" / f"{which}.pt"
    assert ckpt.is_file()
    out = run / f"seeds_{which}"
    assert cli(["cam", str(run), "--checkpoint", which, "--out", str(out)]) == 0
    stamp = json.dumps(read_stamp(out))
    assert file_digest(ckpt) in stamp
    # the same seeds as naming the file itself
    by_path = run / f"seeds_{which}_path"
    assert cli(["cam", str(run / "config.yaml"), "--checkpoint", str(ckpt), "--out", str(by_path)]) == 0
    for seed in sorted(out.glob("*.npz")):
        a, b = np.load(seed), np.load(by_path / seed.name)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_cam_default_is_last(run):
    assert cli(["cam", str(run), "--out", str(run / "seeds_default")]) == 0
    assert file_digest(run / "checkpoints" / "last.pt") in json.dumps(read_stamp(run / "seeds_default"))


def test_cam_best_without_heldout_evaluation_is_a_clear_error(tiny32, tmp_path, capsys):
    run = _tiny_run(tiny32, tmp_path / "noval", epochs=1, val_every=0)
    capsys.readouterr()
    assert cli(["cam", str(run), "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err
    assert "best.pt" in err and "val_every" in err and "Traceback" not in err
    assert cli(["cam", str(run / "config.yaml")]) == 2
    assert "--checkpoint PATH" in capsys.readouterr().err


def test_crf_threshold_best_reads_the_run_evaluation(run, tiny32, capsys):
    assert cli(["cam", str(run)]) == 0
    capsys.readouterr()
    assert cli(["crf", str(run), "--threshold", "best", "--workers", "1"]) == 2  # no evaluation yet
    err = capsys.readouterr().err
    assert "eval" in err and "seeds.json" in err and "Traceback" not in err
    evals = run / "eval" / "seeds.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(Path(tiny32) / "SegmentationClass"),
                "--num-classes", "4", "--sweep", "0", "0.6", "0.05", "--out", str(evals)]) == 0
    best = json.loads(evals.read_text())["best"]["threshold"]
    assert cli(["crf", str(run), "--threshold", "best", "--workers", "1"]) == 0
    assert f"threshold {best:g}" in capsys.readouterr().out
    # the same masks as passing that threshold by hand
    assert cli(["crf", str(run), "--threshold", repr(best), "--workers", "1", "--out", str(run / "crf_hand")]) == 0
    masks = sorted((run / "crf").glob("*.png"))
    assert masks
    for mask in masks:
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(run / "crf_hand" / mask.name)))


def test_seg_train_on_a_generated_sets_ground_truth_needs_allow_gt(tiny32, tmp_path, capsys):
    """The generated set's true masks are refused as pseudo-masks like any data set's (no meta.json exemption);
    --allow-gt trains the upper-bound run and the checkpoint records it."""
    import torch

    sets = {"data.root": tiny32, "model.backbone": "tinycnn", "model.width": 8, "model.weights": "null",
            "model.freeze_bn": "false", "model.aspp_rates": "[1,2,3,4]", "data.crop_size": 32, "data.workers": 0,
            "train.iterations": 2, "train.batch_size": 2, "train.checkpoint_every": 2, "train.device": "cpu"}
    argv = ["seg", "train", str(REPO / "configs/synthetic/deeplabv2_r18.yaml"), "--masks",
            str(Path(tiny32) / "SegmentationClass"), "--out", str(tmp_path / "run"),
            *(f"--set={k}={v}" for k, v in sets.items())]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "ground-truth folder" in err and "--allow-gt" in err and not (tmp_path / "run").exists()
    assert cli([*argv, "--allow-gt"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["allow_gt"] is True
