"""``fsae reproduce ROW``: one row of the paper's tables, from images to DeepLab's number.

A row (``configs/paper/rows.yaml``, read by ``fsae.paper``) is a chain of stages with their recipes. This
module turns it into the ``fsae`` commands a researcher would type (``plan_row``), checks before any work
that the data and the ImageNet weights are there (``check_row_inputs``), runs the commands one after the
other through the CLI (``run_row``: each stage resumes and checks its own stamps, so a rerun continues and
a changed input is refused, or redone with ``force``), and writes the table of fsae's number next to the
paper's (``row_table``, ``write_row_outputs``: ``OUT/row.md``, ``OUT/row.json``).

Layout below ``out`` (default ``runs/paper/<row>``)::

    run/                 the classification run: checkpoints, seeds/, crf/ | irn_masks/ | psa_masks/, eval/
    <seg stage id>/      one DeepLab run per seg_train stage (eval/seg_val_crf.json after seg_infer)
    row.md, row.json     stage | measure | fsae | paper | difference, with each number's citation

``--set [STAGE:]KEY=VALUE`` overrides go to the stage named (a stage id of the row) or, without one, to
every recipe stage (train, irn, psa, seg_train) whose config has ``KEY``; ``infer.*`` keys also reach the
inference stages (cam, seg_infer). ``tiny`` adds ``configs/paper/tiny.yaml`` (sizes only) for smoke runs.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fsae.errors import ConfigError, FsaeError
from fsae.io import write_json, write_text
from fsae.paper import ROWS_FILE, Row, Stage, load_rows, tiny_flags, tiny_overrides

MASK_FOLDERS = {"crf": "crf", "irn": "irn_masks", "psa": "psa_masks"}  # stage -> folder in the run
RECIPE_STAGES = ("train", "irn", "psa", "seg_train")
CONFIG_KIND = {"train": "train", "cam": "train", "irn": "irn", "psa": "psa", "seg_train": "seg", "seg_infer": "seg"}
WITH_DEVICE = ("train", "cam", "irn", "psa", "seg_train", "seg_infer")
WITH_FORCE = ("cam", "crf", "irn", "psa", "seg_infer")
ALL = frozenset({"*"})  # Options.force: every stage that takes --force


@dataclass(frozen=True)
class Options:
    """How to run a row: where, on which device, with which overrides."""

    out: Path
    device: str | None = None
    nproc: int = 1
    overrides: tuple[str, ...] = ()
    tiny: bool = False
    force: frozenset[str] = frozenset()  # stage ids to redo (``--force`` on theirs); ALL: every stage


@dataclass(frozen=True)
class Step:
    """One command of a row's chain: its stage, the ``fsae`` argv, and the evaluation JSON it writes."""

    id: str
    stage: str
    argv: tuple[str, ...]
    scores: Path | None = None

    def command(self) -> str:
        return shlex.join(["fsae", *self.argv])


@dataclass
class _Overrides:
    """``--set`` values split by stage: {stage id: [KEY=VALUE]} plus the ones without a stage."""

    by_stage: dict[str, list[str]] = field(default_factory=dict)
    anywhere: list[str] = field(default_factory=list)


def check_force(row: Row, force: frozenset[str]) -> None:
    """``--force STAGE ...`` names stages of the row that take ``--force``."""
    if force == ALL:
        return
    takes = [s.id for s in row.stages if s.stage in WITH_FORCE]
    wrong = sorted(set(force) - set(takes))
    if wrong:
        raise ConfigError(f"--force {' '.join(wrong)}: not a stage of {row.name} that can be redone; "
                          f"those are: {', '.join(takes)} (train and seg_train resume or refuse by themselves)")


def load_row(name: str, path: str | Path = ROWS_FILE) -> Row:
    rows = load_rows(path)
    if name not in rows:
        raise FsaeError(f"fsae reproduce: no row {name!r} in {path}; `fsae reproduce --list` lists them")
    return rows[name]


def default_out(row: Row) -> Path:
    return Path("runs") / "paper" / row.name


# ------------------------------------------------------------------------------------------ overrides


def _loader(kind: str):
    if kind == "train":
        from fsae.config import load_config

        return load_config
    if kind == "seg":
        from fsae.segment.config import load_seg_config

        return load_seg_config
    if kind == "irn":
        from fsae.refine.irn import load_irn_config

        return load_irn_config
    from fsae.refine.psa import load_psa_config

    return load_psa_config


