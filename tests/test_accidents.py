"""A researcher's accidents lose nothing and mislead no one (issue 32).

One writer per output folder (a real second process holds the lock), ``--force`` that keeps the old
output until the new one is made, no traceback on ``--out`` paths, out of memory named per image,
odd annotations and checkpoints named, degenerate pseudo-masks warned about, the ground truth refused
as DeepLab's training masks, seg inference that checks its splits first.
"""

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

from fsae.cli import main as cli
from fsae.config import save_config
from fsae.errors import CheckpointError, DataError, FsaeError
from fsae.io import read_mask, write_json, write_mask
from fsae.lock import FolderLockedError, lock_path, locked, output_lock
from fsae.masks_check import mask_warnings
from fsae.stamps import make_stamp, read_stamp, stage_output, staging_path, stamp_path

from test_faults import array_digest, outputs, tiny_config, tiny_data

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

HOLDER = """
import sys, time
from fsae.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("acc_data"))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    from fsae.train import train

    run = tmp_path_factory.mktemp("acc_run") / "run"
    train(tiny_config(data_root), run, progress=False)
    assert cli(["cam", str(run)]) == 0
    return run


def hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that holds ``folder``'s writer lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------- one writer


def test_a_second_writer_fails_at_once_naming_the_holder_and_sigkill_frees_the_lock(tmp_path):
    folder = tmp_path / "seeds"
    proc = hold_lock(folder)
    try:
        started = time.monotonic()
        with pytest.raises(FolderLockedError) as info:
            with output_lock(folder):
                pass
        assert time.monotonic() - started < 1.0  # no waiting
        assert str(folder) in str(info.value) and f"pid {proc.pid}" in str(info.value)
        assert "\n" not in str(info.value)
    finally:
        kill(proc)
    assert lock_path(folder).exists()  # a SIGKILL'd holder cleans nothing up, yet the lock is free
    with output_lock(folder):
        assert locked(folder)
    assert not locked(folder) and not lock_path(folder).exists()  # a finished holder removes its file


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with output_lock(tmp_path / "x"):
        with output_lock(tmp_path / "x"):
            assert locked(tmp_path / "x")
        assert locked(tmp_path / "x")
    assert not locked(tmp_path / "x")


def test_shards_of_one_folder_write_side_by_side_but_not_with_a_whole_folder_writer(tmp_path):
    folder = tmp_path / "crf"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.replace("output_lock(sys.argv[1])",
                                                                  "output_lock(sys.argv[1], 'ids-aaa')"), str(folder)],
                            env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    try:
        with output_lock(folder, "ids-bbb"):  # another shard: fine
            pass
        with pytest.raises(FolderLockedError):
            with output_lock(folder, "ids-aaa"):  # the same ids
                pass
        with pytest.raises(FolderLockedError):
            with output_lock(folder):  # the whole folder
                pass
    finally:
        kill(proc)


@pytest.mark.parametrize("stage", ["cam", "crf", "convert"])
def test_every_stage_refuses_a_folder_another_process_writes(stage, trained_run, data_root, tmp_path):
    out = tmp_path / "out"
    proc = hold_lock(out)
    try:
        if stage == "cam":
            argv = ["cam", str(trained_run), "--out", str(out)]
        elif stage == "crf":
            argv = ["crf", "--seeds", str(trained_run / "seeds"), "--images", str(data_root / "JPEGImages"),
                    "--out", str(out), "--threshold", "0.3", "--workers", "1"]
        else:
            from fsae.formats import convert_seeds

            with pytest.raises(FolderLockedError, match=f"pid {proc.pid}"):
                convert_seeds(tmp_path, "irn", out, ["a"])
            return
        assert cli(argv) == 2
        assert not out.exists() and not stamp_path(out).exists()
    finally:
        kill(proc)


def test_two_fsae_train_into_one_folder_the_second_exits_2_with_one_line(data_root, tmp_path):
    cfg = tiny_config(data_root)
    cfg.train.epochs = 200  # long enough to be running when the second starts
    save_config(cfg, tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "fsae", "train", str(tmp_path / "cfg.yaml"), "--out", str(run)]
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lock_path(run).exists() or not (run / "config.yaml").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fsae: error:"), second.stderr
        assert str(run) in lines[0] and f"pid {first.pid}" in lines[0]
    finally:
        kill(first)


# ---------------------------------------------------------------------------------------- --force


def _stamp(n):
    return make_stamp("test", {}, {"n": n})


def test_force_builds_beside_and_a_failure_keeps_the_old_outputs_and_stamp(tmp_path):
    folder = tmp_path / "out"
    with stage_output(folder, _stamp(1), False, ("*.txt",)) as target:
        assert target == folder
        for i in range(3):
            (target / f"{i}.txt").write_text("old")
    (folder / "notes.md").write_text("kept")  # not an output of the stage
    with pytest.raises(DataError):
        with stage_output(folder, _stamp(2), True, ("*.txt",)) as target:
            assert target == staging_path(folder)
            (target / "0.txt").write_text("new")
            raise DataError("a corrupt image")
    assert sorted(p.name for p in folder.iterdir()) == ["0.txt", "1.txt", "2.txt", "notes.md"]
    assert {(folder / f"{i}.txt").read_text() for i in range(3)} == {"old"} and read_stamp(folder) == _stamp(1)
    assert (staging_path(folder) / "0.txt").read_text() == "new"  # kept: a forced rerun resumes there
    with stage_output(folder, _stamp(2), True, ("*.txt",)) as target:
        assert (target / "0.txt").is_file()  # resumed
        (target / "1.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["0.txt", "1.txt", "notes.md"]
    assert read_stamp(folder) == _stamp(2) and not staging_path(folder).exists()
    assert not stamp_path(staging_path(folder)).exists()


def test_a_stage_that_stops_before_its_first_output_leaves_no_stamped_folder(tmp_path):
    folder = tmp_path / "seeds"
    with pytest.raises(DataError):
        with stage_output(folder, _stamp(1), False, ("*.npz",)):
            raise DataError("wrong-size mask")
    assert not folder.exists() and not stamp_path(folder).exists()
    folder.mkdir()  # a folder the user made stays, without a stamp
    with pytest.raises(KeyboardInterrupt):
        with stage_output(folder, _stamp(1), False, ("*.npz",)):
            raise KeyboardInterrupt
    assert folder.is_dir() and not stamp_path(folder).exists()


def test_a_shared_folder_keeps_its_stamp_while_another_job_writes_it(tmp_path):
    folder = tmp_path / "crf"
    holder = HOLDER.replace("output_lock(sys.argv[1])", "output_lock(sys.argv[1], 'ids-aaa')")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    try:
        with pytest.raises(DataError):
            with stage_output(folder, _stamp(1), False, ("*.png",), part="ids-bbb"):
                raise DataError("the first image of this shard is corrupt")
        assert read_stamp(folder) == _stamp(1)  # the other shard's stamp too
    finally:
        kill(proc)
    with pytest.raises(DataError):
        with stage_output(folder, _stamp(1), False, ("*.png",), part="ids-bbb"):
            raise DataError("again, alone this time")
    assert not stamp_path(folder).exists()  # (the folder itself was made by the first run: it stays, empty)


def test_crf_stopping_on_its_first_image_leaves_no_folder(trained_run, data_root, tmp_path):
    from fsae.refine.crf import refine_dir

    with pytest.raises(DataError, match="image file not found"):
        refine_dir(trained_run / "seeds", tmp_path / "no_images", tmp_path / "crf", ["train_00000"], 0.3, workers=1,
                   progress=False)
    assert not (tmp_path / "crf").exists() and not stamp_path(tmp_path / "crf").exists()


def test_a_swap_cut_short_by_a_kill_is_finished_by_the_next_run(tmp_path):
    from fsae.stamps import OLD_SUFFIX

    folder = tmp_path / "out"
    old = tmp_path / f".out{OLD_SUFFIX}"
    old.mkdir()
    (old / "a.txt").write_text("old")  # killed between renaming the old folder aside and the new one in
    write_json(stamp_path(folder), _stamp(1))
    with stage_output(folder, _stamp(1), False, ("*.txt",)) as target:
        assert (target / "a.txt").read_text() == "old"  # the old output is back, and resumes
    assert not old.exists()


def test_cam_force_with_a_corrupt_image_keeps_every_old_seed(trained_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    before = {p.name: array_digest(p) for p in outputs(run / "seeds", ".npz")}
    stamp = stamp_path(run / "seeds").read_bytes()
    assert len(before) == 16
    (root / "JPEGImages" / "train_00005.jpg").write_bytes(b"not a jpeg")
    assert cli(["cam", str(run), "--force", "--set", f"data.root={root}", "--set", "infer.scales=[1.0]"]) == 2
    assert {p.name: array_digest(p) for p in outputs(run / "seeds", ".npz")} == before
    assert stamp_path(run / "seeds").read_bytes() == stamp
    shutil.copy(data_root / "JPEGImages" / "train_00005.jpg", root / "JPEGImages")
    assert cli(["cam", str(run), "--force", "--set", f"data.root={root}", "--set", "infer.scales=[1.0]"]) == 0
    assert len(outputs(run / "seeds", ".npz")) == 16 and not staging_path(run / "seeds").exists()
    assert json.loads(stamp_path(run / "seeds").read_text())["settings"]["scales"] == [1.0]


def test_cam_stopping_on_a_wrong_size_mask_leaves_no_seed_folder(trained_run, data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    first = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    write_mask(root / "SegmentationClass" / f"{first}.png", np.zeros((5, 7), np.uint8))
    out = tmp_path / "seeds"
    assert cli(["cam", str(trained_run), "--out", str(out), "--set", f"data.root={root}"]) == 2
    assert not out.exists() and not stamp_path(out).exists()


# ---------------------------------------------------------------------------------------- --out paths


def test_eval_report_and_compare_refuse_a_folder_and_a_foreign_file(trained_run, data_root, tmp_path, capsys):
    from fsae.compare import compare_markdown, compare_runs, write_comparison
    from fsae.evaluate import save_eval
    from fsae.report import write_report

    folder = tmp_path / "existing"
    folder.mkdir()
    base = ["eval", "--seeds", str(trained_run / "seeds"), "--gt", str(data_root / "SegmentationClass"),
            "--num-classes", "4", "--out"]
    for argv in (base + [str(folder)], ["report", str(trained_run), "--out", str(folder)],
                 ["compare", str(trained_run), str(trained_run), "--out", str(folder)]):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("fsae: error:") == 1 and "Traceback" not in err and "is a folder" in err, err
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    with pytest.raises(DataError, match="not an fsae evaluation"):
        save_eval(foreign, {"miou": 0.5})
    assert foreign.read_text() == '{"my": "notes"}'
    save_eval(tmp_path / "ev.json", {"miou": 0.5})
    save_eval(tmp_path / "ev.json", {"miou": 0.25})  # its own file: replaced
    assert json.loads((tmp_path / "ev.json").read_text())["miou"] == 0.25
    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><title>my page</title>")
    with pytest.raises(DataError, match="not an fsae report"):
        write_report(trained_run, out=page, compute=False)
    assert write_report(trained_run, out=tmp_path / "r.html", compute=False) == tmp_path / "r.html"
    assert write_report(trained_run, out=tmp_path / "r.html", compute=False) == tmp_path / "r.html"
    summaries = compare_runs([trained_run], compute=False)
    text = compare_markdown(summaries)
    for name in ("table.md", "table.json"):
        write_comparison(tmp_path / name, summaries, text)
        write_comparison(tmp_path / name, summaries, text)
    with pytest.raises(DataError, match="not an fsae comparison"):
        write_comparison(foreign, summaries, text)


# ---------------------------------------------------------------------------------------- out of memory

CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 108000000000 bytes. Error code 12 "
           "(Cannot allocate memory)")


def test_cam_out_of_memory_names_the_image_its_size_and_what_to_lower(trained_run, monkeypatch):
    from fsae.data import build_dataset
    from fsae.infer import infer_seeds
    from fsae.memory import OutOfMemory
    from fsae.train import model_from_checkpoint

    model, cfg = model_from_checkpoint(trained_run / "checkpoints" / "last.pt")
    dataset = build_dataset(cfg.data, cfg.data.train_split)

    def no_memory(x):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(model, "cam", no_memory)
    with pytest.raises(OutOfMemory) as info:
        infer_seeds(model, dataset, trained_run / "oom_seeds", scales=[1.0, 2.0], batch_size=1, progress=False)
    message = str(info.value)
    assert str(dataset.image_path(dataset.ids[0])) in message and "32x32" in message
    assert "infer.scales (now [1.0, 2.0])" in message and "infer.batch_size" in message and "\n" not in message
    assert not (trained_run / "oom_seeds").exists()

    def other_error(x):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "cam", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not memory: untouched
        infer_seeds(model, dataset, trained_run / "oom_seeds", batch_size=1, progress=False)


def test_crf_and_seg_inference_out_of_memory_are_named(trained_run, data_root, tmp_path, monkeypatch):
    from fsae.memory import OutOfMemory
    from fsae.refine import crf
    from fsae.segment import infer as seg_infer  # imported before crf_inference is patched: it keeps the real one

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.20 GiB for an array with shape (21, 3000, 3000)")

    monkeypatch.setattr(crf, "crf_inference", no_memory)
    with pytest.raises(OutOfMemory, match=r"train_00000\.jpg: out of memory in dense CRF on a 32x32 image.*--workers"):
        crf.refine_dir(trained_run / "seeds", data_root / "JPEGImages", tmp_path / "crf", ["train_00000"], 0.3,
                       workers=1, progress=False)

    model, cfg = _seg_model(data_root)

    def cuda_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(seg_infer, "mixed_forward", cuda_oom)
    with pytest.raises(OutOfMemory, match=r"val_00000\.jpg: out of memory in DeepLab inference on a 32x32 image "
                                          r"\(CUDA out of memory.*infer\.scales"):
        seg_infer.run_seg_inference(model, cfg, tmp_path / "seg", progress=False)


# ---------------------------------------------------------------------------------------- odd inputs

GOOD_XML = "<annotation><object><name>dog</name><part><name>head</name></part></object></annotation>"


def test_data_check_counts_malformed_and_unknown_class_xml(data_root, tmp_path, capsys):
    from fsae.data.check import check_dataset
    from fsae.data.voc import xml_image_labels

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "meta.json").unlink()  # VOC's 20 classes: the XML names VOC classes
    notes = root / "Annotations"
    notes.mkdir()
    (notes / "train_00001.xml").write_text("<annotation><object><name>dog</name>")  # cut short
    (notes / "train_00002.xml").write_text(GOOD_XML.replace("dog", "pottedplants"))
    (notes / "train_00003.xml").write_text(GOOD_XML)
    assert xml_image_labels(notes / "train_00003.xml") == [12]  # dog; the part's "head" is no object
    with pytest.raises(DataError, match=r"\['pottedplants'\] are no VOC class"):
        xml_image_labels(notes / "train_00002.xml")
    found = [p for p in check_dataset("voc", root, num_classes=4) if p.path.endswith(".xml")]
    assert [(Path(p.path).name, "not a readable" in p.message or "no VOC class" in p.message) for p in found] == [
        ("train_00001.xml", True), ("train_00002.xml", True)]
    code = cli(["data", "check", "voc", "--root", str(root), "--num-classes", "4"])
    out = capsys.readouterr().out
    assert code == 1 and "no problems found" not in out
    assert "train_00001.xml: not a readable VOC annotation file" in out and "pottedplants" in out


def test_a_checkpoint_of_the_wrong_kind_names_its_kind_and_command(trained_run, data_root, tmp_path):
    from fsae.segment.train import load_seg_checkpoint
    from fsae.train import load_checkpoint

    cam_ckpt = trained_run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=r"a CAM checkpoint \(from `fsae train`\): `fsae cam` takes it"):
        load_seg_checkpoint(cam_ckpt)
    state = {"kind": "segmentation", "model": {}, "config": {"data": {"test_split": "test"}}, "iteration": 1}
    torch.save(state, tmp_path / "deeplab.pt")
    with pytest.raises(CheckpointError, match=r"a DeepLab checkpoint \(from `fsae seg train`\): `fsae seg infer`"):
        load_checkpoint(tmp_path / "deeplab.pt")


def test_a_truncated_checkpoint_says_what_to_do(trained_run, tmp_path):
    from fsae.train import load_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    data = (trained_run / "checkpoints" / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder / "last.pt")
    assert "truncated or corrupt" in str(info.value) and "(no best.pt beside it)" in str(info.value)
    assert "--no-resume" in str(info.value)
    (folder / "best.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"use .*best\.pt \(--checkpoint best\), or train again"):
        load_checkpoint(folder / "last.pt")


def test_mask_warnings_name_dominant_labels_and_missing_classes(tmp_path):
    ids = [f"i{k}" for k in range(4)]
    for k, image_id in enumerate(ids):
        mask = np.zeros((10, 10), np.uint8)
        if k == 0:
            mask[:2, :3] = 2  # 6 px of class 2 in one of the four images labelled 2
        mask[9, 9] = 255  # ignored
        write_mask(tmp_path / f"{image_id}.png", mask)
    labels = {i: [2] for i in ids}
    lines = mask_warnings(tmp_path, ids, labels)
    # 6 of 4 x 99 labelled pixels are class 2: background 390 / 396 = 98.5 %
    assert lines == [f"{tmp_path}: label 0 (background) covers 98.5 % of the labelled pixels of 4 checked masks "
                     f"(>= 95 %): the pseudo-masks are degenerate",
                     f"{tmp_path}: class 2 is in the image labels of 4 checked images but missing from 3 of their masks"]
    for image_id in ids[1:2]:  # class 2 in two of four: half, not more than half; 2 x 30 px of 396
        mask = read_mask(tmp_path / f"{image_id}.png")
        mask[:3, :10] = 2
        write_mask(tmp_path / f"{image_id}.png", mask)
    mask = read_mask(tmp_path / "i0.png")
    mask[:3, :10] = 2
    write_mask(tmp_path / "i0.png", mask)
    assert mask_warnings(tmp_path, ids, labels) == []  # 336 / 396 = 84.8 % background, 2 of 4 missing


def test_crf_of_all_background_seeds_warns(trained_run, data_root, tmp_path, capsys):
    from fsae.refine.crf import refine_dir

    ids = [p.stem for p in outputs(trained_run / "seeds", ".npz")]
    result = refine_dir(trained_run / "seeds", data_root / "JPEGImages", tmp_path / "crf", ids, threshold=1.0,
                        workers=1, progress=True, iterations=0)  # every CAM below the threshold: background
    assert len(result["warnings"]) >= 1 and "label 0 (background) covers 100.0 %" in result["warnings"][0]
    assert "fsae: warning: " + result["warnings"][0] in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- ground truth


def _seg_cfg(root, mask_dir):
    from fsae.segment.config import SegConfig

    cfg = SegConfig()
    cfg.data.root, cfg.data.num_classes, cfg.data.mask_dir, cfg.data.crop_size = str(root), 4, str(mask_dir), 32
    cfg.data.test_split = ""
    cfg.model.backbone, cfg.model.width, cfg.model.weights = "tinycnn", 8, None
    cfg.train.iterations, cfg.train.batch_size, cfg.train.checkpoint_every = 1, 2, 1
    cfg.infer.scales = [1.0]
    return cfg


def _seg_model(root):
    from fsae.segment.deeplab import build_deeplab

    cfg = _seg_cfg(root, "SegmentationClass")
    torch.manual_seed(0)
    return build_deeplab(cfg.model, 4).eval(), cfg


def test_deeplab_never_trains_on_the_ground_truth_by_accident(data_root, tmp_path):
    from fsae.segment.train import train_segmentation

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "meta.json").unlink()  # a data set of one's own: refused as a generated one is
    gt = root / "SegmentationClass"
    (tmp_path / "link").symlink_to(gt)
    shutil.copytree(gt, tmp_path / "copy")
    for masks, why in ((gt, "is the data set's ground-truth folder"), (tmp_path / "link", "ground-truth folder"),
                       (tmp_path / "copy", "equal the ground truth")):
        with pytest.raises(DataError, match=why) as info:
            train_segmentation(_seg_cfg(root, masks), tmp_path / "run", progress=False)
        assert "--allow-gt" in str(info.value)
        assert not (tmp_path / "run").exists()
    first = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    changed = tmp_path / "copy" / f"{first}.png"  # the first id is always among the checked ones
    mask = read_mask(changed)
    mask[0, 0] = 255
    write_mask(changed, mask)
    assert train_segmentation(_seg_cfg(root, tmp_path / "copy"), tmp_path / "ok", progress=False).is_file()
    path = train_segmentation(_seg_cfg(root, gt), tmp_path / "upper", progress=False, allow_gt=True)
    assert torch.load(path, weights_only=True)["allow_gt"] is True
    assert "allow_gt" not in torch.load(tmp_path / "ok" / "checkpoints" / "last.pt", weights_only=True)


# ---------------------------------------------------------------------------------------- seg infer


def test_seg_infer_skips_a_missing_test_list_with_a_note_and_scores_val(data_root, tmp_path, capsys):
    from fsae.segment.infer import run_seg_inference

    model, cfg = _seg_model(data_root)
    cfg.data.test_split = "test"  # the generated set has no test.txt, as a VOC trainval download
    results = run_seg_inference(model, cfg, tmp_path / "seg", progress=True)
    assert "test.txt: image list not found" in results["test"]["note"] and results["test"]["dirs"] == []
    assert 0 <= results["val"]["eval"]["val"]["miou"] <= 1
    assert "fsae: note: " in capsys.readouterr().err
    with pytest.raises(DataError, match="test.txt: image list not found"):  # asked for by name: an error, at once
        run_seg_inference(model, cfg, tmp_path / "named", splits=["val", "test"], progress=False)
    assert not (tmp_path / "named").exists()


def test_seg_infer_checks_every_split_before_any_work_and_keeps_the_val_miou(data_root, tmp_path):
    from fsae.segment.infer import run_seg_inference

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    model, cfg = _seg_model(root)
    (root / "JPEGImages" / "train_00003.jpg").unlink()
    with pytest.raises(DataError, match=r"train_00003\.jpg: image file not found .*nothing was predicted"):
        run_seg_inference(model, cfg, tmp_path / "a", splits=["val", "train"], progress=False)
    assert not (tmp_path / "a").exists()
    shutil.copy(data_root / "JPEGImages" / "train_00003.jpg", root / "JPEGImages")
    (root / "JPEGImages" / "train_00003.jpg").write_bytes(b"corrupt")  # found only when it is read
    with pytest.raises(DataError, match=r"cannot read image.*\(val mIoU \d+\.\d\d, .*saved in"):
        run_seg_inference(model, cfg, tmp_path / "b", splits=["val", "train"], progress=False)
    assert (tmp_path / "b" / "eval" / "seg_val.json").is_file()
