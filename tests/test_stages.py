"""The stage API (fsae/stages.py) is the one place the rules of a stage live: `fsae grid` and the CLI's
stages write the same bytes on the same recipe, `fsae crf RUN`, the grid and `fsae predict` take one
threshold (and say where it came from), and the ids of a folder leave a killed run's temp files out."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsae.cli import main as cli
from fsae.config import load_config
from fsae.data.synthetic import SyntheticSpec, generate
from fsae.errors import ConfigError, FsaeError
from fsae.grid import GridSpec, parse_vary, plan_grid, run_job
from fsae.io import _new_temp_file, ids_in
from fsae.stages import seed_threshold

TINY = """name: tiny
data: {{root: {root}, num_classes: 4, crop_size: 32, long_side: null, val_split: ""}}
model: {{width: 8}}
fsae: {{enabled: true, start_epoch: 0}}
train: {{epochs: 2, batch_size: 4, log_every: 1, val_every: 0, tensorboard: false}}
infer: {{scales: [1.0]}}
eval: {{sweep: [0.0, 0.6, 0.05]}}
"""


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """One recipe run twice: by the grid's job (``run_job``, --masks crf) and by the CLI's stages
    (train, cam, eval --seeds, crf without --threshold, eval --masks). Returns (grid run, CLI run, CLI output)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for both trainings
    folder = tmp_path_factory.mktemp("stages")
    spec = SyntheticSpec(num_train=16, num_val=4, image_size=32, body_axes=(6.0, 9.0), part_radius=(1.5, 2.5),
                         stripe_period=(4.0, 6.0), clutter_axes=(3.0, 5.0), seed=1)
    root = generate(folder / "data", spec, progress=False)
    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY.format(root=root))
    grid = GridSpec(config=str(recipe), varies=[parse_vary("fsae.tau_fae=0.9")], seeds=[0], out=folder / "grid",
                    masks="crf")
    (run,) = plan_grid(grid)
    run_job(run, grid)
    mine = folder / "cli_run"
    sets = [f"--set={o}" for o in run.overrides]
    gt, classes = str(Path(root) / "SegmentationClass"), "4"
    output = []
    for argv in (["train", str(recipe), "--out", str(mine), *sets], ["cam", str(mine)],
                 ["eval", "--seeds", str(mine / "seeds"), "--gt", gt, "--num-classes", classes,
                  "--out", str(mine / "eval" / "seeds.json")],
                 ["crf", str(mine), "--workers", "1"],
                 ["eval", "--masks", str(mine / "crf"), "--gt", gt, "--num-classes", classes,
                  "--out", str(mine / "eval" / "crf.json")]):
        assert cli(argv) == 0, argv
    torch.set_num_threads(threads)
    return run.run_dir, mine


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


@pytest.mark.parametrize("folder, pattern", [("seeds", "*.npz"), ("crf", "*.png")])
def test_grid_and_cli_write_the_same_bytes(twin_runs, folder, pattern):
    grid_run, cli_run = twin_runs
    made = _files(grid_run / folder, pattern)
    assert len(made) == 16 and made == _files(cli_run / folder, pattern)
    # the same stamp: the same inputs (checkpoint / seed digests) and settings (threshold, CRF parameters)
    assert (grid_run / f"{folder}.stamp.json").read_bytes() == (cli_run / f"{folder}.stamp.json").read_bytes()


@pytest.mark.parametrize("name", ["seeds", "crf"])
def test_grid_and_cli_write_the_same_evaluation(twin_runs, name):
    grid_run, cli_run = twin_runs
    a, b = (json.loads((r / "eval" / f"{name}.json").read_text()) for r in twin_runs)
    assert a == b  # the scores, the scored ids, the folder record (relative dir, its stamp, the GT)
    assert a.get("count") == 16 or a["best"]  # something was scored
    # the pseudo-masks were made at the protocol's threshold (not the GT-tuned best), as the CRF stamp says
    from fsae.protocol import resolve_protocol

    protocol = resolve_protocol(load_config(cli_run / "config.yaml"))
    assert json.loads((cli_run / "crf.stamp.json").read_text())["settings"]["threshold"] == pytest.approx(
        protocol.threshold)


def test_one_threshold_for_crf_grid_and_predict(twin_runs, tmp_path, capsys):
    grid_run, cli_run = twin_runs
    from fsae.protocol import resolve_protocol

    best = json.loads((cli_run / "eval" / "seeds.json").read_text())["best"]["threshold"]
    cfg = load_config(cli_run / "config.yaml")
    value, source = seed_threshold(cli_run, cfg, None)  # what `fsae crf RUN` without --threshold takes
    assert (value, source) == (resolve_protocol(cfg).threshold, f"protocol of {cfg.model.method} (fsae/protocol.py)")
    assert seed_threshold(cli_run, cfg, "best") == (best, f"best of {cli_run / 'eval' / 'seeds.json'}")
    assert cli(["crf", str(cli_run), "--workers", "1"]) == 0  # finished: every mask already there
    assert source in capsys.readouterr().out  # where the threshold came from is printed
    image = next((cli_run.parent / "data" / "JPEGImages").glob("*.jpg"))
    assert cli(["predict", str(cli_run), str(image), "--out", str(tmp_path / "pred"), "--top-k", "1"]) == 0
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert (record["threshold"], record["threshold_from"]) == (value, source)


