"""Stamped stage outputs: an unchanged rerun resumes (files untouched), a rerun after a change of the
stage's input or of a deciding flag is refused naming the change (exit 2), ``--force`` redoes it, a
finished file that no longer reads is written again, and report / compare recompute a stale evaluation."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fsae.cli import main as cli
from fsae.compare import compare_runs
from fsae.config import save_config
from fsae.demo import demo_config
from fsae.protocol import resolve_protocol
from fsae.evaluate import default_thresholds, evaluate_masks, evaluate_seeds, load_seed, save_eval
from fsae.io import read_json, read_mask
from fsae.report import write_report
from fsae.stamps import (StaleOutputError, file_digest, folder_digest, make_stamp, prepare_output, read_stamp,
                         stamp_changes, stamp_path)
from fsae.train import train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(root, seed=0):
    cfg = demo_config("base", root, seed=seed)
    cfg.data.long_side, cfg.data.crop_size = None, 64
    cfg.model.width = 8
    cfg.train.epochs, cfg.train.batch_size, cfg.train.val_every = 1, 8, 0
    cfg.train.tensorboard = False
    cfg.infer.scales = [1.0]
    return cfg


def array_digest(path: Path) -> str:
    """Hash of a seed file's arrays (np.savez stamps the zip members with the write time)."""
    with np.load(path) as data:
        return hashlib.sha256(b"".join(data[k].tobytes() for k in sorted(data.files))).hexdigest()


def snapshot(folder: Path, suffix: str) -> dict[str, tuple[int, str]]:
    """name -> (modification time, content hash) of the outputs in ``folder``."""
    digest = array_digest if suffix == ".npz" else lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    return {p.name: (p.stat().st_mtime_ns, digest(p)) for p in sorted(folder.glob(f"*{suffix}"))}


def refused(capsys, argv) -> str:
    """Run ``fsae argv``, expect exit 2 with one error line and no traceback; return the message."""
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("fsae: error:") == 1 and "Traceback" not in err, err
    return err[err.index("fsae: error:"):].strip()


