"""``fsae compare RUN_A RUN_B ...``: runs side by side with deltas against the first (paper Tables 1, 5, 6).

Per run: seed mIoU / FPR / FNR at the best background threshold, the threshold, and the pseudo-mask
mIoU, from the run's ``eval/*.json`` (``eval/seeds.json`` / ``eval/crf.json`` preferred, see
``fsae.rundir.pick_eval``). Stale evaluations (their folder was made again since) are recomputed, and a
run whose ``seeds/`` (``crf/``) has no evaluation yet is evaluated first against its data set's GT and
saved there (``fsae.rundir.update_evals``), unless ``compute=False``; a stale evaluation that was not
recomputed is not shown (``notes``). Numbers are percent with one decimal; a run after the first shows
``value (+delta)``, the delta taken from the unrounded values (``+`` = higher than the first run).
Runs whose configs differ only in ``train.seed`` (several seeds of one setting) also get a row of
median (mean ± std) over those seeds (``seed_group_table``; ``fsae grid`` uses the same cells).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from fsae.errors import ConfigError
from fsae.io import check_replaceable, json_object_with, write_json, write_text
from fsae.rundir import current_evals, eval_scores, load_run_config, pick_eval, run_dataset, update_evals

# (key, column title); values are fractions in 0..1 except the threshold.
COLUMNS = [("seed_miou", "Seed mIoU"), ("seed_fpr", "FPR"), ("seed_fnr", "FNR"),
           ("threshold", "best threshold"), ("mask_miou", "Pseudo-mask mIoU")]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_summary(run_dir: str | os.PathLike, compute: bool = True, progress: bool = False) -> dict:
    """``{"name", "run_dir", "seed_eval", "mask_eval", "seed_miou", "seed_fpr", "seed_fnr", "threshold",
    "mask_miou", "mask_fpr", "mask_fnr", "notes"}`` of one run; numbers are fractions or None when absent;
    ``notes``: evaluations left out (stale and not recomputed)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    notes = update_evals(run_dir, cfg, run_dataset(cfg), progress) if compute else []
    evals, hidden = current_evals(run_dir)
    out = {"name": run_dir.name, "run_dir": str(run_dir), "seed_eval": None, "mask_eval": None,
           "notes": notes if compute else hidden}
    out.update({k: None for k in ("seed_miou", "seed_fpr", "seed_fnr", "threshold", "mask_miou", "mask_fpr",
                                  "mask_fnr")})
    seeds = pick_eval(evals, "seeds")
    if seeds is not None:
        s = eval_scores(seeds[1])
        out.update(seed_eval=f"eval/{seeds[0]}.json", seed_miou=s["miou"], seed_fpr=s["fpr"], seed_fnr=s["fnr"],
                   threshold=s["threshold"])
    masks = pick_eval(evals, "masks")
    if masks is not None:
        s = eval_scores(masks[1])
        out.update(mask_eval=f"eval/{masks[0]}.json", mask_miou=s["miou"], mask_fpr=s["fpr"], mask_fnr=s["fnr"])
    return out


