"""`fsae grid`: the plan, side-by-side jobs, a real grid killed with SIGKILL and resumed, and its table's
median / mean ± std against a hand computation from the runs' own eval files; `fsae compare` over seeds."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fsae import grid as grid_module
from fsae.cli import main as cli
from fsae.compare import compare_markdown, compare_runs, seed_group_table, seed_groups
from fsae.errors import CheckpointError, ConfigError
from fsae.grid import GridSpec, parse_vary, plan_grid, run_finished, run_job, run_jobs
from tests.conftest import alive, child_pids, tiny32_data

REPO = Path(__file__).resolve().parents[1]
TINY = """name: tiny
data: {{root: {root}, num_classes: 4, crop_size: 32, long_side: null, val_split: ""}}
model: {{width: 8}}
fsae: {{enabled: true, start_epoch: 0}}
train: {{epochs: 1, batch_size: 4, log_every: 1, val_every: 0, tensorboard: false}}
infer: {{scales: [1.0]}}
eval: {{sweep: [0.0, 0.6, 0.05]}}
"""
SETTINGS = ["tau_fae=0.5", "tau_fae=0.95"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """16 train images of 32 x 32 px and a 1-epoch recipe on them."""
    folder = tmp_path_factory.mktemp("grid_data")
    root = tiny32_data(folder / "data")
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(root=root))
    return path


# ------------------------------------------------------------------------------------------ the plan


def test_vary_values_keep_brackets_and_bad_options_are_named():
    v = parse_vary("infer.scales=[1.0,0.5],[1.0]")
    assert v.texts == ["[1.0,0.5]", "[1.0]"] and v.values == [[1.0, 0.5], [1.0]]
    assert parse_vary("fsae.tau_fae=0.9,0.95").values == [0.9, 0.95]
    for bad in ("fsae.tau_fae", "fsae.tau_fae=", "fsae.tau_fae=0.9,0.9", "train.seed=1,2"):
        with pytest.raises(ConfigError):
            parse_vary(bad)


def test_plan_base_first_then_every_combination_x_seed(recipe, tmp_path):
    spec = GridSpec(str(recipe), [parse_vary("fsae.tau_fae=0.9,0.95"), parse_vary("fsae.kernel_size=3,5")],
                    [0, 1], tmp_path, base=True, overrides=["optim.lr=0.002"])
    runs = plan_grid(spec)
    names = [f"{r.setting}/seed={r.seed}" for r in runs]
    assert names[:2] == ["base/seed=0", "base/seed=1"]
    assert names[2:] == [f"tau_fae={t},kernel_size={k}/seed={s}" for t in ("0.9", "0.95") for k in (3, 5)
                         for s in (0, 1)]
    base, last = runs[0], runs[-1]
    assert base.cfg.fsae.enabled is False and base.cfg.fsae.tau_fae == 0.95  # the recipe's, no varied value
    assert (last.cfg.fsae.tau_fae, last.cfg.fsae.kernel_size, last.cfg.train.seed) == (0.95, 5, 1)
    assert last.cfg.optim.lr == 0.002 and last.cfg.fsae.enabled is True
    assert last.run_dir == tmp_path / "tau_fae=0.95,kernel_size=5" / "seed=1"


def test_bad_field_stops_before_any_run_with_one_line(recipe, tmp_path, capsys):
    code = cli(["grid", str(recipe), "--vary", "fsae.tau_fea=0.9,0.95", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tau_fea" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "g").exists()


def test_jobs_run_side_by_side_one_per_device(recipe, tmp_path, monkeypatch):
    """Two devices: two jobs at once, each job's command names its device; never two on one device."""
    spec = GridSpec(str(recipe), [parse_vary("fsae.tau_fae=0.8,0.9")], [0, 1], tmp_path, devices=["cpu:0", "cpu:1"])
    runs = plan_grid(spec)
    lock, running, seen = threading.Lock(), {}, []

    def fake_job(argv, log):
        device = argv[argv.index("--devices") + 1]
        with lock:
            assert device not in running, "two jobs on one device"
            running[device] = argv[argv.index("--only") + 1]
            seen.append((len(running), device, running[device]))
        time.sleep(0.3)
        with lock:
            del running[device]

    monkeypatch.setattr(grid_module, "run_fsae", fake_job)
    run_jobs(runs, spec, say=lambda line: None)
    assert sorted(s[2] for s in seen) == sorted(f"{r.setting}/seed={r.seed}" for r in runs)
    assert max(s[0] for s in seen) == 2 and {s[1] for s in seen} == {"cpu:0", "cpu:1"}


# ---------------------------------------------------------------------- a real grid, killed and resumed


