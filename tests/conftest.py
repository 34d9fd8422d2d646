import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from fsae.data.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A small generated data set in the VOC layout (shared by the pipeline tests)."""
    root = tmp_path_factory.mktemp("synthetic")
    # a strong body grating (as the former default): the pipeline tests need a set a tiny net learns in a few steps
    spec = SyntheticSpec(num_train=24, num_val=8, image_size=64, body_axes=(10.0, 16.0), part_radius=(2.5, 3.5),
                         stripe_period=(6.0, 9.0), stripe_amplitude=(0.12, 0.2), seed=3)
    return generate(root, spec, progress=False), spec


# The 32 px set of the distributed and fault tests: 16 train / 4 val images in the VOC layout.
TINY32 = dict(num_val=4, image_size=32, body_axes=(6.0, 9.0), part_radius=(1.5, 2.5), stripe_period=(4.0, 6.0),
              clutter_axes=(3.0, 5.0), seed=1)


def tiny32_data(root, num_train: int = 16, seed: int = 1):
    return generate(root, SyntheticSpec(num_train=num_train, **{**TINY32, "seed": seed}), progress=False)


def tiny32_config(root):
    """A 1-epoch CAM recipe on a ``tiny32_data`` set: width-8 tinycnn, batch 4, every step logged, no held-out
    evaluation, no TensorBoard (the fault, config and DDP tests start from it)."""
    from fsae.config import Config

    cfg = Config()
    cfg.data.root, cfg.data.num_classes, cfg.data.crop_size, cfg.data.long_side = str(root), 4, 32, None
    cfg.data.val_split = ""
    cfg.model.width = 8
    cfg.train.epochs, cfg.train.batch_size, cfg.train.log_every = 1, 4, 1
    cfg.train.val_every, cfg.train.tensorboard = 0, False
    return cfg


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory):
    """``tiny32_data`` generated once per session."""
    return tiny32_data(tmp_path_factory.mktemp("tiny32"))


@pytest.fixture
def one_thread():
    """One intra-op thread: the float summation order of the OMP_NUM_THREADS=1 subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def check_seg_recipe():
    """``check(recipe, table)``: the segmentation recipe ``recipe`` (a path under the repository) writes
    exactly the dotted fields of ``table``, and loads to the table's values (floats approximately)."""
    from fsae.settings import _flat
    from fsae.segment.config import load_seg_config

    def check(recipe: str, table: dict) -> None:
        written = _flat(yaml.safe_load((REPO / recipe).read_text()))  # {dotted key: value}
        assert sorted(written) == sorted(table)  # every field of the file is in the table, and back
        cfg = load_seg_config(REPO / recipe)
        for key, expected in table.items():
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            assert value == (pytest.approx(expected) if isinstance(expected, float) else expected), key

    return check


@pytest.fixture
def train_killed_after_epoch(monkeypatch):
    """``kill(cfg, run_dir, epoch, calls=None)``: ``fsae.train.train`` stopped by a KeyboardInterrupt right after it
    saved epoch ``epoch``'s checkpoint (a killed run); ``calls`` collects the epochs saved. The real save is back
    afterwards, so the next ``train`` resumes."""
    import fsae.train as train_module

    real_save = train_module.save_checkpoint

    def kill(cfg, run_dir, epoch, calls=None):
        def save_then_die(path, state):
            real_save(path, state)
            if calls is not None:
                calls.append(state["epoch"])
            if state["epoch"] == epoch:
                raise KeyboardInterrupt(f"killed after epoch {epoch}")

        monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(cfg, run_dir, progress=False)
        monkeypatch.setattr(train_module, "save_checkpoint", real_save)

    return kill


# ------------------------------------------------------------------ training runs: logged rows, a NaN injected


def metric_rows(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.csv`` as dicts of strings."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def logged_steps(cfg, num_train: int) -> list[int]:
    """The ``step`` column a finished single-process run writes: every ``train.log_every``-th step and the last,
    of ``epochs * (num_train // batch_size)`` steps (the loader drops the last partial batch)."""
    total = cfg.train.epochs * (num_train // cfg.train.batch_size)
    return [s for s in range(1, total + 1) if s % cfg.train.log_every == 0 or s == total]


def assert_finished_without_nan(run_dir, cfg, num_train: int) -> list[dict]:
    """Every step of the run was logged (the non-finite guard raises before a NaN step's row, so the rows that
    exist are finite by construction: what can fail is a missing row) and every logged loss is finite."""
    rows = metric_rows(run_dir)
    assert [int(r["step"]) for r in rows] == logged_steps(cfg, num_train)
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    return rows


@pytest.fixture
def nan_at_call(monkeypatch):
    """``inject(cls, call)``: ``cls.losses`` multiplies its first term by NaN on its ``call``-th call (0-based),
    i.e. at training step ``call`` of a single-process run."""

    def inject(cls, call: int) -> None:
        original = cls.losses
        calls = [0]

        def losses(self, batch, output):
            terms = original(self, batch, output)
            if calls[0] == call:
                first = next(iter(terms))
                terms[first] = terms[first] * float("nan")
            calls[0] += 1
            return terms

        monkeypatch.setattr(cls, "losses", losses)

    return inject


def assert_nan_stops_training(train, cfg, run_dir) -> None:
    """A NaN injected at step 1 (``nan_at_call(cls, 1)``) stops ``train`` naming step 1, before its row and any
    checkpoint: only step 0's row (``step`` 1) is in metrics.csv."""
    from fsae.errors import FsaeError

    cfg.train.log_every = 1
    with pytest.raises(FsaeError, match=r"non-finite loss at step 1: terms \{'\w+': nan"):
        train(cfg, run_dir, progress=False)
    assert [r["step"] for r in metric_rows(run_dir)] == ["1"]
    assert not (Path(run_dir) / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------ processes: children, a run killed mid-write


def child_pids(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ``python killer.py MODULE ATTR N ARGS...``: ``fsae ARGS`` with MODULE.ATTR (an atomic_write) replaced; its N-th
# call writes the temp file and then SIGKILLs the process before the rename.
KILLER = """
import importlib, os, signal, sys
module_name, attr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
real, calls = getattr(module, attr), []

def killing_write(path, write_fn):
    calls.append(path)
    if len(calls) < n:
        return real(path, write_fn)

    def write_then_die(tmp):
        write_fn(tmp)
        os.kill(os.getpid(), signal.SIGKILL)

    return real(path, write_then_die)

setattr(module, attr, killing_write)
from fsae.cli import main
sys.exit(main(sys.argv[4:]))
"""


def run_fsae(*args, killed_at: tuple[str, int] | None = None, tmp=None, timeout: float = 900):
    """``python -m fsae ARGS`` in a subprocess (one thread, this checkout on PYTHONPATH); with
    ``killed_at = ("module.atomic_write", n)`` it dies by SIGKILL in the n-th such write (``KILLER``, written
    to ``tmp``)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if killed_at is None:
        cmd = [sys.executable, "-m", "fsae", *args]
    else:
        script = Path(tmp) / "killer.py"
        script.write_text(KILLER)
        module, attr = killed_at[0].rsplit(".", 1)
        cmd = [sys.executable, str(script), module, attr, str(killed_at[1]), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