@pytest.fixture(scope="module")
def cam_run(tiny_synthetic, tmp_path_factory):
    """A run directory after train (1 epoch), cam and crf (threshold 0.3): copied by each test."""
    root, _ = tiny_synthetic
    run = tmp_path_factory.mktemp("stamps") / "run"
    train(tiny_config(root), run, progress=False)
    assert cli(["cam", str(run)]) == 0
    assert cli(["crf", str(run), "--threshold", "0.3", "--workers", "1"]) == 0
    return run


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run directory (with the stamps beside its folders, e.g. ``seeds.stamp.json``)."""
    shutil.copytree(src, dst)
    assert (dst / "seeds.stamp.json").is_file() or (dst / "segment" / "val.stamp.json").is_file()
    return dst


# --------------------------------------------------------------------------------------- the helper


def test_prepare_output_contract(tmp_path):
    out = tmp_path / "out"
    a = make_stamp("crf", {"seeds": "abc"}, {"threshold": 0.1, "iterations": 10})
    assert prepare_output(out, a, patterns=("*.png",)) == 0
    assert read_stamp(out) == a and stamp_path(out) == tmp_path / "out.stamp.json"
    (out / "x.png").write_bytes(b"png")
    assert prepare_output(out, a, patterns=("*.png",)) == 0 and (out / "x.png").is_file()  # resume
    b = make_stamp("crf", {"seeds": "abc"}, {"threshold": 0.5, "iterations": 10})
    with pytest.raises(StaleOutputError, match=r"out: made with threshold 0.1, now 0.5; rerun with --force"):
        prepare_output(out, b, patterns=("*.png",))
    assert read_stamp(out) == a and (out / "x.png").is_file()  # a refusal changes nothing
    (out / ".x.png.k3j.tmp.png").write_bytes(b"half")  # a killed run's partial write
    (out / "notes.txt").write_text("not an output of this stage")
    prepare_output(out, b, force=True, patterns=("*.png",))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and read_stamp(out) == b
    # outputs without a stamp (an older fsae, files put there by hand) are not taken as finished
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "y.png").write_bytes(b"png")
    with pytest.raises(StaleOutputError, match="old: holds 1 outputs .* but no stamp"):
        prepare_output(tmp_path / "old", a, patterns=("*.png",))
    # a finished output that no longer reads is deleted on resume, so the stage writes it again
    def read(path):
        if path.read_bytes() != b"png":
            raise StaleOutputError(f"{path}: corrupt")

    (out / "x.png").write_bytes(b"png")
    (out / "z.png").write_bytes(b"pn")
    assert prepare_output(out, b, patterns=("*.png",), read=read) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["x.png"]


def test_stamp_changes_names_every_field():
    a = make_stamp("irn", {"seeds": "s1"}, {"walk": {"beta": 10.0, "radius": 5}, "flip": True})
    b = make_stamp("irn", {"seeds": "s2"}, {"walk": {"beta": 8.0, "radius": 5}, "flip": False})
    assert stamp_changes(a, b) == "made with flip true, now false; seeds s1, now s2; walk.beta 10.0, now 8.0"
    c = make_stamp("crf", {}, {f"k{i}": i for i in range(6)})
    d = make_stamp("crf", {}, {f"k{i}": i + 1 for i in range(6)})
    assert stamp_changes(c, d).endswith("k3 3, now 4; and 2 more fields")


# --------------------------------------------------------------------------------------- fsae cam


def test_cam_resumes_refuses_a_changed_flag_and_force_redoes(cam_run, tmp_path, capsys):
    run = copy_run(cam_run, tmp_path / "run")
    seeds = run / "seeds"
    before = snapshot(seeds, ".npz")
    assert len(before) == 24
    capsys.readouterr()
    assert cli(["cam", str(run)]) == 0  # unchanged: resumes, nothing rewritten
    assert "(0 written, 24 already there)" in capsys.readouterr().out
    assert snapshot(seeds, ".npz") == before

    message = refused(capsys, ["cam", str(run), "--set", "infer.flip=false"])
    assert message == f"fsae: error: {seeds}: made with flip true, now false; rerun with --force to redo"
    assert snapshot(seeds, ".npz") == before

    assert cli(["cam", str(run), "--set", "infer.flip=false", "--force"]) == 0
    after = snapshot(seeds, ".npz")
    assert after.keys() == before.keys()
    assert all(after[n][0] != before[n][0] for n in before)  # every file written again
    assert sum(after[n][1] != before[n][1] for n in before) > 12  # (a class whose CAM is all zero keeps its plane)
    # ... and what a fresh folder gets with the same flag
    assert cli(["cam", str(run), "--set", "infer.flip=false", "--out", str(tmp_path / "fresh")]) == 0
    assert {n: d for n, (_, d) in after.items()} == {n: d for n, (_, d) in snapshot(tmp_path / "fresh", ".npz").items()}
    assert cli(["cam", str(run), "--set", "infer.flip=false"]) == 0  # the new stamp resumes
    assert snapshot(seeds, ".npz") == after


def test_cam_after_retraining_into_the_run_dir_is_refused(cam_run, tiny_synthetic, tmp_path, capsys):
    root, _ = tiny_synthetic
    run = copy_run(cam_run, tmp_path / "run")
    old = file_digest(run / "checkpoints" / "last.pt")
    assert read_stamp(run / "seeds")["inputs"] == {"checkpoint": old}
    train(tiny_config(root, seed=1), run, progress=False, resume=False)  # `fsae train --no-resume`
    new = file_digest(run / "checkpoints" / "last.pt")
    assert new != old
    before = snapshot(run / "seeds", ".npz")
    message = refused(capsys, ["cam", str(run)])
    assert message == (f"fsae: error: {run / 'seeds'}: made with checkpoint {old}, now {new}; rerun with --force "
                       f"to redo")
    assert snapshot(run / "seeds", ".npz") == before
    assert cli(["cam", str(run), "--force"]) == 0
    assert cli(["cam", str(run), "--out", str(tmp_path / "fresh")]) == 0
    after = snapshot(run / "seeds", ".npz")
    assert {n: d for n, (_, d) in after.items()} == {n: d for n, (_, d) in snapshot(tmp_path / "fresh", ".npz").items()}
    assert all(after[n][0] != before[n][0] for n in before) and sum(after[n][1] != before[n][1] for n in before) > 12


def test_cam_rewrites_a_seed_file_that_no_longer_reads(cam_run, tmp_path, capsys):
    run = copy_run(cam_run, tmp_path / "run")
    seeds = run / "seeds"
    before = snapshot(seeds, ".npz")
    truncated, garbage = seeds / "train_00003.npz", seeds / "train_00010.npz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage.write_bytes(b"not a zip file at all")
    capsys.readouterr()
    assert cli(["cam", str(run)]) == 0
    assert "(2 written, 22 already there)" in capsys.readouterr().out
    after = snapshot(seeds, ".npz")
    for name in before:
        if name in (truncated.name, garbage.name):
            assert after[name][1] == before[name][1]  # whole again, the same arrays
        else:
            assert after[name] == before[name]  # untouched
    load_seed(truncated)


# --------------------------------------------------------------------------------------- fsae crf


def test_crf_resumes_refuses_a_new_threshold_or_new_seeds_and_force_redoes(cam_run, tmp_path, capsys):
    run = copy_run(cam_run, tmp_path / "run")
    crf = run / "crf"
    base = ["crf", str(run), "--workers", "1"]
    before = snapshot(crf, ".png")
    assert len(before) == 24
    capsys.readouterr()
    assert cli([*base, "--threshold", "0.3"]) == 0
    assert "(0 refined, 24 already there)" in capsys.readouterr().out
    assert snapshot(crf, ".png") == before

    message = refused(capsys, [*base, "--threshold", "0.5"])
    assert message == f"fsae: error: {crf}: made with threshold 0.3, now 0.5; rerun with --force to redo"
    assert snapshot(crf, ".png") == before

    assert cli([*base, "--threshold", "0.5", "--force"]) == 0
    after = snapshot(crf, ".png")
    assert all(after[n][0] != before[n][0] for n in before)
    assert any(after[n][1] != before[n][1] for n in before)  # a higher background score changes masks
    assert cli([*base, "--threshold", "0.5", "--out", str(tmp_path / "fresh")]) == 0
    assert {n: d for n, (_, d) in after.items()} == {n: d for n, (_, d) in snapshot(tmp_path / "fresh", ".png").items()}

    # new seeds (cam redone with another flag): the masks made from the old ones are refused
    old_seeds = folder_digest(run / "seeds")
    assert cli(["cam", str(run), "--set", "infer.flip=false", "--force"]) == 0
    new_seeds = folder_digest(run / "seeds")
    message = refused(capsys, [*base, "--threshold", "0.5"])
    assert message == (f"fsae: error: {crf}: made with seeds {old_seeds}, now {new_seeds}; rerun with --force "
                       f"to redo")


def test_crf_rewrites_a_mask_that_no_longer_reads(cam_run, tmp_path, capsys):
    run = copy_run(cam_run, tmp_path / "run")
    crf = run / "crf"
    before = snapshot(crf, ".png")
    victim = crf / "train_00007.png"
    victim.write_bytes(victim.read_bytes()[:40])
    capsys.readouterr()
    assert cli(["crf", str(run), "--threshold", "0.3", "--workers", "1"]) == 0
    assert "(1 refined, 23 already there)" in capsys.readouterr().out
    after = snapshot(crf, ".png")
    assert after[victim.name][1] == before[victim.name][1]
    assert {n: v for n, v in after.items() if n != victim.name} == {n: v for n, v in before.items() if n != victim.name}


# --------------------------------------------------------------------------------------- fsae irn


def gt_seeds(root: Path, seed_dir: Path, ids: list[str]) -> None:
    """Seeds made by hand from the GT: each object's mask blurred and max-normalised (no stamp)."""
    from scipy.ndimage import gaussian_filter

    from fsae.infer import save_seed

    for i in ids:
        gt = read_mask(root / "SegmentationClass" / f"{i}.png")
        keys = np.array([c for c in range(1, 5) if (gt == c).any()], dtype=np.int64)
        cams = np.stack([gaussian_filter((gt == c).astype(np.float32), 3) for c in keys])
        save_seed(seed_dir / f"{i}.npz", keys, cams / cams.reshape(len(keys), -1).max(1)[:, None, None])


