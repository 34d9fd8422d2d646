"""configs/paper/rows.yaml (fsae.paper), configs/paper/tiny.yaml and the test trees (tests/trees.py).

Every number of the rows is checked against the paper's tables, parsed here from their text (PAPER_TABLES:
the table lines of /work/shared/paper/fsae-wacv.txt, Tables 1-6, as printed), and a sample is written by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.io import loadmat

from fsae.config import load_config
from fsae.settings import _flat
from fsae.data.check import check_dataset, label_disagreements
from fsae.errors import FsaeError
from fsae.io import read_image, read_mask
from fsae.paper import ROWS_FILE, load_rows, load_tiny, tiny_flags, tiny_overrides
from fsae.protocol import resolve_protocol
from fsae.refine.irn import load_irn_config
from fsae.refine.psa import load_psa_config
from fsae.segment.config import load_seg_config
from tests.trees import VOC_TREE_TRAIN_AUG, make_coco_tree, make_voc_tree

REPO = Path(__file__).resolve().parents[1]
PAPER = Path("/work/shared/paper/fsae-wacv.txt")
# pycocotools' decode under numpy 2 (a dependency's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The paper's Tables 1-6: each caption's first words, then its table lines, verbatim.
PAPER_TABLES = r"""
Table 1.
| Method | Net _{CAM} | Seed | Mask |
| IRN [1] CVPR'19 | R50 | 49.5 | 66.3 |
| S-BCE [38] ECCV'22 | R38 | 65.3 | 66.3 |
| AMN [23] CVPR'22 | R50 | 62.1 | 72.2 |
| LPCAM _{w/AMN} [8] CVPR'23 | R50 | 65.3 | 72.7 |
| CLIP-ES [29] CVPR'23 | ViT-B | 70.8 | 75.0 |
| ToCo [41] CVPR'23 | ViT-B | - | 72.2 |
| USAGE [31] ICCV'23 | DeiT-S | 67.7 | 72.8 |
| SFC [48] AAAI'24 | R38 | 64.7 | 73.7 |
| SIPE [4] CVPR'22 | R38 | 58.6 | 64.7 |
| + FSAE | | 61.1 +2.5 | 70.5 _{+5.8} |
| PPCw/EPS [10] CVPR'22 | R38 | 70.5 | 73.3 |
| + FSAE | | 74.5 _{+4.0} | 77.0 +3.7 |
| MCTformer * [40] CVPR'22 | DeiT-S | 61.5 | 67.9 |
| + FSAE | | 62.4 _{+0.9} | 68.8 +0.9 |
Table 2.
| Method | Sup. | \mathbf{Net}_{Seg} | Val | Test |
| IRN [1]CVPR'19 | Ι | R50 | 63.5 | 64.8 |
| S-BCE [38] ECCV'22 | Ι | R38 | 68.5 | 69.7 |
| AMN [23]CVPR'22 | Ι | R101 | 69.5 | 69.6 |
| LPCAM _{w/AMN} [8]CVPR'23 | Ι | R101 | 70.1 | 70.4 |
| ToCo [41] CVPR'23 | Ι | ViT-B | 69.8 | 70.5 |
| MCTformer * [40]CVPR'22 | Ι | R38 | 69.0 | 69.8 |
| + FSAE | Ι | | 69.8 +0.8 | 70.5 _{+0.7} |
| SIPE [4]CVPR'22 | Ι | R101 | 68.8 | 69.7 |
| + FSAE | Ι | | 69.9 +1.1 | 71.2+1.5 |
| CLIMS [39]CVPR'22 | I+L | R101 | 69.3 | 68.7 |
| CLIP-ES [29]CVPR'23 | I+L | R101 | 71.1 | 71.4 |
| EPS [24]CVPR'21 | I+S | R101 | 70.9 | 70.8 |
| L2G [16]cvpr'22 | I+S | R101 | 72.1 | 71.7 |
| RCA [49]CVPR'22 | I+S | R38 | 72.2 | 72.8 |
| PPCw/EPS [10] CVPR'22 | I+S | R101 | 72.6 | 73.6 |
| + FSAE | | | 74.4 _{+1.8} | 75.0+1.4 |
Table 3.
| Method | Sup. | Net_{Seg} | Val | Test |
| ICD [12]cvpr'20 | Ι | R101 | 67.8 | 68.0 |
| AEFT [44]ECCV'22 | Ι | R38 | 70.9 | 71.7 |
| SIPE † [4]CVPR'22 | Ι | R101 | 68.0 | 69.9 |
| + FSAE | Ι | R101 | 70.3 _{+2.3} | 72.6+2.7 |
| EPS [24]CVPR'21 | I+S | R101 | 71.0 | 71.8 |
| L2G [16]CVPR'22 | I+S | R101 | 72.0 | 73.0 |
| PPCw/EPS [10]CVPR'22 | I+S | R101 | 72.3 | 73.5 |
| + FSAE | I+S | R101 | 73.7+1.4 | 75 . 3 _{+1.8} |
Table 4.
| Method | Sup. | \mathbf{Net}_{Seg} | COCO Val |
| OC-CSE [20] CVPR'21 | Ι | R38 | 36.4 |
| AFA [33] CVPR'22 | Ι | MiT-B1 | 38.9 |
| SIPE * [4]CVPR'22 | Ι | R101 | 39.3 |
| + FSAE | | | 39.5 _{+0.2} |
| EPS [24] CVPR'21 | I+S | R101 | 35.7 |
| PPCw/EPS † [10] CVPR'22 | I+S | R101 | 33.7 |
| + FSAE | | | 35.4+1.7 |
Table 5.
| Method | FPR \downarrow | $\mathbf{FNR}\downarrow$ |
| SIPE CVPR'22 | 19.4 | 12.7 |
| + Ours | 17.9 -1.5 | 11.4 -1.3 |
| PPCw/EPS CVPR'22 | 14.4 | 17.7 |
| + Ours | 12.0 -2.4 | 15.1 -2.6 |
| MCTformer CVPR'22 | 16.0 | 16.7 |
| + Ours | 15.4 - <u>0.6</u> | 16.6 -0.1 |
Table 6.
| Method | PPC w/EPS | SIPE | MCTformer |
| Base | 70.5 | 58.6 | 61.5 |
| + FAE | 73.7 | 60.9 | 62.2 |
| + SAE | 74.5 | 61.1 | 62.4 |
"""


def paper_tables(text: str = PAPER_TABLES) -> dict[int, list[list[str]]]:
    """{table number: rows of stripped cells, the header first}."""
    tables: dict[int, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"Table (\d+)\.", line):
            current = tables.setdefault(int(m.group(1)), [])
        elif line.startswith("|") and current is not None and not line.startswith("|--"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return tables


def cell_number(cell: str) -> float:
    """The cell's value, its gain left out: '75 . 3 _{+1.8}' -> 75.3, '15.4 - <u>0.6</u>' -> 15.4."""
    return float(re.match(r"\d+\.\d", re.sub(r"(\d)\s*\.\s*(\d)", r"\1.\2", cell)).group())