def _has_key(kind: str, key: str) -> bool:
    """Whether the ``kind`` config (train, seg, irn, psa) has the dotted field ``key``."""
    node = _loader(kind)(None, []).to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def split_overrides(row: Row, overrides: Sequence[str]) -> _Overrides:
    """``[STAGE:]KEY=VALUE`` -> per-stage lists; a STAGE that is not a stage id of the row, or a KEY no
    stage of the row has, is a ConfigError naming the override."""
    ids = {s.id for s in row.stages}
    split = _Overrides()
    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {text!r}: expected [STAGE:]KEY=VALUE, e.g. --set train.epochs=2")
        stage_id, colon, bare = key.rpartition(":")
        if colon:
            if stage_id not in ids or row.stage(stage_id).stage not in CONFIG_KIND:
                takes = sorted(s.id for s in row.stages if s.stage in CONFIG_KIND)
                raise ConfigError(f"--set {text!r}: {stage_id!r} is not a stage of {row.name} that takes --set "
                                  f"({', '.join(takes)})")
            split.by_stage.setdefault(stage_id, []).append(text.split(":", 1)[1])
            continue
        if not any(_reaches(s, bare) for s in row.stages):
            raise ConfigError(f"--set {text!r}: no stage of {row.name} has the field {bare!r}")
        split.anywhere.append(text)
    return split


def _reaches(stage: Stage, key: str) -> bool:
    """Whether an override without a stage goes to ``stage`` (module docstring)."""
    kind = CONFIG_KIND.get(stage.stage)
    if kind is None or not _has_key(kind, key):
        return False
    return stage.stage in RECIPE_STAGES or key.startswith("infer.")


def _stage_sets(row: Row, stage: Stage, options: Options, split: _Overrides) -> list[str]:
    """The ``--set`` list of one stage: the row's own, the tiny sizes, then the user's."""
    tiny = tiny_overrides(row, stage.id) if options.tiny else []
    mine = [o for o in split.anywhere if _reaches(stage, o.partition("=")[0])]
    return [*stage.set, *tiny, *mine, *split.by_stage.get(stage.id, [])]


