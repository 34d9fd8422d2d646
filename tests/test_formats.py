"""The base repositories' seed files (fsae.formats): read, scored and converted like fsae's own seeds.

Each test writes small files in a repository's own layout (np.save of a dict, as its inference script
does) and checks fsae's sweep against (a) the same maps as fsae .npz seeds and (b) a plainly written
reference of that repository's evaluation, at every threshold.
"""

import json

import numpy as np
import pytest
import torch

from fsae.cli import main
from fsae.evaluate import default_thresholds, evaluate_seeds
from fsae.formats import detect_format, read_foreign_seed
from fsae.infer import save_seed
from fsae.io import write_mask

C = 4
THRESHOLDS = default_thresholds(0.0, 0.6, 0.05)
SWEEP = ["--sweep", "0", "0.6", "0.05"]
# (id, image size, present classes as 0-based foreground indices); every label 0..C is in some GT.
IMAGES = [("a", (6, 7), [0, 2]), ("b", (5, 5), [1, 3]), ("c", (4, 9), [0, 1, 3])]


def _scenes(seed=0):
    """Per image: id, GT (H, W) with some 255, maps (K, H, W) float32 on a 1/64 grid (float16-exact, with
    ties between classes and at thresholds 0, 0.25, 0.5), a background map for SIPE, the classes."""
    rng = np.random.default_rng(seed)
    out = []
    for image_id, (h, w), present in IMAGES:
        classes = np.array(present)
        maps = (rng.integers(0, 65, (len(present), h, w)) / 64).astype(np.float32)
        background = (rng.integers(0, 65, (h, w)) / 64).astype(np.float32)
        gt = rng.choice(np.concatenate([[0], classes + 1]), (h, w)).astype(np.uint8)
        gt[0, :2] = 255
        maps[:, -1, :3] = 0.75  # a tie between every present class: the first in class order wins
        gt[-1, :3] = classes[-1] + 1
        out.append((image_id, gt, maps, background, classes))
    return out


# Writers in each repository's layout.
def _write_irn(path, maps, background, classes):
    # jiwoon-ahn/irn step/make_cam.py:46-56: keys = nonzero(label) (a torch tensor), "cam" a stride-4
    # torch tensor, "high_res" a numpy array at image size.
    strided = torch.from_numpy(maps[:, ::4, ::4].copy())
    np.save(path, {"keys": torch.tensor(classes, dtype=torch.int64), "cam": strided, "high_res": maps})


def _write_sipe(path, maps, background, classes):
    # chenqi1126/SIPE make_cam.py:51,68-70: label padded with background in front, keys label space.
    keys = np.concatenate([[0], classes + 1]).astype(np.int64)
    np.save(path, {"keys": keys, "IS_CAM": np.concatenate([background[None], maps])})


def _write_psa(path, maps, background, classes):
    # jiwoon-ahn/psa infer_cls.py:77-83: cam_dict[i] = norm_cam[i] (written here in reverse order).
    np.save(path, {int(c): m for c, m in reversed(list(zip(classes, maps)))})


def _write_mctformer(path, maps, background, classes):
    # xulianuwa/MCTformer@9606597 engine.py:191-208: the same dict, float16 maps under autocast.
    np.save(path, {int(c): m.astype(np.float16) for c, m in zip(classes, maps)})


WRITERS = {"irn": _write_irn, "sipe": _write_sipe, "psa": _write_psa, "mctformer": _write_mctformer}