def paper_value(tables, table: int, row: str, column: str, after: str | None = None) -> float:
    lines = tables[table]
    header, body = lines[0], lines[1:]
    names = [r[0] for r in body]
    index = names.index(row) if after is None else names.index(row, names.index(after) + 1)
    col = header.index(column) if column in header else [i for i, h in enumerate(header) if column in h]
    if isinstance(col, list):
        assert len(col) == 1, (table, column, header)
        col = col[0]
    return cell_number(body[index][col])


ROWS = load_rows()
ROW_NAMES = ["voc_ppc", "voc_ppc_fsae", "voc_ppc_fsae_authors", "voc_ppc_fae", "voc_sipe", "voc_sipe_fsae",
             "voc_sipe_fae", "voc_mctformer", "voc_mctformer_fsae", "voc_mctformer_fae", "coco_ppc",
             "coco_ppc_fsae", "coco_ppc_fsae_authors", "coco_sipe", "coco_sipe_fsae"]
LOADERS = {"train": load_config, "seg_train": load_seg_config, "irn": load_irn_config, "psa": load_psa_config}


def recipe_config(stage, extra=()):
    return LOADERS[stage.stage](REPO / stage.recipe, [*stage.set, *extra])


def method_of(row) -> str:
    return recipe_config(row.stage("train")).model.method