@pytest.fixture(scope="module")
def killed_grid(recipe, tmp_path_factory):
    """``fsae grid`` (2 values x 2 seeds, CRF masks) SIGKILLed while its third job runs, then rerun."""
    out = tmp_path_factory.mktemp("grid") / "g"
    argv = [sys.executable, "-m", "fsae", "grid", str(recipe), "--vary", "fsae.tau_fae=0.5,0.95",
            "--seeds", "0,1", "--masks", "crf", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    third = out / SETTINGS[1] / "seed=0" / "grid.log"
    deadline = time.time() + 900
    while not third.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _wait(lambda: child_pids(proc.pid))  # the log is opened just before the job's fork
    jobs = child_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -9, proc.stderr.read().decode()[-2000:]
    finished = [out / s / f"seed={seed}" for s, seed in ((SETTINGS[0], 0), (SETTINGS[0], 1))]
    killed_early = {"jobs": jobs, "jobs_gone": all(_wait(lambda: not alive(j)) for j in jobs),
                    "third_done": (third.parent / "eval" / "crf.json").exists(),
                    "mtimes": {str(f): _mtimes(f) for f in finished}}
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return {"out": out, "rerun": rerun.stdout, "finished": finished, **killed_early}


def _wait(condition, seconds=10.0) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _mtimes(run_dir: Path) -> dict:
    files = [run_dir / "checkpoints" / "last.pt", run_dir / "eval" / "seeds.json", run_dir / "eval" / "crf.json"]
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_killed_grid_resumes_and_skips_finished_runs(killed_grid):
    assert killed_grid["jobs"], "the grid had a job subprocess running when killed"
    assert killed_grid["jobs_gone"], "a job outlived the killed grid"
    assert not killed_grid["third_done"]
    lines = killed_grid["rerun"].splitlines()
    assert f"[1/4] {SETTINGS[0]}/seed=0: finished, skipped" in lines
    assert f"[2/4] {SETTINGS[0]}/seed=1: finished, skipped" in lines
    assert any(line.startswith(f"[3/4] {SETTINGS[1]}/seed=0: running") for line in lines)
    for run_dir in killed_grid["finished"]:
        assert _mtimes(run_dir) == killed_grid["mtimes"][str(run_dir)]  # not touched by the rerun
    out = killed_grid["out"]
    for setting in SETTINGS:
        for seed in (0, 1):
            assert (out / setting / f"seed={seed}" / "eval" / "crf.json").is_file()


def test_a_rerun_with_another_override_is_not_finished(killed_grid, recipe, capsys):
    """The same grid folder with another --set: no run counts as finished (its numbers would come from the old
    recipe); the job's training refuses the checkpoint, naming the field."""
    spec = GridSpec(str(recipe), [parse_vary("fsae.tau_fae=0.5,0.95")], [0, 1], killed_grid["out"], masks="crf")
    assert all(run_finished(run, "crf") for run in plan_grid(spec))
    changed = GridSpec(str(recipe), spec.varies, spec.seeds, spec.out, masks="crf", overrides=["optim.lr=0.5"])
    first = plan_grid(changed)[0]
    assert not run_finished(first, "crf")
    with pytest.raises(CheckpointError, match=r"written by another config \(optim.lr 0.001 -> 0.5\)"):
        run_job(first, changed)


def _hand(values):
    """Median, mean and sample std (n - 1) of two numbers, written out."""
    a, b = values
    return (a + b) / 2, (a + b) / 2, abs(a - b) / math.sqrt(2)


def test_table_median_and_std_match_the_runs_eval_files(killed_grid):
    out = killed_grid["out"]
    record = json.loads((out / "grid.json").read_text())
    assert [r["setting"] for r in record["rows"]] == SETTINGS
    md = (out / "grid.md").read_text()
    for row in record["rows"]:
        evals = [json.loads((out / row["setting"] / f"seed={s}" / "eval" / "seeds.json").read_text()) for s in (0, 1)]
        masks = [json.loads((out / row["setting"] / f"seed={s}" / "eval" / "crf.json").read_text()) for s in (0, 1)]
        for key, values in (("seed_miou", [e["best"]["miou"] for e in evals]),
                            ("seed_fnr", [e["best"]["fnr"] for e in evals]),
                            ("mask_miou", [m["miou"] for m in masks])):
            median, mean, std = _hand(values)
            assert row[key]["n"] == 2
            assert row[key]["median"] == pytest.approx(median, abs=1e-12)
            assert row[key]["mean"] == pytest.approx(mean, abs=1e-12)
            assert row[key]["std"] == pytest.approx(std, abs=1e-12)
        median, mean, std = _hand([e["best"]["miou"] for e in evals])
        cell = f"{100 * median:.1f} ({100 * mean:.1f} ± {100 * std:.1f})"
        assert f"| {row['setting']} | 2 | {cell} |" in md
        thresholds = sorted(e["best"]["threshold"] for e in evals)
        assert row["threshold"]["median"] == pytest.approx(sum(thresholds) / 2)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_html_links_one_plot_per_varied_field(killed_grid):
    out = killed_grid["out"]
    page = _Images()
    page.feed((out / "grid.html").read_text())
    assert page.src == ["grid_files/fsae.tau_fae.png"]
    assert (out / page.src[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_adds_median_and_std_over_seeds_of_one_setting(killed_grid):
    out = killed_grid["out"]
    runs = [out / s / f"seed={seed}" for s in SETTINGS for seed in (0, 1)]
    summaries = compare_runs(runs, compute=False)
    assert [[s["run_dir"] for s in g] for g in seed_groups(summaries)] == [[str(r) for r in runs[:2]],
                                                                           [str(r) for r in runs[2:]]]
    groups = seed_group_table(summaries)
    assert [r[:2] for r in groups["rows"]] == [[SETTINGS[0], 2], [SETTINGS[1], 2]]
    for setting, row in zip(SETTINGS, groups["rows"]):
        evals = [json.loads((out / setting / f"seed={s}" / "eval" / "seeds.json").read_text()) for s in (0, 1)]
        median, mean, std = _hand([e["best"]["miou"] for e in evals])
        assert row[2] == f"{100 * median:.1f} ({100 * mean:.1f} ± {100 * std:.1f})"
    assert "median (mean ± std" in compare_markdown(summaries)
    assert seed_group_table(summaries[:1] + summaries[2:3]) is None  # one run per setting: no seed rows
