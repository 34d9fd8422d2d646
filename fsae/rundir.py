"""A run directory's evaluations (``RUN_DIR/eval/*.json``): read them, and bring them up to date.

Read by ``fsae report`` (``fsae.report``) and ``fsae compare`` (``fsae.compare``); no plotting here.

An evaluation saved with ``fsae.evaluate.save_eval(..., scored=folder)`` records what it scored (the
folder, its stamp, the GT folder, the ids). It is *stale* when that folder's stamp changed since (a rerun
with ``--force``, other settings) or, when it scored every file of the folder, when the folder holds
another number of files now. ``update_evals`` recomputes stale evaluations the same way (same GT, ids,
thresholds, mode) and computes the run's own ones when missing: ``eval/seeds.json`` (the run's protocol,
``fsae.protocol``, on its scored split) and ``eval/crf.json`` (``crf/``, the same ids). ``eval/seeds.json`` / ``eval/crf.json``
written without that record (an older fsae) while ``seeds/`` / ``crf/`` exist are stale too.
"""

from __future__ import annotations

import os
from pathlib import Path

from fsae.config import load_config
from fsae.data import build_dataset
from fsae.errors import ConfigError, DataError
from fsae.evaluate import evaluate_masks, evaluate_seeds, output_ids, save_eval
from fsae.io import read_json
from fsae.protocol import protocol_ids, resolve_protocol
from fsae.stamps import folder_digest

EVAL_DIR = "eval"
# The run's own evaluations: name -> (kind, scored folder). Computed when absent.
RUN_EVALS = {"seeds": ("seeds", "seeds"), "crf": ("masks", "crf")}
SEED_EVAL, MASK_EVAL = "seeds", "crf"


def mask_split(cfg) -> str:
    """The subfolder of a run's pseudo-mask folders (crf/, irn_masks/) holding its inferred split: COCO's
    ``<split>`` (the layout COCO segmentation training reads), else none."""
    return cfg.infer.split if cfg.data.kind == "coco" else ""


def crf_folder(cfg) -> str:
    """Where `fsae crf` writes a run's pseudo-masks, relative to the run: ``crf`` (COCO: ``crf/<split>``)."""
    return str(Path("crf") / mask_split(cfg))


def run_evals(cfg) -> dict[str, tuple[str, str]]:
    """``RUN_EVALS`` with the run's own CRF folder (``crf_folder``)."""
    return {**RUN_EVALS, "crf": ("masks", crf_folder(cfg))}


def is_seed_eval(result: dict) -> bool:
    """An ``evaluate_seeds`` result (threshold sweep, ``best``) rather than an ``evaluate_masks`` one."""
    return "best" in result


def load_evals(run_dir: str | os.PathLike) -> dict[str, dict]:
    """``RUN_DIR/eval/*.json`` (``fsae eval --out`` results) by file stem, sorted; DataError names a bad file."""
    evals = {}
    for path in sorted(p for p in (Path(run_dir) / EVAL_DIR).glob("*.json") if not p.name.startswith(".")):
        result = read_json(path)
        scores = result.get("best", result) if isinstance(result, dict) else None
        if not isinstance(scores, dict) or "miou" not in scores or "iou" not in scores:
            raise DataError(f"{path}: not an `fsae eval --out` result (no 'miou' / 'iou' entries)")
        evals[path.stem] = result
    return evals


def eval_scores(result: dict) -> dict:
    """The headline numbers of an eval result (fractions; None for a NaN saved as null):
    ``miou, fpr, fnr, threshold (seeds only, else None), iou (per class), count, kind``."""
    scores = result["best"] if is_seed_eval(result) else result
    return {"kind": "seeds" if is_seed_eval(result) else "masks", "miou": scores.get("miou"),
            "fpr": scores.get("fpr"), "fnr": scores.get("fnr"), "threshold": scores.get("threshold"),
            "iou": scores.get("iou", []), "count": result.get("count")}


def pick_eval(evals: dict[str, dict], kind: str) -> tuple[str, dict] | None:
    """The run's seed (``kind="seeds"``) or pseudo-mask (``"masks"``) evaluation: ``eval/seeds.json`` /
    ``eval/crf.json`` when present, else the first of that kind by name; None when there is none."""
    preferred = SEED_EVAL if kind == "seeds" else MASK_EVAL
    names = [n for n, r in evals.items() if is_seed_eval(r) == (kind == "seeds")]
    if not names:
        return None
    name = preferred if preferred in names else names[0]
    return name, evals[name]


def load_run_config(run_dir: str | os.PathLike):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); pass the folder `fsae train` wrote")
    return load_config(path)


def run_dataset(cfg):
    """The run's inference split (images, GT masks), or None when the data set is not on this machine."""
    try:
        return build_dataset(cfg.data, cfg.infer.split)
    except DataError:
        return None


def _suffix(result: dict) -> str:
    return ".npz" if is_seed_eval(result) else ".png"