def test_the_excerpt_is_the_papers_text():
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} is not on this machine")
    paper_lines = set(PAPER.read_text().splitlines())
    for line in PAPER_TABLES.strip().splitlines():
        assert line in paper_lines or any(p.startswith(line) for p in paper_lines if p.startswith("Table")), line


def test_the_parser_reads_hand_picked_cells():
    tables = paper_tables()
    assert paper_value(tables, 3, "+ FSAE", "Test", after="PPCw/EPS [10]CVPR'22") == 75.3  # '75 . 3 _{+1.8}'
    assert paper_value(tables, 5, "+ Ours", "FNR", after="MCTformer CVPR'22") == 16.6
    assert paper_value(tables, 1, "SIPE [4] CVPR'22", "Mask") == 64.7


def test_every_row_loads():
    assert sorted(ROWS) == sorted(ROW_NAMES)
    for row in ROWS.values():
        assert row.stages[0].stage == "train" and row.paper


def test_every_number_is_the_papers():
    tables = paper_tables()
    for row in ROWS.values():
        for number in row.paper.values():
            c = number.cite
            assert number.value == paper_value(tables, c.table, c.row, c.column, c.after), (row.name, c.text())


@pytest.mark.parametrize("row, name, value", [  # read off the paper by hand
    ("voc_ppc_fsae", "seeds_miou", 74.5),  # Table 1
    ("voc_ppc_fsae", "masks_miou", 77.0),  # Table 1
    ("voc_ppc", "deeplabv1_test", 73.5),  # Table 3
    ("voc_sipe_fsae", "deeplabv1_test", 72.6),  # Table 3
    ("voc_sipe", "masks_fpr", 19.4),  # Table 5
    ("voc_mctformer_fsae", "masks_fpr", 15.4),  # Table 5
    ("voc_mctformer", "deeplab_r38_val", 69.0),  # Table 2
    ("coco_sipe", "deeplabv2_val", 39.3),  # Table 4
    ("coco_ppc_fsae", "deeplabv2_val", 35.4),  # Table 4
    ("voc_sipe_fae", "seeds_miou", 60.9),  # Table 6
])
def test_hand_checked_numbers(row, name, value):
    assert ROWS[row].paper[name].value == value


def test_every_recipe_loads_with_its_loader():
    for row in ROWS.values():
        for stage in row.stages:
            if stage.recipe:
                cfg = recipe_config(stage)
                if stage.stage in ("train", "seg_train"):
                    assert cfg.data.kind == row.dataset, (row.name, stage.recipe)


def test_deeplab_trains_on_the_split_the_cam_stage_inferred():
    """The join of issue 28: masks for DeepLab's data.train_split (VOC train_aug), not the seeds' 1,464."""
    for row in ROWS.values():
        for seg in (s for s in row.stages if s.stage == "seg_train"):
            masks = row.stage(seg.input)
            cam = row.stage(masks.input)
            assert cam.stage == "cam" and cam.split == recipe_config(seg).data.train_split, (row.name, seg.id)
        for refine in (s for s in row.stages if s.stage in ("irn", "psa")):  # IRN / PSA train on train_aug seeds
            assert row.stage(refine.input).split == "train_aug", row.name


