"""The README's quickstart, run as written: the generated-set commands are read from README.md, so a
change of the CLI that breaks them fails here. The fast test appends tiny overrides to each command
(later flags win in argparse); the slow one runs them unchanged."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### By hand on the generated set"

# Appended to the README's commands in the fast variant: 16 + 4 images of 64 px, one epoch, a few iterations.
TINY = {
    "data synthetic": ["--train", "16", "--val", "4", "--size", "64"],
    "train": ["--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "model.width=8",
              "--set", "data.crop_size=64", "--set", "data.long_side=null", "--set", "fsae.start_epoch=0",
              "--set", "infer.scales=[1.0]", "--set", "eval.sweep=[0,0.6,0.05]"],
    "crf": ["--workers", "1"],
    "irn": ["--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.crop_size=64",
            "--set", "walk.exp_times=2"],
    "seg train": ["--set", "train.iterations=2", "--set", "train.batch_size=2", "--set", "data.crop_size=64",
                  "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"],
    "seg infer": ["--set", "infer.scales=[1.0]"],
}


def quickstart_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The ``fsae ...`` lines of the first ```bash block under the quickstart's generated-set heading."""
    text = readme.read_text()
    assert HEADING in text, f"README.md has no '{HEADING}' section"
    block = text.split(HEADING, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("fsae ")]


def _stage(argv: list[str]) -> str:
    return " ".join(argv[1:3]) if argv[1] in ("data", "seg") else argv[1]


def _run_all(tmp_path: Path, tiny: bool) -> list[str]:
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # a fresh checkout: the recipes, nothing else
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outputs = []
    for argv in quickstart_commands():
        extra = TINY.get(_stage(argv), []) if tiny else []
        result = subprocess.run([sys.executable, "-m", "fsae", *argv[1:], *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    return outputs


def test_quickstart_covers_the_pipeline():
    stages = [_stage(argv) for argv in quickstart_commands()]
    assert stages == ["data synthetic", "train", "cam", "eval", "crf", "irn", "seg train", "seg infer", "report"]
    assert set(TINY) <= set(stages)


def test_quickstart_commands_run_verbatim_tiny(tmp_path):
    outputs = _run_all(tmp_path, tiny=True)
    run = tmp_path / "runs" / "quick"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "eval" / "seeds.json").is_file()
    assert len(list((run / "seeds").glob("*.npz"))) == 16 and len(list((run / "crf").glob("*.png"))) == 16
    assert len(list((run / "irn_masks").glob("*.png"))) == 16
    assert (run / "report.html").is_file()
    assert "threshold" in outputs[4] and "pseudo-masks:" in outputs[4]
    assert "mIoU" in outputs[7] or "miou" in outputs[7].lower()


@pytest.mark.slow
def test_quickstart_commands_run_verbatim(tmp_path):
    _run_all(tmp_path, tiny=False)
    assert (tmp_path / "runs" / "quick" / "report.html").is_file()