def test_irn_steps_resume_refuse_a_change_and_force_redoes(tiny_synthetic, tmp_path, capsys):
    root, _ = tiny_synthetic
    run = tmp_path / "run"
    save_config(tiny_config(root), run / "config.yaml")
    names = [f"train_{i:05d}" for i in range(8)]
    gt_seeds(Path(root), run / "seeds", names)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(names) + "\n")
    argv = ["irn", str(run), "--config", str(REPO / "configs/synthetic/irn.yaml"), "--ids", str(ids),
            "--set", "train.crop_size=64", "--set", "train.batch_size=4", "--set", "train.epochs=1",
            "--set", "net.branch_width=8", "--set", "ir_label.workers=1"]
    assert cli(argv) == 0

    def state():
        return (snapshot(run / "ir_labels", ".png"), snapshot(run / "irn", ".pt"), snapshot(run / "irn_masks", ".png"))

    labels, net, masks = before = state()
    assert len(labels) == len(masks) == 8 and list(net) == ["irn.pt"]
    assert cli(argv) == 0
    assert state() == before  # every step finds its work done

    message = refused(capsys, [*argv, "--set", "walk.bg_threshold=0.5"])
    assert message == (f"fsae: error: {run / 'irn_masks'}: made with walk.bg_threshold 0.25, now 0.5; rerun with "
                       f"--force to redo")
    message = refused(capsys, [*argv, "--set", "ir_label.fg_threshold=0.4"])
    assert message == (f"fsae: error: {run / 'ir_labels'}: made with fg_threshold 0.3, now 0.4; rerun with --force "
                       f"to redo")
    message = refused(capsys, [*argv, "--set", "train.lr=0.05"])
    assert message.startswith(f"fsae: error: {run / 'irn'}: made with train.lr 0.1, now 0.05;")
    assert state() == before

    assert cli([*argv, "--set", "walk.bg_threshold=0.5", "--force"]) == 0
    labels2, net2, masks2 = state()
    for old, new in ((labels, labels2), (net, net2), (masks, masks2)):
        assert new.keys() == old.keys() and all(new[n][0] != old[n][0] for n in old)  # all written again
    assert any(masks2[n][1] != masks[n][1] for n in masks)  # another background threshold of the walk
    assert cli([*argv, "--set", "walk.bg_threshold=0.5"]) == 0
    assert state() == (labels2, net2, masks2)

    # a seed file written again (a hand-made folder: its file listing is its digest): the IR labels are refused
    old_seeds = folder_digest(run / "seeds")
    gt_seeds(Path(root), run / "seeds", names[:1])
    new_seeds = folder_digest(run / "seeds")
    message = refused(capsys, [*argv, "--set", "walk.bg_threshold=0.5"])
    assert message == (f"fsae: error: {run / 'ir_labels'}: made with seeds {old_seeds}, now {new_seeds}; rerun "
                       f"with --force to redo")