def test_eval_stages_score_the_protocol_split():
    for row in ROWS.values():
        protocol = resolve_protocol(recipe_config(row.stage("train")))
        for stage in row.stages:
            if stage.stage in ("eval_seeds", "eval_masks"):
                assert stage.split == protocol.eval_split, (row.name, stage.id)
        cam = row.stage("cam")
        assert cam.split == protocol.eval_split or (row.dataset == "voc" and cam.split == "train_aug"), row.name


def test_each_method_has_its_own_mask_stage_and_deeplab():
    masks_of = {("voc", "ppc"): "crf", ("voc", "sipe"): "irn", ("voc", "mctformer"): "psa",
                ("coco", "ppc"): "crf", ("coco", "sipe"): "crf"}
    for row in ROWS.values():
        method = method_of(row)
        segs = [s for s in row.stages if s.stage == "seg_train"]
        if segs:
            assert [s.stage for s in row.stages if s.stage in ("crf", "irn", "psa")] == [masks_of[row.dataset, method]]
        for seg in segs:
            cfg = recipe_config(seg)
            if row.dataset == "voc" and method == "ppc":  # the PPC authors' DeepLab, not deeplab-pytorch's
                assert seg.recipe.endswith("_ppc.yaml") and cfg.model.head == "ppc", row.name
            elif method == "mctformer":
                assert cfg.model.head == "mctformer" and cfg.model.backbone == "resnet38"
            else:
                assert cfg.model.head == "deeplab" and cfg.model.backbone == "resnet101_deeplab", row.name
        arches = sorted(recipe_config(s).model.arch for s in segs)
        assert arches == sorted({"deeplabv1" if "Table 3" in n.cite.text() else "deeplabv2"
                                 for n in row.paper.values() if n.split}) or method == "mctformer", row.name


def test_fsae_rows_differ_from_their_base_in_fsae_only():
    for name in ("voc_ppc_fsae", "voc_sipe_fsae", "voc_mctformer_fsae", "coco_ppc_fsae", "coco_sipe_fsae"):
        base, plus = ROWS[name.replace("_fsae", "")], ROWS[name]
        assert [(s.stage, s.id, s.recipe if s.stage != "train" else None, s.split) for s in base.stages] == \
               [(s.stage, s.id, s.recipe if s.stage != "train" else None, s.split) for s in plus.stages]
        assert recipe_config(plus.stage("train")).fsae.enabled and not recipe_config(base.stage("train")).fsae.enabled


BROKEN = [  # (change to voc_ppc, the field the error names)
    (lambda r: r["stages"][3].update(stage="crff"), "rows.voc_ppc.stages[3].stage"),
    (lambda r: r["stages"][0].update(recipe="configs/voc/nope.yaml"), "rows.voc_ppc.stages[0].recipe"),
    (lambda r: r["paper"]["seeds_miou"].update(value=70), "rows.voc_ppc.paper.seeds_miou.value"),
    (lambda r: r["paper"]["seeds_miou"].update(value=170.5), "rows.voc_ppc.paper.seeds_miou.value"),
    (lambda r: r["paper"]["seeds_miou"].pop("cite"), "rows.voc_ppc.paper.seeds_miou"),
    (lambda r: r["paper"]["seeds_miou"]["cite"].pop("column"), "rows.voc_ppc.paper.seeds_miou.cite"),
    (lambda r: r["stages"][6].update(input="deeplabv3"), "rows.voc_ppc.stages[6].input"),
    (lambda r: r["stages"][5].update(input="eval_seeds"), "rows.voc_ppc.stages[5].input"),
    (lambda r: r["stages"][6].update(id="deeplabv2"), "rows.voc_ppc.stages[6].id"),
    (lambda r: r["stages"][1].update(recipe="configs/voc/cam.yaml"), "rows.voc_ppc.stages[1].recipe"),
    (lambda r: r.update(dataset="pascal"), "rows.voc_ppc.dataset"),
    (lambda r: r["paper"]["deeplabv2_val"].pop("split"), "rows.voc_ppc.paper.deeplabv2_val.split"),
    (lambda r: r["paper"]["masks_fpr"].update(stage="crf"), "rows.voc_ppc.paper.masks_fpr.stage"),
]