def compare_runs(run_dirs, compute: bool = True, progress: bool = False) -> list[dict]:
    """``run_summary`` of each run, in the given order (the first is the base of the deltas)."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ConfigError("fsae compare: give at least one run directory")
    summaries = [run_summary(r, compute, progress) for r in run_dirs]
    names = [s["name"] for s in summaries]
    if len(set(names)) < len(names):  # same folder name in different places: show the paths
        for s in summaries:
            s["name"] = s["run_dir"]
    return summaries


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(key: str, value, base) -> str:
    if _missing(value):
        return "n/a"
    if key == "threshold":
        return f"{value:.2f}"
    text = f"{100 * value:.1f}"
    if base is not None and not _missing(base):
        text += f" ({100 * (value - base):+.1f})"
    return text


def compare_table(summaries: list[dict]) -> dict:
    """``{"header", "rows"}``: one row per run; a column is kept when some run has a value for it."""
    columns = [(k, title) for k, title in COLUMNS if any(not _missing(s[k]) for s in summaries)]
    base = summaries[0]
    rows = []
    for i, s in enumerate(summaries):
        rows.append([s["name"], *(_cell(k, s[k], base[k] if i else None) for k, _ in columns)])
    return {"header": ["Run", *(title for _, title in columns)], "rows": rows}


def compare_markdown(summaries: list[dict]) -> str:
    """The table as markdown, with a line saying what the deltas are against."""
    table = compare_table(summaries)
    note = (f"{COMPARE_NOTE}, {summaries[0]['name']}. Seeds at their best "
            f"background threshold.")
    left_out = [f"{s['name']}: {n}" for s in summaries for n in s.get("notes", [])]
    text = markdown_table(table["header"], table["rows"]) + "\n\n" + "\n".join([note, *left_out]) + "\n"
    seeds = seed_group_table(summaries)
    if seeds is not None:
        text += ("\n" + markdown_table(seeds["header"], seeds["rows"]) + "\n\nOver training seeds: median "
                 "(mean ± std, sample std), percent; threshold: the median of the runs' best thresholds.\n")
    return text


COMPARE_NOTE = "Percent; (+x) = difference from the first run"  # in every table compare_markdown writes


def is_comparison(text: str) -> bool:
    """Whether ``text`` is a file ``write_comparison`` wrote: the markdown table, or the JSON summaries."""
    return COMPARE_NOTE in text or json_object_with(("name",))(text) and text.lstrip().startswith("[")


def write_comparison(out: str | os.PathLike, summaries: list[dict], text: str) -> Path:
    """``fsae compare --out``: the summaries as JSON (``.json``) or the markdown ``text``, atomically. ``out``
    may be new or a comparison fsae wrote before (``is_comparison``); a folder or another file is refused
    (DataError), as the scores were already printed."""
    out = check_replaceable(out, is_comparison, "an fsae comparison (markdown or JSON)")
    return write_json(out, summaries) if out.suffix == ".json" else write_text(out, text)


# ------------------------------------------------------------------ several training seeds of one setting


def seed_spread(values) -> dict:
    """``{"n", "median", "mean", "std", "values"}`` of the values that are not missing (None / NaN);
    ``std`` is the sample standard deviation (n - 1), None for fewer than two values."""
    present = [float(v) for v in values if not _missing(v)]
    if not present:
        return {"n": 0, "median": None, "mean": None, "std": None, "values": []}
    return {"n": len(present), "median": statistics.median(present), "mean": statistics.fmean(present),
            "std": statistics.stdev(present) if len(present) > 1 else None, "values": present}


def spread_cell(key: str, spread: dict) -> str:
    """``"80.1 (79.9 ± 0.4)"``: median (mean ± std) in percent; one value alone; the threshold's median."""
    if not spread["n"]:
        return "n/a"
    if key == "threshold":
        return f"{spread['median']:.2f}"
    if spread["n"] == 1:
        return f"{100 * spread['median']:.1f}"
    return f"{100 * spread['median']:.1f} ({100 * spread['mean']:.1f} ± {100 * spread['std']:.1f})"


def _setting_key(run_dir: str) -> str:
    """A run's config without what differs between training seeds of one setting (name, seed, device)."""
    d = load_run_config(run_dir).to_dict()
    d.pop("name")
    d["train"].pop("seed")
    d["train"].pop("device")
    return json.dumps(d, sort_keys=True)


def seed_groups(summaries: list[dict]) -> list[list[dict]]:
    """Runs whose configs differ only in ``train.seed`` (and name / device), in first-seen order; only
    groups of two or more runs."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(_setting_key(s["run_dir"]), []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def _group_name(group: list[dict]) -> str:
    parents = {Path(s["run_dir"]).resolve().parent for s in group}
    return parents.pop().name if len(parents) == 1 else ", ".join(s["name"] for s in group)


def seed_group_table(summaries: list[dict]) -> dict | None:
    """``{"header", "rows"}``: one row per group of seeds of one setting, median (mean ± std) per column;
    None when no two runs share a setting."""
    groups = seed_groups(summaries)
    if not groups:
        return None
    columns = [(k, title) for k, title in COLUMNS if any(not _missing(s[k]) for s in summaries)]
    rows = [[_group_name(g), len(g), *(spread_cell(k, seed_spread([s[k] for s in g])) for k, _ in columns)]
            for g in groups]
    return {"header": ["Setting (runs differing only in train.seed)", "seeds", *(t for _, t in columns)], "rows": rows}