# --------------------------------------------------------------------------------------- fsae seg infer


@pytest.fixture(scope="module")
def seg_run(tiny_synthetic, tmp_path_factory):
    """DeepLab-V2 on a width-8 tinycnn, trained 6 iterations on the GT masks through `fsae seg train`."""
    from fsae.segment.config import SegConfig

    root, _ = tiny_synthetic
    run = tmp_path_factory.mktemp("stamps_seg") / "run"
    cfg = SegConfig(name="tiny")
    cfg.data.root, cfg.data.num_classes, cfg.data.mask_dir = str(root), 4, str(Path(root) / "SegmentationClass")
    cfg.data.crop_size = 48
    cfg.model.backbone, cfg.model.width, cfg.model.weights, cfg.model.freeze_bn = "tinycnn", 8, None, False
    cfg.model.aspp_rates = [1, 2, 3, 4]
    cfg.train.batch_size, cfg.train.iterations, cfg.train.checkpoint_every = 4, 6, 6
    cfg.infer.scales = [0.75, 1.0]
    recipe = run.parent / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli(["seg", "train", str(recipe), "--out", str(run), "--allow-gt"]) == 0
    assert cli(["seg", "infer", str(run)]) == 0
    return run


def test_seg_infer_resumes_refuses_changed_scales_or_crf_and_force_redoes(seg_run, tmp_path, capsys):
    run = copy_run(seg_run, tmp_path / "run")
    plain, refined = run / "segment" / "val", run / "segment" / "val_crf"
    before = snapshot(plain, ".png"), snapshot(refined, ".png")
    assert len(before[0]) == len(before[1]) == 8
    capsys.readouterr()
    assert cli(["seg", "infer", str(run)]) == 0
    assert "(0 written, 8 already there)" in capsys.readouterr().out
    assert (snapshot(plain, ".png"), snapshot(refined, ".png")) == before

    message = refused(capsys, ["seg", "infer", str(run), "--set", "infer.scales=[1.0]"])
    assert message == (f"fsae: error: {plain}: made with scales [0.75, 1.0], now [1.0]; rerun with --force to "
                       f"redo")
    message = refused(capsys, ["seg", "infer", str(run), "--set", "infer.crf.bilateral_srgb=5"])
    assert message == (f"fsae: error: {refined}: made with crf.bilateral_srgb 3.0, now 5.0; rerun with --force "
                       f"to redo")
    assert (snapshot(plain, ".png"), snapshot(refined, ".png")) == before

    seg_eval = read_json(run / "eval" / "seg_val.json")
    assert seg_eval["scored"]["stamp"] == folder_digest(plain)
    assert cli(["seg", "infer", str(run), "--set", "infer.scales=[1.0]", "--force"]) == 0
    after = snapshot(plain, ".png"), snapshot(refined, ".png")
    for old, new in zip(before, after):
        assert new.keys() == old.keys() and all(new[n][0] != old[n][0] for n in old)
    new_eval = read_json(run / "eval" / "seg_val.json")
    assert new_eval["scored"]["stamp"] == folder_digest(plain) != seg_eval["scored"]["stamp"]
    fresh = evaluate_masks(plain, Path(new_eval["scored"]["gt"]), [n[:-4] for n in sorted(before[0])], 4,
                           progress=False)
    assert new_eval["miou"] == fresh["miou"]