# Plain references of each repository's evaluation.
def _confusion(pred, gt, k):
    keep = gt != 255
    return np.bincount(gt[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


def _nanmean_iou(conf):
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    return float(np.nanmean(iou))


def _reference_irn(files, gts, t):
    # irn step/eval_cam.py:13-27 (chainercv's VOC labels have 255 as -1: ignored).
    conf = 0
    for f, gt in zip(files, gts):
        d = np.load(f, allow_pickle=True).item()
        cams = np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=t)
        keys = np.pad(np.asarray(d["keys"]) + 1, (1, 0), mode="constant")
        conf = conf + _confusion(keys[np.argmax(cams, axis=0)], gt, C + 1)
    return _nanmean_iou(conf)


def _reference_sipe(files, gts, t):
    # SIPE eval_cam.py:17-34: plain argmax over IS_CAM, keys[argmax]; confusion cut to num_cls.
    conf = 0
    for f, gt in zip(files, gts):
        d = np.load(f, allow_pickle=True).item()
        conf = conf + _confusion(d["keys"][np.argmax(d["IS_CAM"], axis=0)], gt, C + 1)
    return _nanmean_iou(conf)


def _reference_mctformer(files, gts, t):
    # MCTformer@9606597 evaluation.py:28-75: tensor[key+1] = map, tensor[0] = t, argmax; IoU with +1e-10,
    # mean over every class. PSA's own thresholded prediction is the same argmax (infer_cls.py:86-87).
    tp, p, g = np.zeros(C + 1), np.zeros(C + 1), np.zeros(C + 1)
    for f, gt in zip(files, gts):
        d = np.load(f, allow_pickle=True).item()
        h, w = list(d.values())[0].shape
        tensor = np.zeros((C + 1, h, w), np.float32)
        for key in d:
            tensor[key + 1] = d[key]
        tensor[0] = t
        pred = np.argmax(tensor, axis=0)
        cal = gt < 255
        for i in range(C + 1):
            p[i] += np.sum((pred == i) * cal)
            g[i] += np.sum((gt == i) * cal)
            tp[i] += np.sum((gt == i) * (pred == gt) * cal)
    return float(np.mean(tp / (g + p - tp + 1e-10)))


REFERENCES = {"irn": _reference_irn, "sipe": _reference_sipe, "psa": _reference_mctformer,
              "mctformer": _reference_mctformer}


@pytest.fixture
def dirs(tmp_path):
    scenes = _scenes()
    gt_dir = tmp_path / "gt"
    for image_id, gt, *_ in scenes:
        write_mask(gt_dir / f"{image_id}.png", gt)
    return tmp_path, gt_dir, scenes


def _write(tmp_path, scenes, fmt):
    """The scenes in ``fmt``'s layout, and the same maps as fsae seeds (with SIPE's background)."""
    foreign, fsae = tmp_path / fmt, tmp_path / f"{fmt}_fsae"
    foreign.mkdir()
    for image_id, _, maps, background, classes in scenes:
        WRITERS[fmt](foreign / f"{image_id}.npy", maps, background, classes)
        save_seed(fsae / f"{image_id}.npz", classes + 1, maps, background if fmt == "sipe" else None)
    return foreign, fsae


@pytest.mark.parametrize("fmt", ["irn", "sipe", "psa", "mctformer"])
def test_foreign_seeds_score_like_fsae_seeds_and_the_reference(dirs, fmt, capsys):
    tmp_path, gt_dir, scenes = dirs
    foreign, fsae = _write(tmp_path, scenes, fmt)
    ids = [s[0] for s in scenes]
    got = evaluate_seeds(foreign, gt_dir, ids, C, THRESHOLDS, progress=False, seed_format=fmt)
    same = evaluate_seeds(fsae, gt_dir, ids, C, THRESHOLDS, progress=False)
    assert got["miou"] == same["miou"] and got["best"] == same["best"]
    files, gts = [foreign / f"{i}.npy" for i in ids], [s[1] for s in scenes]
    reference = [REFERENCES[fmt](files, gts, t) for t in THRESHOLDS]
    np.testing.assert_allclose(got["miou"], reference, rtol=0, atol=1e-9)
    if fmt != "sipe":  # the threshold matters: the sweep is not flat
        assert len(set(np.round(reference, 9))) > 3

    # the CLI detects the format from the first file ("psa" for the class-index dict MCTformer writes too)
    out = tmp_path / f"{fmt}.json"
    assert main(["eval", "--seeds", str(foreign), "--gt", str(gt_dir), "--num-classes", str(C), *SWEEP,
                 "--out", str(out)]) == 0
    assert f"seed format: {'psa' if fmt == 'mctformer' else fmt} (detected" in capsys.readouterr().out
    assert json.loads(out.read_text())["miou"] == pytest.approx(same["miou"], abs=0)


@pytest.mark.parametrize("fmt", ["irn", "sipe", "psa", "mctformer"])
def test_convert_writes_fsae_seeds_that_score_the_same(dirs, fmt):
    tmp_path, gt_dir, scenes = dirs
    foreign, _ = _write(tmp_path, scenes, fmt)
    ids = [s[0] for s in scenes]
    out = tmp_path / "converted"
    assert main(["convert", str(foreign), "--format", fmt, "--out", str(out), "--num-classes", str(C)]) == 0
    direct = evaluate_seeds(foreign, gt_dir, ids, C, THRESHOLDS, progress=False, seed_format=fmt)
    converted = evaluate_seeds(out, gt_dir, ids, C, THRESHOLDS, progress=False)
    assert converted["miou"] == direct["miou"]
    for image_id, _, maps, background, classes in scenes:
        with np.load(out / f"{image_id}.npz") as z:
            assert z["keys"].dtype == np.int64 and z["keys"].tolist() == (classes + 1).tolist()
            assert z["cams"].dtype == np.float16 and np.array_equal(z["cams"], maps)
            assert ("background" in z.files) == (fmt == "sipe")
            if fmt == "sipe":
                assert z["background"].dtype == np.float16 and np.array_equal(z["background"], background)
    assert sorted(p.name for p in out.iterdir()) == ["a.npz", "b.npz", "c.npz"]  # no temporary files left


def test_convert_clips_negatives_and_refuses_values_above_one(tmp_path):
    src = tmp_path / "seam"
    src.mkdir()
    # SEAM's min-max leaves about -1e-5 where the CAM was clipped (obeychoi0120/wseg contrast_infer.py:213)
    np.save(src / "a.npy", {1: np.array([[-1e-5, 0.5]], np.float32)})
    assert main(["convert", str(src), "--format", "psa", "--out", str(tmp_path / "out")]) == 0
    with np.load(tmp_path / "out" / "a.npz") as z:
        assert z["cams"].tolist() == [[[0.0, 0.5]]] and z["keys"].tolist() == [2]
    np.save(src / "a.npy", {1: np.array([[0.0, 3.0]], np.float32)})
    assert main(["convert", str(src), "--format", "psa", "--out", str(tmp_path / "out2")]) == 2


def test_convert_into_a_folder_of_other_seeds_is_refused(tmp_path, capsys):
    """Seeds converted from another folder (or another format) are not mixed with the new ones."""
    for name, value in (("a", 0.5), ("b", 0.25)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", {1: np.array([[value, 0.5]], np.float32)})
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "a"), "--format", "psa", "--out", str(out)]) == 0
    assert main(["convert", str(tmp_path / "a"), "--format", "psa", "--out", str(out)]) == 0  # the same: redone
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "b"), "--format", "psa", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "out: made with source files-" in err and "rerun with --force" in err, err
    with np.load(out / "x.npz") as z:
        assert z["cams"].tolist() == [[[0.5, 0.5]]]  # the old seed is untouched
    assert main(["convert", str(tmp_path / "b"), "--format", "psa", "--out", str(out), "--force"]) == 0
    with np.load(out / "x.npz") as z:
        assert z["cams"].tolist() == [[[0.25, 0.5]]]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


