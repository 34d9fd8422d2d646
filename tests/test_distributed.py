"""Several processes give the one-process result: DDP training, the sampler, sharded cam / crf / eval."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsae.augment import strong_view, weak_view
from fsae.cli import main as cli
from fsae.config import Config, save_config
from fsae.distributed import ResumableSampler, current_shard, parse_shard, per_rank_batch, shard_indices
from fsae.errors import FsaeError
from fsae.evaluate import evaluate_masks, evaluate_seeds
from fsae.methods import build_method
from fsae.train import image_generators, per_image, train
from tests.conftest import tiny32_config

REPO = Path(__file__).resolve().parents[1]
# Adam's update divides by sqrt(second moment), which turns float-rounding differences of the averaged
# gradient into ~1e-6 weight differences after 8 steps (measured max |diff| 2.6e-6; with SGD 1.5e-8).
ATOL, RTOL = 2e-5, 1e-4


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def data_root(tiny32):
    return tiny32


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_batches_together_are_the_global_batch(world):
    n, global_batch, seed = 22, 4, 5
    dataset = list(range(n))
    per_rank = per_rank_batch(global_batch, world)
    for epoch in (0, 3):
        # The permutation written plainly: torch's randperm seeded with seed + epoch, cut to whole batches.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        expected = [sorted(perm[t * global_batch:(t + 1) * global_batch]) for t in range(n // global_batch)]
        ranks = []
        for r in range(world):
            sampler = ResumableSampler(dataset, per_rank, num_replicas=world, rank=r, seed=seed)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
            assert sampler.batches_per_epoch == n // global_batch
        got = [sorted(i for idx in ranks for i in idx[t * per_rank:(t + 1) * per_rank])
               for t in range(n // global_batch)]
        assert got == expected
        # Resuming at batch 2 of the epoch leaves out exactly the first two batches of every rank.
        sampler = ResumableSampler(dataset, per_rank, num_replicas=world, rank=world - 1, seed=seed)
        sampler.set_epoch(epoch, skip_batches=2)
        assert list(sampler) == ranks[-1][2 * per_rank:] and len(sampler) == len(ranks[-1]) - 2 * per_rank


def test_uneven_global_batch_is_refused(tmp_path, capsys):
    assert per_rank_batch(8, 4) == 2
    with pytest.raises(FsaeError, match="batch_size 6 .* does not divide by 4 processes"):
        per_rank_batch(6, 4)
    save_config(Config(), tmp_path / "cfg.yaml")  # batch_size 32
    assert cli(["train", str(tmp_path / "cfg.yaml"), "--nproc", "3"]) == 2  # refused before any process starts
    assert "train.batch_size 32 (the global batch) does not divide by 3 processes" in capsys.readouterr().err


def test_views_do_not_depend_on_the_batch_an_image_lands_in():
    images = torch.rand(4, 3, 16, 16)
    indices = torch.tensor([7, 2, 11, 5])
    gens = image_generators(0, 3, indices)
    whole = per_image(weak_view, images, gens)
    whole = per_image(strong_view, whole, gens, num_ops=3)
    split = []
    for part in (slice(2, 4), slice(0, 2)):  # the other process, in the other order
        g = image_generators(0, 3, indices[part])
        split.append(per_image(strong_view, per_image(weak_view, images[part], g), g, num_ops=3))
    torch.testing.assert_close(whole, torch.cat(split[::-1]), rtol=0, atol=0)
    other_epoch = per_image(weak_view, images, image_generators(0, 4, indices))
    assert not torch.equal(other_epoch, per_image(weak_view, images, image_generators(0, 3, indices)))


def test_shard_parsing_and_cover():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "a/2", "1"):
        with pytest.raises(FsaeError, match="--shard"):
            parse_shard(bad)
    items = list(range(10))
    shards = [shard_indices(items, (i, 3)) for i in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert current_shard(None) == (0, 1) and current_shard((1, 3)) == (1, 3)


# ------------------------------------------------------------------------------------------ DDP


def ddp_config(root) -> Config:
    """FSAE on, a BatchNorm-free backbone (ConvNeXt-atto: LayerNorm), so per-process normalisation
    equals the global batch's (BatchNorm would need SyncBatchNorm, which torch runs on GPUs only)."""
    cfg = tiny32_config(root)
    cfg.data.val_split = "val"
    cfg.model.backbone, cfg.model.output_stride, cfg.model.width = "convnext_atto", 8, 32  # width: the default
    cfg.fsae.enabled, cfg.fsae.start_epoch = True, 0
    cfg.train.epochs, cfg.train.val_every, cfg.train.deterministic = 2, 1, True
    cfg.train.val_scales, cfg.eval.sweep = [1.0], [0.1, 0.5, 0.1]
    return cfg