# --------------------------------------------------------------------------------------- report / compare


def test_compare_and_report_recompute_a_stale_evaluation(cam_run, tiny_synthetic, tmp_path, capsys):
    root, _ = tiny_synthetic
    run = copy_run(cam_run, tmp_path / "run")
    gt = Path(root) / "SegmentationClass"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(gt), "--num-classes", "4",
                "--sweep", "0", "0.6", "0.05", "--out", str(run / "eval" / "seeds.json")]) == 0
    old = read_json(run / "eval" / "seeds.json")
    assert old["scored"] == {"dir": "../seeds", "stamp": folder_digest(run / "seeds"), "gt": str(gt),
                             "ids": None, "ignore_as": None}
    assert compare_runs([run], compute=False)[0]["seed_miou"] == old["best"]["miou"]  # fresh: used as it is

    assert cli(["cam", str(run), "--set", "infer.flip=false", "--force"]) == 0  # new seeds: the eval is stale
    summary = compare_runs([run], compute=False)[0]
    assert summary["seed_miou"] is None  # not shown...
    assert summary["notes"] == ["eval/seeds.json scored ../seeds before it was made again: not shown "
                                "(recompute it: rerun without --no-compute)"]
    summary = compare_runs([run])[0]  # ... or recomputed, with the same thresholds
    ids = sorted(p.stem for p in (run / "seeds").glob("*.npz"))
    expected = evaluate_seeds(run / "seeds", gt, ids, 4, default_thresholds(0, 0.6, 0.05), progress=False)
    new = read_json(run / "eval" / "seeds.json")
    assert new["best"] == expected["best"] and new["miou"] == expected["miou"]
    assert summary["seed_miou"] == expected["best"]["miou"] != old["best"]["miou"]
    assert new["scored"]["stamp"] == folder_digest(run / "seeds") != old["scored"]["stamp"]

    # The report: evaluates crf/ (no evaluation yet), then recomputes it after `crf --force` at 0.5.
    write_report(run)
    first = read_json(run / "eval" / "crf.json")
    assert cli(["crf", str(run), "--threshold", "0.5", "--workers", "1", "--force"]) == 0
    write_report(run)
    again = read_json(run / "eval" / "crf.json")
    expected = evaluate_masks(run / "crf", gt, ids, 4, progress=False)
    assert again["miou"] == expected["miou"] and again["iou"] == [None if np.isnan(v) else v for v in expected["iou"]]
    assert again["scored"]["stamp"] != first["scored"]["stamp"]
    assert f"{100 * expected['miou']:.1f}" in (run / "report.html").read_text()