@pytest.mark.parametrize("change, field", BROKEN)
def test_a_broken_row_is_one_line_naming_file_and_field(tmp_path, change, field):
    data = yaml.safe_load(ROWS_FILE.read_text())
    change(data["rows"]["voc_ppc"])
    path = tmp_path / "configs" / "paper" / "rows.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FsaeError) as info:
        load_rows(path, root=REPO)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ") and "\n" not in message


def test_a_stage_reads_the_nearest_earlier_maker_unless_told(tmp_path):
    path = tmp_path / "rows.yaml"
    path.write_text("""rows:
  r:
    title: two mask stages
    dataset: voc
    stages:
      - {stage: train, recipe: configs/voc/sipe.yaml}
      - {stage: cam, split: train_aug}
      - {stage: crf}
      - {stage: irn, recipe: configs/voc/irn.yaml}
      - {stage: eval_masks, split: train}
      - {stage: seg_train, recipe: configs/voc/deeplabv2_r101.yaml, input: crf}
      - {stage: seg_infer}
    paper:
      v: {stage: seg_infer, metric: miou, split: val, value: 1.0, cite: {table: 2, row: x, column: Val}}
""")
    (row,) = load_rows(path, root=REPO).values()
    assert [(s.id, s.input) for s in row.stages] == [("train", None), ("cam", "train"), ("crf", "cam"),
                                                     ("irn", "cam"), ("eval_masks", "irn"),
                                                     ("seg_train", "crf"), ("seg_infer", "seg_train")]
    assert row.paper["v"].cite.text() == "Table 2, row 'x', column 'Val'"


def test_a_file_that_is_not_a_rows_table(tmp_path):
    for text, words in (("rows: [1, 2]", "expected a mapping 'rows'"), ("rows: {a: [", "not valid YAML")):
        path = tmp_path / "rows.yaml"
        path.write_text(text)
        with pytest.raises(FsaeError, match=words):
            load_rows(path)
    with pytest.raises(FsaeError, match="rows file not found"):
        load_rows(tmp_path / "none.yaml")


# ------------------------------------------------------------------------------------------ tiny overrides

# The fields the tiny set may change: sizes, lengths, batch, scales, widths, weights, loader processes.
TINY_ALLOWED = {
    "data.crop_size", "data.long_side", "data.workers", "train.epochs", "train.iterations", "train.batch_size",
    "train.crop_size", "train.workers", "train.checkpoint_every", "train.log_every", "infer.scales",
    "model.weights", "net.weights", "model.resnet38.width", "model.resnet38_width", "net.width",
    "model.mct.img_size", "model.ppc.view_size", "fsae.start_epoch", "optim.warmup_epochs",
    "ir_label.workers", "aff_label.workers",
}
WEIGHT_FIELDS = ("model.weights", "net.weights")


def tiny_cases():
    for row in ROWS.values():
        for stage in row.stages:
            if stage.recipe or stage.stage in ("cam", "seg_infer"):
                yield pytest.param(row.name, stage.id, id=f"{row.name}-{stage.id}")


@pytest.mark.parametrize("row_name, stage_id", list(tiny_cases()))
def test_tiny_overrides_load_and_change_sizes_only(row_name, stage_id):
    row = ROWS[row_name]
    stage = row.stage(stage_id)
    overrides = tiny_overrides(row, stage_id)
    assert {o.split("=", 1)[0] for o in overrides} <= TINY_ALLOWED
    if stage.recipe:
        source, trained = stage, []
    else:  # cam / seg_infer read the run trained by their input stage, its tiny overrides in its config
        source = row.stage(stage.input)
        trained = tiny_overrides(row, source.id)
    before = _flat(recipe_config(source, trained).to_dict())
    after = _flat(recipe_config(source, trained + overrides).to_dict())
    changed = {k for k in before if before[k] != after[k]}
    assert changed <= TINY_ALLOWED, changed - TINY_ALLOWED
    for key in WEIGHT_FIELDS:
        assert after.get(key) is None  # random init: no weight file read, nothing downloaded
    sizes = [after.get(k) for k in ("data.crop_size", "train.crop_size") if after.get(k)]
    assert sizes and all(size <= 72 for size in sizes)
    if stage.stage in ("cam", "seg_infer"):
        assert after["infer.scales"] == [1.0]


