"""What people look at: TensorBoard events = the CSV rows, the HTML report's images and tables, and
`fsae compare`'s deltas against hand-computed ones."""

import base64
import csv
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fsae.cli import main as cli
from fsae.compare import compare_markdown, compare_runs, compare_table
from fsae.config import Config, save_config
from fsae.data.voc import VOCDataset
from fsae.demo import demo_config
from fsae.errors import ConfigError
from fsae.infer import save_seed
from fsae.io import read_mask, write_json
from fsae.report import pct, write_report
from fsae.tblog import read_scalars
from fsae.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(root, epochs=2):
    cfg = demo_config("fsae", root, seed=0)
    cfg.data.long_side = None
    cfg.data.crop_size = 64
    cfg.model.width = 8
    cfg.model.background_logit = 5.0  # untrained: low CAMs are confident background, so FSAE logs its statistics
    cfg.train.epochs = epochs
    cfg.train.batch_size = 8
    cfg.train.log_every = 1
    cfg.fsae.start_epoch = 0
    cfg.infer.scales = [1.0]
    cfg.eval.sweep = [0.0, 0.6, 0.05]
    return cfg


class Page(HTMLParser):
    """Image sources, and table cells row by row, of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def parse(path):
    page = Page()
    page.feed(Path(path).read_text())
    return page


# ------------------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_events_equal_the_csv_rows(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    run = tmp_path / "run"
    train(tiny_config(root), run, progress=False)
    scalars = read_scalars(run / "tb")
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 6  # 24 images / batch 8 x 2 epochs, a row per step
    for column in ("loss", "cls", "fsae", "lr", "mask_ratio", "pl_accuracy"):
        logged = dict(scalars[f"train/{column}"])
        assert sorted(logged) == [int(r["step"]) for r in rows]
        for r in rows:  # the CSV keeps 6 significant digits (rel. error <= 5e-6), the event file float32
            assert logged[int(r["step"])] == pytest.approx(float(r[column]), rel=6e-6, abs=1e-12), column
    epochs = list(csv.DictReader((run / "epochs.csv").read_text().splitlines()))
    val = dict(scalars["val/miou"])
    assert sorted(val) == [int(e["step"]) for e in epochs] == [3, 6]
    assert [val[int(e["step"])] for e in epochs] == pytest.approx([float(e["val_miou"]) for e in epochs], rel=6e-6)
    assert "train/step" not in scalars and "train/epoch" not in scalars


def test_tensorboard_off(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_config(root, epochs=1)
    cfg.train.tensorboard = False
    train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.csv").is_file() and not (tmp_path / "run" / "tb").exists()


# ---------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def finished_run(tiny_synthetic, tmp_path_factory):
    """A run directory after train (1 epoch), cam, crf and `fsae eval --seeds --out eval/seeds.json`."""
    root, _ = tiny_synthetic
    run = tmp_path_factory.mktemp("report") / "run"
    train(tiny_config(root, epochs=1), run, progress=False)
    assert cli(["cam", str(run)]) == 0
    assert cli(["crf", str(run), "--threshold", "0.3", "--workers", "1"]) == 0
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"), "--num-classes",
                "4", "--sweep", "0", "0.6", "0.05", "--out", str(run / "eval" / "seeds.json")]) == 0
    return run, root


def test_report_references_existing_images_and_holds_the_eval_numbers(finished_run, capsys):
    run, root = finished_run
    capsys.readouterr()
    assert cli(["report", str(run)]) == 0
    assert "report: file://" in capsys.readouterr().out
    page = parse(run / "report.html")
    # every figure the page references is a PNG next to it: curves, Fig. 6, IoU bars, the example grid
    assert len(page.images) == 4
    for src in page.images:
        assert not src.startswith(("/", "data:")) and src.startswith("report_files/")
        assert (run / src).read_bytes()[:8] == PNG_MAGIC
    cells = [cell for table in page.tables for row in table for cell in row]
    seeds = json.loads((run / "eval" / "seeds.json").read_text())
    summary = next(row for table in page.tables for row in table if row[0] == "eval/seeds.json")
    assert summary == ["eval/seeds.json", "seeds", "24", pct(seeds["best"]["miou"]), pct(seeds["best"]["fpr"]),
                       pct(seeds["best"]["fnr"]), f"{seeds['best']['threshold']:.2f}"]
    # the report evaluated crf/ itself (no eval of the masks existed): IoU per class, counted plainly here
    crf = json.loads((run / "eval" / "crf.json").read_text())
    ids = sorted(p.stem for p in (run / "crf").glob("*.png"))
    pred = np.stack([read_mask(run / "crf" / f"{i}.png") for i in ids])
    gt = np.stack([read_mask(root / "SegmentationClass" / f"{i}.png") for i in ids])
    keep = gt != 255
    for c in range(5):
        union = ((pred == c) | (gt == c))[keep].sum()
        expected = ((pred == c) & (gt == c))[keep].sum() / union if union else None
        assert crf["iou"][c] == (pytest.approx(expected) if expected is not None else None)
    class_rows = next(t for t in page.tables if t[0][0] == "class")
    assert class_rows[0] == ["class", "IoU crf", "IoU seeds"]
    assert [row[1] for row in class_rows[1:]] == [pct(v) for v in crf["iou"]]
    assert [row[2] for row in class_rows[1:]] == [pct(v) for v in seeds["best"]["iou"]]
    assert [row[0] for row in class_rows[1:]] == ["background", "class1", "class2", "class3", "class4"]
    epochs = list(csv.DictReader((run / "epochs.csv").read_text().splitlines()))
    assert pct(float(epochs[0]["val_miou"])) in cells
    assert "tau_fae: 0.95" in (run / "report.html").read_text()  # the resolved config


def test_report_embedded_is_one_file(finished_run, tmp_path):
    run, _ = finished_run
    out = write_report(run, out=tmp_path / "single.html", embed=True, num_images=2)
    page = parse(out)
    assert len(page.images) == 4 and not (tmp_path / "report_files").exists()
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC


def test_report_of_a_folder_of_runs_and_errors(finished_run, tmp_path):
    run, _ = finished_run
    with pytest.raises(ConfigError, match="not a run directory"):
        write_report(tmp_path)
    page = parse(write_report(run.parent, compute=False))  # the fixture's folder: one run in it
    assert page.tables[0][0][:2] == ["Run", "Seed mIoU"] and page.tables[0][1][0] == "run"
    assert all((run.parent / src).is_file() for src in page.images)


# --------------------------------------------------------------------------------------------- compare


def fake_run(path, seed=None, masks=None):
    """A run directory with config.yaml and hand-written eval JSONs (fractions)."""
    save_config(Config(name=path.name), path / "config.yaml")
    if seed is not None:
        miou, fpr, fnr, threshold = seed
        write_json(path / "eval" / "seeds.json", {"thresholds": [threshold], "miou": [miou], "count": 10, "best": {
            "threshold": threshold, "miou": miou, "fpr": fpr, "fnr": fnr, "iou": [0.9, miou], "coverage": 0.5}})
    if masks is not None:
        write_json(path / "eval" / "crf.json", {"miou": masks, "fpr": 0.1, "fnr": 0.1, "pixel_accuracy": 0.9,
                                                "iou": [0.9, masks], "count": 10})
    return path


def test_compare_deltas_against_the_first_run(tmp_path, capsys):
    base = fake_run(tmp_path / "base", seed=(0.500, 0.300, 0.200, 0.25), masks=0.600)
    ours = fake_run(tmp_path / "fsae", seed=(0.534, 0.250, 0.216, 0.30), masks=0.655)
    table = compare_table(compare_runs([base, ours], compute=False))
    assert table["header"] == ["Run", "Seed mIoU", "FPR", "FNR", "best threshold", "Pseudo-mask mIoU"]
    # by hand: 53.4 - 50.0 = +3.4, 25.0 - 30.0 = -5.0, 21.6 - 20.0 = +1.6, 65.5 - 60.0 = +5.5
    assert table["rows"] == [["base", "50.0", "30.0", "20.0", "0.25", "60.0"],
                             ["fsae", "53.4 (+3.4)", "25.0 (-5.0)", "21.6 (+1.6)", "0.30", "65.5 (+5.5)"]]
    out = tmp_path / "table.md"
    capsys.readouterr()
    assert cli(["compare", str(base), str(ours), "--no-compute", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fsae | 53.4 (+3.4) | 25.0 (-5.0) | 21.6 (+1.6) | 0.30 | 65.5 (+5.5) |" in printed
    assert out.read_text() in printed
    # a run without a pseudo-mask evaluation: n/a, and the others' column stays
    third = fake_run(tmp_path / "other", seed=(0.45, 0.35, 0.2, 0.2))
    rows = compare_table(compare_runs([base, third], compute=False))["rows"]
    assert rows[1] == ["other", "45.0 (-5.0)", "35.0 (+5.0)", "20.0 (+0.0)", "0.20", "n/a"]
    assert "difference from the first run, base" in compare_markdown(compare_runs([base, third], compute=False))


def test_compare_computes_seed_scores_when_no_eval(tiny_synthetic, tmp_path):
    """Seeds equal to the GT (mIoU 100) vs all-zero CAMs (everything background), scored by hand."""
    root, _ = tiny_synthetic
    train_set = VOCDataset(root, "train", num_classes=4)
    runs = {}
    for name in ("perfect", "blank"):
        cfg = Config(name=name)
        cfg.data.root, cfg.data.num_classes = str(root), 4
        runs[name] = tmp_path / name
        save_config(cfg, runs[name] / "config.yaml")
    gts = []
    for image_id in train_set.ids:
        gt = read_mask(train_set.mask_path(image_id))
        gts.append(gt)
        keys = np.array([c for c in range(1, 5) if (gt == c).any()])
        perfect = np.stack([(gt == c).astype(np.float32) for c in keys]) if keys.size else np.zeros((0, *gt.shape))
        save_seed(runs["perfect"] / "seeds" / f"{image_id}.npz", keys, perfect)
        save_seed(runs["blank"] / "seeds" / f"{image_id}.npz", keys, np.zeros_like(perfect))
    (runs["blank"] / "seeds" / ".train_00000.npz.x1.tmp.npz").write_bytes(b"partial")  # a killed write: skipped
    summaries = compare_runs([runs["perfect"], runs["blank"]])
    assert (runs["blank"] / "eval" / "seeds.json").is_file()  # computed once, kept for reruns
    perfect, blank = summaries
    assert (perfect["seed_miou"], perfect["seed_fpr"], perfect["seed_fnr"]) == (1.0, 0.0, 0.0)
    assert perfect["threshold"] == 0.15  # the plain CAM's protocol (fsae.protocol): IRN's fixed cam_eval_thres
    # blank: all background. Background IoU = bg pixels / valid pixels (FPR = the rest), classes in the
    # GT have IoU 0 and FNR 1; mIoU averages over background + the classes present.
    gt = np.concatenate([g.ravel() for g in gts])
    gt = gt[gt != 255]
    present = [c for c in range(1, 5) if (gt == c).any()]
    bg_iou = (gt == 0).sum() / gt.size
    assert blank["seed_miou"] == pytest.approx(bg_iou / (1 + len(present)))
    assert blank["seed_fpr"] == pytest.approx((1 - bg_iou) / (1 + len(present)))
    assert blank["seed_fnr"] == pytest.approx(len(present) / (1 + len(present)))
    row = compare_table(summaries)["rows"][1]
    assert row[1] == f"{100 * blank['seed_miou']:.1f} ({100 * (blank['seed_miou'] - 1):+.1f})"


def test_compare_does_not_import_the_html_report():
    """The run-directory helpers live in fsae.rundir: compare -> rundir, report -> compare, never back."""
    code = ("import sys, fsae.compare, fsae.rundir; print(sorted(m for m in ('fsae.report', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------- what the report leaves out, its key


def _logs(run, steps, epochs):
    """metrics.csv rows (step, epoch from 0, mask_ratio or None) and epochs.csv rows (epoch from 1, val_miou)."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "lr", "loss", "cls", "fsae", "mask_ratio", "pl_accuracy"])
        for step, epoch, ratio in steps:
            w.writerow([step, epoch, 0.1, 1.0, 1.0, "" if ratio is None else 0.5, "" if ratio is None else ratio,
                        "" if ratio is None else 0.9])
    with open(run / "epochs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "seconds", "val_miou", "val_fpr", "val_fnr", "val_threshold"])
        for epoch, miou in epochs:
            w.writerow([epoch, 2 * epoch, 1, miou, 0.1, 0.1, 0.2])
    return run


def test_training_curves_leave_out_what_has_nothing_to_show(tmp_path):
    from fsae.report import plot_training_curves, training_curves

    base = _logs(tmp_path / "base", [(1, 0, None), (2, 0, None), (3, 1, None)], [(1, 0.30), (2, 0.35)])
    fsae = _logs(tmp_path / "fsae", [(1, 0, None), (2, 0, 0.4), (3, 1, 0.5)], [(1, 0.31), (2, 0.36)])
    one = _logs(tmp_path / "one", [(1, 0, 0.4)], [(1, 0.3)])
    # the base run: held-out mIoU per epoch (1-based, as epochs.csv), no pseudo-label panels
    assert training_curves({"base": base}) == {"miou": {"base": ([1.0, 2.0], [30.0, 35.0])}}
    both = training_curves({"base": base, "fsae": fsae})
    assert both["ratio"] == {"fsae": ([2.0, 3.0], [40.0, 50.0])} and set(both["accuracy"]) == {"fsae"}
    assert set(both["miou"]) == {"base", "fsae"}
    assert training_curves({"one": one}) == {}  # one epoch, one logged step: dots only
    assert plot_training_curves(tmp_path / "none.png", {"one": one}) is None and not (tmp_path / "none.png").exists()
    assert plot_training_curves(tmp_path / "fig.png", {"base": base}).is_file()


def test_report_of_a_single_step_base_run_has_no_plots_and_numbers_epochs_from_one(tmp_path):
    run = fake_run(tmp_path / "run", seed=(0.5, 0.2, 0.3, 0.25))
    _logs(run, [(1, 0, None)], [(1, 0.3)])
    page = parse(write_report(run, compute=False))
    assert page.images == []  # no loss plot, no Fig. 6 (and the hand-written IoU list is too short for bars)
    epochs_table = next(t for t in page.tables if t[0][0] == "epoch")
    assert epochs_table[1][0] == "1"
    cfg = Config(name="run")
    cfg.fsae.enabled, cfg.fsae.start_epoch = True, 1  # FSAE in 0-based epoch 1 = the bar's epoch 2
    save_config(cfg, run / "config.yaml")
    assert "FSAE FAE+SAE from epoch 2," in \
        write_report(run, compute=False).read_text()


def test_legend_entries_name_the_labels_present():
    from fsae.labels import voc_palette
    from fsae.report import legend_entries

    masks = [np.array([[0, 2], [2, 255]]), np.array([[7, 0]])]
    entries = legend_entries(masks, ["background", "cat", "dog"])
    assert [name for name, _ in entries] == ["background", "dog", "class7", "ignore"]
    for (_, colour), label in zip(entries, [0, 2, 7, 255]):
        assert np.array_equal(colour, voc_palette()[label])
    assert legend_entries([], ["background"]) == []


def test_example_grid_carries_the_class_key(finished_run, tmp_path):
    from PIL import Image

    from fsae.report import legend_entries, save_overlay_grid

    image = np.zeros((32, 32, 3), np.uint8)
    key = legend_entries([np.array([[0, 1, 2]])], ["background", "a", "b"])
    plain = Image.open(save_overlay_grid(tmp_path / "plain.png", [[image, image]], ["x", "y"]))
    keyed = Image.open(save_overlay_grid(tmp_path / "keyed.png", [[image, image]], ["x", "y"], key))
    assert keyed.size[1] > plain.size[1] + 10  # the key is drawn under the grid
    # the report's grid: classes named from the run's data set
    run, _ = finished_run
    html_text = write_report(run, out=tmp_path / "r.html", compute=False).read_text()
    assert "report_files/examples.png" in html_text