def _sets(values: Sequence[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


# ------------------------------------------------------------------------------------------ the plan


def stage_config(row: Row, stage: Stage, options: Options, split: _Overrides | None = None):
    """The resolved config a recipe stage (train, irn, psa, seg_train) runs with."""
    split = split or split_overrides(row, options.overrides)
    return _loader(CONFIG_KIND[stage.stage])(stage.recipe, _stage_sets(row, stage, options, split))


def _gt_dir(train_cfg, split_name: str) -> Path:
    """The ground-truth masks an evaluation of ``split_name`` reads: VOC's official ``SegmentationClass``
    (train and val ids, with their 255 edges), COCO's ``<mask_dir>/<split>``."""
    root = Path(train_cfg.data.root)
    if train_cfg.data.kind == "coco":
        return root / (train_cfg.data.mask_dir or "SegmentationClass") / split_name
    return root / "SegmentationClass"


def _mask_folder(run: Path, row: Row, stage: Stage, train_cfg, cam_split: str | None) -> Path:
    """The pseudo-mask folder of the mask stage ``stage`` reads (COCO: its split subfolder)."""
    folder = run / MASK_FOLDERS[row.stage(stage.input).stage]
    return folder / cam_split if train_cfg.data.kind == "coco" and cam_split else folder


def _seg_eval_name(seg_cfg, split_name: str) -> str:
    """``seg_<split>_crf`` when ``fsae seg infer`` runs DeepLab's CRF (the paper's numbers), else ``seg_<split>``."""
    return f"seg_{split_name}_crf" if seg_cfg.infer.crf.enabled else f"seg_{split_name}"


def plan_row(row: Row, options: Options) -> list[Step]:
    """The row's commands, in order, with the evaluation file each scoring step writes."""
    check_force(row, options.force)
    split = split_overrides(row, options.overrides)
    out, run = Path(options.out), Path(options.out) / "run"
    train_stage = next(s for s in row.stages if s.stage == "train")
    train_cfg = stage_config(row, train_stage, options, split)
    classes = str(train_cfg.data.num_classes)
    cam_split = next((s.split for s in row.stages if s.stage == "cam"), None)
    seg_cfgs = {s.id: stage_config(row, s, options, split) for s in row.stages if s.stage == "seg_train"}
    steps = []
    for stage in row.stages:
        sets = _sets(_stage_sets(row, stage, options, split))
        argv: list[str]
        scores = None
        if stage.stage == "train":
            argv = ["train", stage.recipe, "--out", str(run)]
            argv += ["--nproc", str(options.nproc)] if options.nproc > 1 else []
        elif stage.stage == "cam":
            argv = ["cam", str(run), *(["--split", stage.split] if stage.split else [])]
        elif stage.stage == "eval_seeds":
            scores = run / "eval" / "seeds.json"
            argv = ["eval", "--seeds", str(run / "seeds"), "--gt", str(_gt_dir(train_cfg, stage.split)),
                    "--num-classes", classes, "--split", stage.split, "--out", str(scores)]
        elif stage.stage == "crf":
            argv = ["crf", str(run), *(tiny_flags("crf") if options.tiny else [])]
        elif stage.stage in ("irn", "psa"):
            argv = [stage.stage, str(run), "--config", stage.recipe]
        elif stage.stage == "eval_masks":
            kind = row.stage(stage.input).stage
            scores = run / "eval" / f"{kind}.json"
            argv = ["eval", "--masks", str(_mask_folder(run, row, stage, train_cfg, cam_split)),
                    "--gt", str(_gt_dir(train_cfg, stage.split)), "--num-classes", classes,
                    "--config", str(run), "--split", stage.split, "--out", str(scores)]
        elif stage.stage == "seg_train":
            argv = ["seg", "train", stage.recipe, "--masks", str(run / MASK_FOLDERS[row.stage(stage.input).stage]),
                    "--out", str(out / stage.id)]
        else:  # seg_infer
            seg_cfg = seg_cfgs[stage.input]
            scores = out / stage.input / "eval" / f"{_seg_eval_name(seg_cfg, seg_cfg.data.val_split)}.json"
            argv = ["seg", "infer", str(out / stage.input)]
        argv += ["--device", options.device] if options.device and stage.stage in WITH_DEVICE else []
        forced = options.force == ALL or stage.id in options.force
        argv += ["--force"] if forced and stage.stage in WITH_FORCE else []
        steps.append(Step(stage.id, stage.stage, tuple(argv + sets), scores))
    return steps


# ------------------------------------------------------------------------------------------ before any work


def _weights_of(stage: Stage, cfg) -> tuple[str | None, str]:
    """(weights entry, backbone) of a recipe stage's config."""
    section = cfg.net if stage.stage in ("irn", "psa") else cfg.model
    backbone = str(getattr(section, "backbone", "") or "")
    if stage.stage == "irn" and backbone and not backbone.endswith("_irn"):
        backbone += "_irn"  # fsae.refine.irn.network: a torchvision name means its IRN variant
    return getattr(section, "weights", None), backbone


def _check_weights(stage: Stage, cfg) -> None:
    from fsae.weights import IMAGENET, find_default

    weights, backbone = _weights_of(stage, cfg)
    field_name = "net.weights" if stage.stage in ("irn", "psa") else "model.weights"
    if weights == IMAGENET:
        try:
            find_default(backbone)
        except FsaeError as exc:
            raise FsaeError(f"{stage.recipe} ({field_name}): {exc}") from None
    elif weights not in (None, "", "timm", "torchvision", "efficientnet-lite0-package") and not Path(weights).is_file():
        raise FsaeError(f"{stage.recipe} ({field_name}): weight file {weights} not found (looked for it at "
                        f"{Path(weights).absolute()}); `fsae weights list` says where each file goes")


def _check_splits(train_cfg, splits: Sequence[str], with_saliency: bool) -> None:
    from fsae.data import build_dataset

    if not Path(train_cfg.data.root).is_dir():
        raise FsaeError(f"{train_cfg.data.root}: data set folder not found (data.root); `fsae data prepare "
                        f"{train_cfg.data.kind} --root DIR` makes it, or pass --set data.root=DIR")
    for name in dict.fromkeys(splits):
        build_dataset(train_cfg.data, name)
    if with_saliency:
        folder = Path(train_cfg.data.saliency_dir or "")
        if not folder.is_dir():
            raise FsaeError(f"{folder.absolute()}: saliency folder not found (data.saliency_dir)")


def check_row_inputs(row: Row, options: Options) -> None:
    """Every data list, image folder, saliency folder and weight file the row reads, before any work; one
    FsaeError naming the first one missing and where it was looked for."""
    from fsae.methods import METHODS

    split = split_overrides(row, options.overrides)
    configs = {s.id: stage_config(row, s, options, split) for s in row.stages if s.stage in RECIPE_STAGES}
    train_stage = next(s for s in row.stages if s.stage == "train")
    train_cfg = configs[train_stage.id]
    splits = [train_cfg.data.train_split, *(s.split for s in row.stages if s.split)]
    for stage in row.stages:
        if stage.stage == "seg_train":
            splits += [configs[stage.id].data.train_split, configs[stage.id].data.val_split]
    _check_splits(train_cfg, [s for s in splits if s], METHODS[train_cfg.model.method].needs_saliency)
    for stage in row.stages:
        if stage.id in configs:
            _check_weights(stage, configs[stage.id])


# ------------------------------------------------------------------------------------------ run and score


def run_row(row: Row, options: Options, run_argv: Callable[[list[str]], int],
            say: Callable[[str], None] = print) -> dict:
    """Check the inputs, run every step through ``run_argv`` (the CLI's ``main``), then write the table.
    A step that fails stops the row with an FsaeError naming it; finished steps stay (a rerun resumes)."""
    steps = plan_row(row, options)
    check_row_inputs(row, options)
    for i, step in enumerate(steps, 1):
        say(f"[{i}/{len(steps)}] {step.id}: {step.command()}")
        code = run_argv(list(step.argv))
        if code:
            redo = f"; `--force {step.id}` redoes this step" if step.stage in WITH_FORCE else ""
            raise FsaeError(f"fsae reproduce {row.name}: step {step.id} failed (exit code {code}, its error is "
                            f"above); the finished steps are kept and the same command resumes after the fix{redo}")
    return write_row_outputs(row, steps, Path(options.out))


def _value(step: Step, metric: str, split_name: str | None) -> float | None:
    """fsae's number (percent) for a paper number: from the step's evaluation JSON; None when it has none
    (VOC test: the evaluation server scores the files ``fsae seg infer`` writes)."""
    if step.scores is None or split_name == "test" or not step.scores.is_file():
        return None
    result = json.loads(step.scores.read_text())
    scores = result.get("best", result)
    value = scores.get(metric)
    return None if value is None else 100.0 * float(value)


def row_table(row: Row, steps: Sequence[Step]) -> list[dict]:
    """One entry per paper number: stage, metric, split, fsae, paper, difference (fsae - paper), citation."""
    by_id = {s.id: s for s in steps}
    table = []
    for number in row.paper.values():
        value = _value(by_id[number.stage], number.metric, number.split)
        table.append({"name": number.name, "stage": number.stage, "metric": number.metric, "split": number.split,
                      "fsae": value, "paper": number.value,
                      "difference": None if value is None else value - number.value, "cite": number.cite.text()})
    return table


def _cell(value: float | None, split_name: str | None, signed: bool = False) -> str:
    if value is None:
        return "test server" if split_name == "test" else "—"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def row_markdown(row: Row, table: Sequence[dict]) -> str:
    from fsae.compare import markdown_table

    header = ["stage", "measure", "fsae", "paper", "difference", "paper's source"]
    body = [[t["stage"], t["metric"] + (f" ({t['split']})" if t["split"] else ""), _cell(t["fsae"], t["split"]),
             f"{t['paper']:.1f}", _cell(t["difference"], t["split"], signed=True), t["cite"]] for t in table]
    return f"# {row.title}\n\n`fsae reproduce {row.name}`\n\n{markdown_table(header, body)}\n"


def write_row_outputs(row: Row, steps: Sequence[Step], out: Path) -> dict:
    """``out/row.md`` and ``out/row.json``; returns the table and the paths."""
    table = row_table(row, steps)
    text = row_markdown(row, table)
    record = {"row": row.name, "title": row.title, "numbers": table,
              "commands": [{"id": s.id, "command": s.command()} for s in steps]}
    return {"table": table, "markdown": text, "md": write_text(out / "row.md", text),
            "json": write_json(out / "row.json", record)}