def test_an_evaluation_without_a_record_of_its_folder_is_recomputed(cam_run, tiny_synthetic, tmp_path):
    """eval/seeds.json of an older fsae (no "scored" entry) beside seeds/: not trusted, recomputed."""
    root, _ = tiny_synthetic
    run = copy_run(cam_run, tmp_path / "run")
    ids = sorted(p.stem for p in (run / "seeds").glob("*.npz"))
    gt = Path(root) / "SegmentationClass"
    fake = evaluate_seeds(run / "seeds", gt, ids[:3], 4, [0.25], progress=False)
    save_eval(run / "eval" / "seeds.json", fake)
    assert "scored" not in read_json(run / "eval" / "seeds.json")
    summary = compare_runs([run])[0]
    cfg = tiny_config(root)
    protocol = resolve_protocol(cfg)  # the run's own evaluation: its method's protocol
    expected = evaluate_seeds(run / "seeds", gt, ids, 4, protocol.thresholds(), progress=False,
                              mode=protocol.eval_mode)
    assert summary["seed_miou"] == expected["best"]["miou"]
    assert read_json(run / "eval" / "seeds.json")["count"] == 24


def test_mask_eval_records_ids_and_ignore_as(cam_run, tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    run = copy_run(cam_run, tmp_path / "run")
    listing = tmp_path / "ids.txt"
    listing.write_text("train_00001\ntrain_00002\n")
    out = run / "eval" / "some.json"
    assert cli(["eval", "--masks", str(run / "crf"), "--gt", str(Path(root) / "SegmentationClass"), "--num-classes",
                "4", "--ids", str(listing), "--ignore-as", "0", "--out", str(out)]) == 0
    scored = json.loads(out.read_text())["scored"]
    assert scored["ids"] == ["train_00001", "train_00002"] and scored["ignore_as"] == 0
    assert scored["dir"] == "../crf" and scored["stamp"] == folder_digest(run / "crf")