@pytest.mark.slow  # two torchrun processes: ~15 s of process start-up and training on 2 cores
def test_two_process_ddp_equals_one_process_with_the_global_batch(data_root, tmp_path, one_thread):
    cfg = ddp_config(data_root)
    try:
        single = torch.load(train(cfg, tmp_path / "single", progress=False), weights_only=True)
    finally:
        torch.use_deterministic_algorithms(False)
    save_config(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, "-m", "fsae", "train", str(tmp_path / "cfg.yaml"), "--out",
                           str(tmp_path / "ddp"), "--nproc", "2"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert ddp["step"] == single["step"] == 8  # 16 images / global batch 4 x 2 epochs, whatever N is
    torch.manual_seed(cfg.train.seed)
    initial = build_method(cfg.model, cfg.data.num_classes).state_dict()
    moved = max((single["model"][k] - v).abs().max().item() for k, v in initial.items() if v.is_floating_point())
    assert moved > 1000 * ATOL  # the comparison below can fail: training moved the weights far more than ATOL
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    # Rank 0 alone logs: one header, one row per step; the loss is the global batch's (mean over ranks).
    one = [line.split(",") for line in (tmp_path / "single" / "metrics.csv").read_text().splitlines()]
    two = [line.split(",") for line in (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()]
    assert len(two) == len(one) == 9 and two[0] == one[0]
    col = one[0].index("loss")
    np.testing.assert_allclose([float(r[col]) for r in two[1:]], [float(r[col]) for r in one[1:]], rtol=1e-4)
    # Held-out seed mIoU per epoch: each process scored 2 of the 4 val images, confusions summed.
    val, val_ddp = ([[float(x) for x in line.split(",")[3:5]]  # val_miou, val_fpr
                     for line in (tmp_path / run / "epochs.csv").read_text().splitlines()[1:]]
                    for run in ("single", "ddp"))
    assert len(val) == 2 and all(0 < miou <= 1 for miou, _ in val)
    np.testing.assert_allclose(val_ddp, val, atol=2e-3)  # weights equal to ~1e-6: at most a pixel flips


# ------------------------------------------------------------------------------------ sharded stages


def array_digest(path: Path) -> str:
    """Hash of a seed file's arrays (np.savez stamps the zip members with the write time)."""
    with np.load(path) as data:
        return hashlib.sha256(b"".join(data[k].tobytes() for k in sorted(data.files))).hexdigest()


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp_run") / "run"
    cfg = ddp_config(data_root)
    cfg.model.backbone, cfg.model.width, cfg.train.epochs, cfg.train.deterministic = "tinycnn", 8, 1, False
    cfg.infer.scales = [1.0, 0.5]
    train(cfg, run, progress=False)
    assert cli(["cam", str(run)]) == 0
    return run


def test_sharded_cam_and_crf_write_the_single_process_files(trained_run, data_root, tmp_path):
    for i in range(3):
        assert cli(["cam", str(trained_run), "--out", str(tmp_path / "seeds"), "--shard", f"{i}/3"]) == 0
    single = sorted(p.name for p in (trained_run / "seeds").glob("*.npz"))
    assert sorted(p.name for p in (tmp_path / "seeds").iterdir()) == single and len(single) == 16
    for name in single:
        assert array_digest(tmp_path / "seeds" / name) == array_digest(trained_run / "seeds" / name), name

    common = ["--images", str(data_root / "JPEGImages"), "--threshold", "0.3", "--workers", "1"]
    assert cli(["crf", "--seeds", str(trained_run / "seeds"), "--out", str(tmp_path / "crf1"), *common]) == 0
    for i in range(2):
        assert cli(["crf", "--seeds", str(tmp_path / "seeds"), "--out", str(tmp_path / "crf2"), *common,
                    "--shard", f"{i}/2"]) == 0
    one = {p.name: p.read_bytes() for p in (tmp_path / "crf1").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "crf2").iterdir()}
    assert len(one) == 16 and one == two


@pytest.mark.slow  # two torchrun processes: ~15 s of process start-up and training on 2 cores
def test_eval_under_torchrun_equals_one_process(trained_run, data_root, tmp_path):
    gt = data_root / "SegmentationClass"
    ids = sorted(p.stem for p in (trained_run / "seeds").glob("*.npz"))
    single = evaluate_seeds(trained_run / "seeds", gt, ids, 4, [0.1, 0.2, 0.3], progress=False)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fsae", "eval", "--seeds", str(trained_run / "seeds"), "--gt", str(gt),
                           "--num-classes", "4", "--sweep", "0.1", "0.3", "0.1", "--out", str(tmp_path / "ddp.json")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("written:") == 1  # rank 0 alone reports
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["count"] == 16 and result["thresholds"] == single["thresholds"]
    assert result["miou"] == single["miou"] and result["best"] == json.loads(json.dumps(single["best"]))


def test_a_shard_outside_a_process_group_is_refused(trained_run, data_root):
    ids = sorted(p.stem for p in (trained_run / "seeds").glob("*.npz"))
    with pytest.raises(ValueError, match="not \\(rank, world size\\)"):
        evaluate_masks(trained_run / "seeds", data_root / "SegmentationClass", ids, 4, shard=(1, 2))