def stale_reason(run_dir: str | os.PathLike, name: str, result: dict) -> str | None:
    """Why ``eval/<name>.json`` no longer describes the folder it scored, or None when it does (or when it
    records nothing and is not one of the run's own evaluations: a hand-written result is taken as it is)."""
    run_dir = Path(run_dir)
    scored = result.get("scored")
    if scored is None:
        own = RUN_EVALS.get(name)
        if own is not None and output_ids(run_dir / own[1], _suffix(result)):
            return f"{EVAL_DIR}/{name}.json does not record which {own[1]}/ it scored"
        return None
    folder = run_dir / EVAL_DIR / scored["dir"]
    if not folder.is_dir():
        return f"{EVAL_DIR}/{name}.json scored {scored['dir']}, which no longer exists"
    if folder_digest(folder) != scored["stamp"]:
        return f"{EVAL_DIR}/{name}.json scored {scored['dir']} before it was made again"
    if scored.get("ids") is None and len(output_ids(folder, _suffix(result))) != result.get("count"):
        return f"{EVAL_DIR}/{name}.json scored {result.get('count')} files of {scored['dir']}, which holds " \
               f"{len(output_ids(folder, _suffix(result)))} now"
    return None


def _evaluate(folder: Path, kind: str, gt_dir: Path, ids: list[str] | None, num_classes: int, thresholds,
              mode: str, ignore_as: int | None, progress: bool) -> tuple[dict, list[str]]:
    ids = output_ids(folder, ".npz" if kind == "seeds" else ".png") if ids is None else ids
    if kind == "seeds":
        return evaluate_seeds(folder, gt_dir, ids, num_classes, thresholds, progress=progress, mode=mode), ids
    return evaluate_masks(folder, gt_dir, ids, num_classes, progress=progress, ignore_as=ignore_as), ids


def _has_gt(gt_dir: Path | None, ids: list[str]) -> bool:
    return gt_dir is not None and all((gt_dir / f"{i}.png").is_file() for i in ids)


def update_evals(run_dir: str | os.PathLike, cfg, dataset, progress: bool = False) -> list[str]:
    """Recompute the stale evaluations of ``RUN_DIR/eval/`` and compute the run's own missing ones
    (module docstring), saving each with what it scored.

    Returns one line per evaluation that could not be brought up to date (no GT on this machine, the scored
    folder gone): ``fsae report`` shows them, and neither it nor ``fsae compare`` shows those numbers.
    """
    run_dir = Path(run_dir)
    evals = load_evals(run_dir)
    gt_default = Path(dataset.mask_dir) if dataset is not None else None
    protocol = resolve_protocol(cfg)
    scored_ids = protocol_ids(cfg, protocol)  # the protocol's split (VOC train), not every file in the folder

    def own_ids(folder: Path, kind: str) -> list[str]:
        ids = output_ids(folder, ".npz" if kind == "seeds" else ".png")
        return ids if scored_ids is None else [i for i in ids if i in set(scored_ids)]

    own_evals = run_evals(cfg)
    notes = []
    jobs = []  # (name, kind, folder, gt, ids, num_classes, thresholds, mode, ignore_as, old result, reason)
    for name, result in evals.items():
        reason = stale_reason(run_dir, name, result)
        if reason is None:
            continue
        kind = "seeds" if is_seed_eval(result) else "masks"
        scored = result.get("scored")
        if scored is None:  # one of the run's own, saved without a record: redo it the run's way
            folder = run_dir / own_evals[name][1]
            jobs.append((name, kind, folder, gt_default, own_ids(folder, kind), cfg.data.num_classes,
                         protocol.thresholds(), protocol.eval_mode, None, result, reason))
            continue
        folder = run_dir / EVAL_DIR / scored["dir"]
        if not folder.is_dir():
            notes.append(f"{reason}: not shown")
            continue
        jobs.append((name, kind, folder, Path(scored["gt"]), scored.get("ids"), len(eval_scores(result)["iou"]) - 1,
                     result.get("thresholds"), result.get("mode", "sweep"), scored.get("ignore_as"), result, reason))
    for name, (kind, folder) in own_evals.items():
        ids = own_ids(run_dir / folder, kind)
        if ids and pick_eval(evals, kind) is None:
            jobs.append((name, kind, run_dir / folder, gt_default, ids, cfg.data.num_classes,
                         protocol.thresholds(), protocol.eval_mode, None, {}, None))
    for name, kind, folder, gt_dir, ids, num_classes, thresholds, mode, ignore_as, old, reason in jobs:
        listed = output_ids(folder, ".npz" if kind == "seeds" else ".png") if ids is None else ids
        if not _has_gt(gt_dir, listed):
            notes.append(f"{reason}; the ground truth to recompute it is not on this machine: not shown" if reason
                         else f"{folder.name}/ is not evaluated: the ground truth of {cfg.data.root} is not on "
                              f"this machine")
            continue
        result, used = _evaluate(folder, kind, gt_dir, ids, num_classes, thresholds, mode, ignore_as, progress)
        kept = {k: v for k, v in old.items() if k not in result and k != "scored"}  # e.g. seg's split, crf
        save_eval(run_dir / EVAL_DIR / f"{name}.json", {**result, **kept}, scored=folder, gt_dir=gt_dir,
                  ids=used, ignore_as=ignore_as)
    return notes


def current_evals(run_dir: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """``load_evals`` without the stale ones, and one line per evaluation left out (for ``--no-compute``)."""
    evals, notes = {}, []
    for name, result in load_evals(run_dir).items():
        reason = stale_reason(run_dir, name, result)
        if reason is None:
            evals[name] = result
        else:
            notes.append(f"{reason}: not shown (recompute it: rerun without --no-compute)")
    return evals, notes