def test_seed_threshold_order_and_range(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/synthetic/cam_fsae.yaml")
    from fsae.protocol import resolve_protocol

    assert seed_threshold(tmp_path, cfg, 0.4) == (0.4, "--threshold")
    assert seed_threshold(tmp_path, cfg, None) == (resolve_protocol(cfg).threshold,
                                                   f"protocol of {cfg.model.method} (fsae/protocol.py)")
    cfg.eval.threshold = 0.35
    assert seed_threshold(tmp_path, cfg, None) == (0.35, f"protocol of {cfg.model.method} (eval.threshold)")
    with pytest.raises(FsaeError, match="--threshold best needs a seed evaluation"):
        seed_threshold(tmp_path, cfg, "best")
    with pytest.raises(ConfigError, match=r"--threshold\W+1\.5 is not allowed"):  # EvalConfig's own range check
        seed_threshold(tmp_path, cfg, 1.5)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "seeds.json").write_text(json.dumps({"best": {"threshold": 0.15, "miou": 0.5, "iou": []},
                                                              "miou": 0.5, "iou": []}))
    assert seed_threshold(tmp_path, cfg, "best") == (0.15, f"best of {tmp_path / 'eval' / 'seeds.json'}")
    # an evaluation on disk does not change the default: the GT-tuned best is used only when asked for
    assert seed_threshold(tmp_path, cfg, None) == (0.35, f"protocol of {cfg.model.method} (eval.threshold)")
    assert seed_threshold(tmp_path, cfg, 0.4) == (0.4, "--threshold")  # a number given wins


def test_ids_in_leaves_out_temp_and_hidden_files(tmp_path):
    for name in ("b.png", "a.png", ".x.tmp.png", "d.npz"):
        (tmp_path / name).write_bytes(b"")
    partial = Path(_new_temp_file(tmp_path / "c.png"))  # what a run killed while writing c.png leaves
    assert partial.name.startswith(".c.png.") and partial.suffix == ".png"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "f.png")
    assert ids_in(tmp_path, ".png") == ["a", "b", "f"]
    assert ids_in(tmp_path, ".npz") == ["d"]
    assert ids_in(tmp_path / "missing", ".png") == []


@pytest.mark.parametrize("module", ["grid", "predict"])
def test_grid_and_predict_reach_the_stages_only_through_the_stage_api(module):
    import ast

    import fsae
    from test_architecture import imported_modules

    path = Path(fsae.__file__).parent / f"{module}.py"
    imports = imported_modules(ast.parse(path.read_text()), f"fsae.{module}", False)
    inside = sorted(m for m in imports if m.split(".")[1] in ("refine", "evaluate", "infer", "protocol"))
    assert inside == [] and "fsae.stages" in imports


@pytest.mark.parametrize("background", ["threshold", "power"])
def test_predicts_crf_mask_is_fsae_crfs(twin_runs, tmp_path, background):
    """Seeds with a CAM ramp (a tiny network's CAMs are flat), so the background form moves the border."""
    from fsae.io import read_image, read_mask
    from fsae.seeds import load_seed, save_seed
    from fsae.stages import crf_stage, seed_masks

    _, cli_run = twin_runs
    cfg = load_config(cli_run / "config.yaml")
    cfg.eval.background, cfg.eval.bg_power, cfg.eval.crf_iterations = background, 1.0, 3
    images = cli_run.parent / "data" / "JPEGImages"
    ids = ids_in(cli_run / "seeds", ".npz")[:3]
    ramp = np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, None, :].repeat(32, axis=1)  # (1, 32, 32)
    for image_id in ids:
        save_seed(tmp_path / "seeds" / f"{image_id}.npz", np.array([2]), ramp)
    made = crf_stage(cfg=cfg, seeds=tmp_path / "seeds", images=images, out=tmp_path / "crf", ids=ids, threshold=0.2,
                     workers=1, progress=False)
    assert made["threshold"] == 0.2 and len(made["groups"]) == 1
    masks = []
    for image_id in ids:
        keys, cams, plane = load_seed(tmp_path / "seeds" / f"{image_id}.npz", with_background=True)
        _, mask = seed_masks(read_image(images / f"{image_id}.jpg"), keys, cams, 0.2, plane, crf=True, cfg=cfg)
        assert np.array_equal(mask, read_mask(tmp_path / "crf" / f"{image_id}.png"))
        masks.append(mask)
    foreground = np.mean([(m == 2).mean() for m in masks])
    # threshold 0.2: the ramp's cam > 0.2 part (~0.8); power 1: cam > 1 - cam, about half
    assert (0.7 < foreground < 1.0) if background == "threshold" else (0.3 < foreground < 0.6)