def test_tiny_shrinks_lengths_and_keeps_fsae_on_in_mctformer():
    cfg = recipe_config(ROWS["voc_mctformer_fsae"].stage("train"), tiny_overrides(ROWS["voc_mctformer_fsae"], "train"))
    assert cfg.train.epochs == 2 and cfg.fsae.start_epoch == 1 < cfg.train.epochs  # FSAE trains in the tiny run
    seg = ROWS["voc_sipe"].stage("deeplabv1")
    assert recipe_config(seg, tiny_overrides(ROWS["voc_sipe"], "deeplabv1")).train.iterations == 2
    assert tiny_flags("crf") == ["--workers", "1"] and tiny_flags("eval_seeds") == []


def test_a_broken_tiny_file_names_the_field(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("stages: {train: {all: [train.epochs]}}\nflags: {}\n")
    with pytest.raises(FsaeError, match=r"tiny.yaml: stages.train.all: expected a list of KEY=VALUE"):
        load_tiny(path)


# ------------------------------------------------------------------------------------------------ trees


def test_voc_tree_prepares_and_checks(tmp_path):
    tree = make_voc_tree(tmp_path, prepare=True)
    lists = tree.root / "ImageSets" / "Segmentation"
    assert (lists / "train_aug.txt").read_text().split() == VOC_TREE_TRAIN_AUG
    assert len(tree.train_aug) == 9 and set(tree.train) < set(tree.train_aug)
    assert not set(tree.val) & set(tree.train_aug)
    assert check_dataset("voc", tree.root, saliency=tree.root / "SALImages") == []
    assert label_disagreements(tree.root) == []  # the XML names the mask's classes
    image = read_image(tree.root / "JPEGImages" / "2008_000300.jpg")
    assert image.shape == (96, 72, 3)
    aug = read_mask(tree.root / "SegmentationClassAug" / "2008_000300.png")  # SBD-only: from cls/<id>.mat
    assert aug[60, 10] == 11 and aug[20, 20] == 15 and aug[2, 2] == 0 and not (aug == 255).any()
    voc = read_mask(tree.root / "SegmentationClassAug" / "2007_000039.png")  # VOC's own, with the 255 outline
    assert voc[30, 30] == 20 and voc[15, 30] == 255 and voc[5, 5] == 0
    inst = loadmat(tree.sbd / "inst" / "2008_000300.mat", struct_as_record=False)["GTinst"][0, 0]
    assert inst.Categories.ravel().tolist() == [11, 15] and inst.Segmentation[20, 20] == 2
    assert sorted(p.stem for p in (tree.root / "SALImages").glob("*.png")) == sorted(tree.train_aug + tree.val)


def test_coco_tree_prepares_and_checks(tmp_path):
    tree = make_coco_tree(tmp_path, prepare=True)
    assert check_dataset("coco", tree.root) == []
    assert (tree.root / "ImageSets" / "train.txt").read_text().split() == tree.train
    assert "COCO_train2014_000000000077" not in tree.train  # no annotation: not listed
    mask = read_mask(tree.root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000025.png")
    car = np.zeros((64, 64), bool)
    car[9:40, 5:60] = True  # the polygon (4, 8)-(60, 40), inside its edges
    assert (mask[car] == 3).all() and (mask[:7] == 0).all() and (mask[42:] == 0).all()
    assert tree.labels["COCO_train2014_000000000061"] == [3, 17]  # car 3, dog: category 18 -> 17