def _bad_files(tmp_path):
    """(format, what np.save writes as a.npy, expected message) for bad seed files; GT a is 2 x 3."""
    ok = np.full((2, 3), 0.5, np.float32)
    return [
        ("psa", np.zeros((2, 2, 3), np.float32), "holds a float32 array of shape (2, 2, 3), not a dict"),
        ("irn", {"keys": np.array([0]), "cam": ok[None]}, "lacks ['high_res']"),
        ("sipe", {"keys": np.array([0, 1]), "high_res": ok[None]}, "lacks ['IS_CAM']"),
        ("psa", {"keys": np.array([0]), "high_res": ok[None]}, "is a dict {class index: (H, W) map}"),
        ("psa", {0: ok, C: ok}, f"class index [{C}] out of range 0..{C - 1}"),
        ("irn", {"keys": np.array([-1]), "high_res": ok[None]}, "class index [-1] out of range 0..3"),
        ("irn", {"keys": np.array([0.0]), "high_res": ok[None]}, "'keys' must be a 1-D integer array"),
        ("irn", {"keys": np.array([0, 1]), "high_res": ok[None]}, "'high_res' has 1 maps for 2 'keys'"),
        ("sipe", {"keys": np.array([1, 2]), "IS_CAM": np.stack([ok, ok])}, "must start with 0"),
        ("sipe", {"keys": np.array([0, C + 1]), "IS_CAM": np.stack([ok, ok])}, "out of range 1..4"),
        ("psa", {0: ok[:, :2]}, "does not match ground truth"),
        ("psa", {0: ok, 1: ok[:1]}, "class maps differ in size"),
        ("mctformer", {0: np.full((2, 3), np.nan, np.float16)}, "contains NaN or inf"),
        ("psa", {0: _RunsCode(tmp_path / "ran")}, "pickles os.makedirs, not read"),
        ("psa", {0: ok, 3: 1 - ok}, "a dense-CRF output dict (0 = background)"),  # psa infer_cls.py:98-100
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_foreign_files_give_one_line_naming_the_file(tmp_path, case, capsys):
    fmt, content, message = _bad_files(tmp_path)[case]
    seeds, gt = tmp_path / "seeds", tmp_path / "gt"
    seeds.mkdir()
    write_mask(gt / "a.png", np.zeros((2, 3), np.uint8))
    np.save(seeds / "a.npy", content, allow_pickle=True)
    code = main(["eval", "--seeds", str(seeds), "--gt", str(gt), "--num-classes", str(C), "--format", fmt])
    err = capsys.readouterr().err  # the progress bar, then the error
    line = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and line.startswith("fsae: error: ") and "Traceback" not in err
    assert str(seeds / "a.npy") in line and message in line, err
    assert not (tmp_path / "ran").exists()  # the pickled call was never made


def test_unreadable_files_and_unclear_formats(tmp_path, capsys):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.npy").write_bytes(b"not a numpy file")
    with pytest.raises(Exception, match=r"a\.npy: cannot read it as an np\.save of a dict"):
        detect_format(seeds)
    np.save(seeds / "a.npy", {0: np.zeros((2, 2))})
    (seeds / "a.npy").write_bytes((seeds / "a.npy").read_bytes()[:-20])  # truncated
    with pytest.raises(Exception, match=r"a\.npy: cannot read it"):
        read_foreign_seed(seeds / "a.npy", "psa")
    np.save(seeds / "a.npy", {"keys": [0], "high_res": 0, "IS_CAM": 0})
    with pytest.raises(Exception, match=r"a\.npy: has both irn .* and sipe .*; pass --format"):
        detect_format(seeds)
    np.save(seeds / "a.npy", {"cams": 0})
    with pytest.raises(Exception, match=r"a\.npy: cannot tell its format .*'cams'"):
        detect_format(seeds)
    save_seed(seeds / "b.npz", np.array([1]), np.zeros((1, 2, 2)))
    with pytest.raises(Exception, match=r"seeds: has both \.npz \(fsae\) and \.npy seed files; pass --format"):
        detect_format(seeds)
    assert detect_format(seeds, ["b"]) == "fsae"
    (seeds / "a.npy").unlink()
    assert detect_format(seeds) == "fsae"
    assert main(["convert", str(seeds), "--out", str(tmp_path / "out")]) == 2
    assert "holds fsae seeds (.npz) already" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--seeds", str(empty), "--gt", str(empty), "--num-classes", "2"]) == 2
    assert "empty: no seed files" in capsys.readouterr().err
    assert main(["eval", "--masks", str(empty), "--gt", str(empty), "--num-classes", "2", "--format", "irn"]) == 2
    assert "--format applies to --seeds" in capsys.readouterr().err
