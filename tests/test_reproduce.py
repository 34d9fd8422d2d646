"""``fsae reproduce ROW``: a paper row's chain, planned from configs/paper/rows.yaml and run end to end on the
VOC- and COCO-shaped trees of tests/trees.py with the real recipes and the tiny sizes (configs/paper/tiny.yaml).

The fast suite runs one VOC row (with the stamps between stages) and one COCO row; every other row's chain
runs under the ``slow`` marker.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from fsae.cli import build_parser, main
from fsae.errors import ConfigError, FsaeError
from fsae.paper import load_rows
from fsae.reproduce import ALL, Options, default_out, load_row, plan_row, row_table, run_row, split_overrides
from tests.trees import make_coco_tree, make_voc_tree

ROWS = load_rows()
FAST_ROWS = ("voc_ppc", "coco_ppc")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("voc_tree")
    make_voc_tree(tree, prepare=True)
    return tree / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    return make_coco_tree(tmp_path_factory.mktemp("coco_tree"), prepare=True)


def scored_ids(voc_root: Path, coco_tree, dataset: str) -> int:
    """How many ids the protocol scores: VOC train (not train_aug), COCO train2014."""
    if dataset == "coco":
        return len(coco_tree.train)
    return len((voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())


def tree_options(root: Path, out: Path, *extra: str, **kw) -> Options:
    sets = (f"data.root={root}", f"data.saliency_dir={root / 'SALImages'}", *extra)
    return Options(out=out, device="cpu", overrides=sets, tiny=True, **kw)


def step_args(steps, stage_id):
    return next(s.argv for s in steps if s.id == stage_id)


# ---------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_rows_commands_parse_as_the_cli_takes_them(name):
    steps = plan_row(ROWS[name], Options(out=default_out(ROWS[name])))
    assert [s.id for s in steps] == [s.id for s in ROWS[name].stages]
    for step in steps:
        args = build_parser().parse_args(list(step.argv))  # a flag the command does not have exits here
        assert args.func is not None


def test_a_voc_deeplab_row_infers_the_split_deeplab_trains_on_and_scores_the_protocols():
    steps = plan_row(load_row("voc_ppc_fsae"), Options(out=Path("runs/paper/voc_ppc_fsae")))
    cam = step_args(steps, "cam")
    assert cam[cam.index("--split") + 1] == "train_aug"  # DeepLab trains on train_aug (10,582 ids)
    seeds = step_args(steps, "eval_seeds")
    assert seeds[seeds.index("--split") + 1] == "train"  # Table 1: VOC train, 1,464 ids
    seg = step_args(steps, "deeplabv2")
    assert seg[2] == "configs/voc/deeplabv2_r101_ppc.yaml"  # the PPC authors' DeepLab
    assert seg[seg.index("--masks") + 1] == "runs/paper/voc_ppc_fsae/run/crf"


def test_a_coco_row_scores_the_masks_in_their_split_folder():
    steps = plan_row(load_row("coco_ppc_fsae"), Options(out=Path("o")))
    masks = step_args(steps, "eval_masks")
    assert masks[masks.index("--masks") + 1] == "o/run/crf/train2014"
    assert masks[masks.index("--gt") + 1].endswith("SegmentationClass/train2014")


def test_overrides_go_to_the_stages_that_have_the_field():
    row = load_row("voc_sipe")
    split = split_overrides(row, ["data.root=/x", "infer.scales=[1.0]", "irn:train.epochs=1"])
    steps = plan_row(row, Options(out=Path("o"), overrides=("data.root=/x", "infer.scales=[1.0]", "irn:train.epochs=1")))
    sets = {s.id: [a for a in s.argv if "=" in a] for s in steps}
    assert split.by_stage == {"irn": ["train.epochs=1"]}
    assert "data.root=/x" in sets["train"] and "data.root=/x" in sets["deeplabv2"]
    assert "data.root=/x" not in sets["cam"] and "data.root=/x" not in sets["irn"]
    assert "infer.scales=[1.0]" in sets["cam"] and "infer.scales=[1.0]" in sets["deeplabv2_infer"]
    assert sets["irn"] == ["train.epochs=1"]
    assert "--set" not in steps[2].argv  # eval takes no --set


@pytest.mark.parametrize("override, message", [
    ("nosuch.field=1", "no stage of voc_sipe has the field 'nosuch.field'"),
    ("crf:threshold=0.3", "'crf' is not a stage of voc_sipe that takes --set"),
    ("nonsense", "expected [STAGE:]KEY=VALUE"),
])
def test_a_wrong_override_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        plan_row(load_row("voc_sipe"), Options(out=Path("o"), overrides=(override,)))


def test_force_names_the_stages_it_redoes():
    row = load_row("voc_ppc")
    steps = plan_row(row, Options(out=Path("o"), force=frozenset({"crf"})))
    assert [s.id for s in steps if "--force" in s.argv] == ["crf"]
    every = plan_row(row, Options(out=Path("o"), force=ALL))
    assert [s.id for s in every if "--force" in s.argv] == ["cam", "crf", "deeplabv2_infer", "deeplabv1_infer"]
    with pytest.raises(FsaeError, match="--force deeplabv2: not a stage of voc_ppc that can be redone"):
        run_row(row, Options(out=Path("o"), force=frozenset({"deeplabv2"})), main)


def test_the_table_reads_each_number_from_its_evaluation_file(tmp_path):
    row = load_row("voc_ppc")
    steps = plan_row(row, Options(out=tmp_path))
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "seeds.json").write_text(json.dumps({"miou": [0.5], "best": {"miou": 0.7, "fpr": 0.1, "fnr": 0.2}}))
    (tmp_path / "run" / "eval" / "crf.json").write_text(json.dumps({"miou": 0.75, "fpr": 0.125, "fnr": 0.5}))
    table = {t["name"]: t for t in row_table(row, steps)}
    assert table["seeds_miou"]["fsae"] == pytest.approx(70.0)
    assert table["seeds_miou"]["difference"] == pytest.approx(70.0 - 70.5)
    assert table["masks_fpr"]["fsae"] == pytest.approx(12.5) and table["masks_fnr"]["fsae"] == pytest.approx(50.0)
    assert table["deeplabv2_val"]["fsae"] is None  # DeepLab not run yet
    assert table["deeplabv2_test"]["fsae"] is None and table["deeplabv2_test"]["split"] == "test"


# ---------------------------------------------------------------------------------------------- before any work


def test_missing_data_is_named_before_any_work(tmp_path):
    out = tmp_path / "out"
    options = Options(out=out, overrides=(f"data.root={tmp_path / 'nowhere'}",), tiny=True)
    with pytest.raises(FsaeError, match="nowhere: data set folder not found"):
        run_row(load_row("voc_sipe"), options, main)
    assert not out.exists()


def test_missing_imagenet_weights_are_named_before_any_work(voc_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("FSAE_OFFLINE", "1")
    out = tmp_path / "out"
    options = Options(out=out, overrides=(f"data.root={voc_root}",))
    with pytest.raises(FsaeError, match=r"configs/voc/sipe.yaml \(model.weights\): .*resnet50-19c8e357.pth not "
                                        rf"found in {tmp_path / 'weights'}"):
        run_row(load_row("voc_sipe"), options, main)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- whole chains


def check_row_ran(name: str, out: Path, result: dict, scored_ids: int) -> None:
    """Every number of the row's table is fsae's (VOC test: the server's), read from the stage's own file."""
    row = ROWS[name]
    assert [t["name"] for t in result["table"]] == list(row.paper)
    for entry in result["table"]:
        if entry["split"] == "test":
            assert entry["fsae"] is None
        else:
            assert entry["fsae"] is not None and 0.0 <= entry["fsae"] <= 100.0, entry
            assert entry["difference"] == pytest.approx(entry["fsae"] - entry["paper"])
    assert json.loads((out / "row.json").read_text())["numbers"] == json.loads(json.dumps(result["table"]))
    assert f"`fsae reproduce {name}`" in (out / "row.md").read_text()
    seeds = out / "run" / "eval" / "seeds.json"
    if seeds.is_file():  # the protocol's ids, not every seed file
        assert json.loads(seeds.read_text())["count"] == scored_ids


def test_a_voc_row_runs_end_to_end_and_its_stamps_hold(voc_root, tmp_path, capsys):
    out = tmp_path / "voc_ppc"
    result = run_row(load_row("voc_ppc"), tree_options(voc_root, out), main)
    train_ids = scored_ids(voc_root, None, "voc")
    aug_ids = len((voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split())
    assert aug_ids > train_ids
    assert len(list((out / "run" / "seeds").glob("*.npz"))) == aug_ids  # seeds for all DeepLab trains on
    assert len(list((out / "run" / "crf").glob("*.png"))) == aug_ids
    check_row_ran("voc_ppc", out, result, train_ids)
    masks_before = {p.name: p.read_bytes() for p in (out / "run" / "crf").glob("*.png")}
    deeplab = (out / "deeplabv2" / "checkpoints" / "last.pt").read_bytes()

    changed = tree_options(voc_root, out, "eval.threshold=0.3")
    with pytest.raises(FsaeError, match="step crf failed"):  # the masks were made at 0.22
        run_row(load_row("voc_ppc"), changed, main)
    assert "made with threshold 0.22, now 0.3" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "run" / "crf").glob("*.png")} == masks_before

    forced = tree_options(voc_root, out, "eval.threshold=0.3", force=frozenset({"crf"}))
    with pytest.raises(FsaeError, match="step deeplabv2 failed"):  # DeepLab was trained on the old masks
        run_row(load_row("voc_ppc"), forced, main)
    assert "trained on other pseudo-masks" in capsys.readouterr().err
    stamp = json.loads((out / "run" / "crf.stamp.json").read_text())
    assert stamp["settings"]["threshold"] == pytest.approx(0.3)
    assert (out / "deeplabv2" / "checkpoints" / "last.pt").read_bytes() == deeplab


def test_a_coco_row_runs_end_to_end(coco_tree, tmp_path):
    out = tmp_path / "coco_ppc"
    result = run_row(load_row("coco_ppc"), tree_options(coco_tree.root, out), main)
    check_row_ran("coco_ppc", out, result, len(coco_tree.train))
    assert list((out / "run" / "crf" / "train2014").glob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ROWS) - set(FAST_ROWS)))
def test_every_other_row_runs_end_to_end(name, voc_root, coco_tree, tmp_path):
    dataset = ROWS[name].dataset
    out = tmp_path / name
    result = run_row(ROWS[name], tree_options(voc_root if dataset == "voc" else coco_tree.root, out), main)
    check_row_ran(name, out, result, scored_ids(voc_root, coco_tree, dataset))


def test_the_printed_commands_are_the_ones_run(voc_root, tmp_path):
    """``--dry-run`` prints ``Step.command()``; what runs is the same argv."""
    ran: list[list[str]] = []
    row = load_row("voc_ppc_fae")
    options = tree_options(voc_root, tmp_path / "o")
    run_row(row, options, lambda argv: ran.append(argv) or main(argv), say=lambda _: None)
    assert [shlex.join(["fsae", *argv]) for argv in ran] == [s.command() for s in plan_row(row, options)]


@pytest.mark.parametrize("name", ["voc_ppc_fsae", "coco_sipe_fsae"])
def test_the_readmes_chains_are_the_dry_run(name):
    """The README's VOC / COCO commands are ``fsae reproduce ROW --dry-run``, not a second copy that drifts."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = f"<!-- fsae reproduce {name} --dry-run -->\n```bash\n"
    assert marker in text, f"README.md has no dry-run block of {name}"
    block = text.split(marker, 1)[1].split("```", 1)[0]
    row = load_row(name)
    assert block.splitlines() == [s.command() for s in plan_row(row, Options(out=default_out(row)))]


def test_the_cli_lists_rows_prints_the_dry_run_and_refuses_an_unknown_row(capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(ROWS)
    assert main(["reproduce", "voc_sipe", "--dry-run", "--out", "o", "--device", "cuda", "--force", "irn"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = plan_row(load_row("voc_sipe"), Options(out=Path("o"), device="cuda", force=frozenset({"irn"})))
    assert printed == [s.command() for s in expected]
    assert "--force" in printed[3] and "--device cuda" in printed[0]
    assert main(["reproduce", "no_such_row"]) == 2
    assert "no row 'no_such_row'" in capsys.readouterr().err
