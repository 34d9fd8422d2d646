"""``make demo`` / ``fsae demo``: the paper's Table 6 (Base / +FAE / +FAE+SAE) on the generated data set.

Steps: generate the synthetic set; train the plain CAM three times, side by side (FSAE off, FAE only,
FAE+SAE), with a held-out seed mIoU after every epoch; infer seeds multi-scale + flip on the train split (the
paper's protocol), and for the base also from its best held-out epoch; sweep the background threshold;
check the demo's claims (``claims``: the base plateaued, FSAE ahead of its best epoch by expansion, Table 6's
order); write ``report.md``, ``results.json`` (with each run's held-out curve), CAM overlays and training
curves. ``FSAE_DEMO_SEED`` (or ``--seed``) changes the data and training seed; ``run_demo_seeds`` runs
several seeds and tabulates them (``seeds.md``).
"""

from __future__ import annotations

import contextlib
import html
import multiprocessing
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fsae.config import Config, load_config, save_config
from fsae.data.synthetic import SyntheticSpec, generate
from fsae.data.voc import VOCDataset
from fsae.errors import ConfigError
from fsae.evaluate import default_thresholds, evaluate_seeds, load_seed, save_eval
from fsae.infer import infer_seeds
from fsae.io import write_json, write_text
from fsae.parallel import exit_with_parent
from fsae.compare import markdown_table
from fsae.report import (cam_heatmap, colour_mask, html_table, overlay, plot_heldout_curves, plot_training_curves,
                         read_csv, save_overlay_grid, write_report)
from fsae.train import model_from_checkpoint, run_checkpoint, train

# Table 6's rows, each a recipe in configs/synthetic/ (they differ only in the fsae section).
VARIANTS = {"base": "cam.yaml", "fae": "cam_fae.yaml", "fsae": "cam_fsae.yaml"}
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
LABELS = {"base": "Base (plain CAM)", "fae": "+FAE", "fsae": "+FAE+SAE (FSAE)"}


# The demo's set: the generator's objects scaled to 96 px images (the part's fine grating kept, so the strong
# view's blur still removes it) with a part of radius 7-10, about a fifth of its object, which the plain CAM
# finds within a few epochs and then stops improving on; 300 train / 150 val images, so that 48 epochs of three
# runs fit the 10 minutes (docs/decisions.md, issue #30).
DEMO_SET = {"image_size": 96, "body_axes": (15.0, 24.0), "part_radius": (7.0, 10.0), "stripe_period": (8.25, 10.5)}


def demo_spec(seed: int, quick: bool = False) -> SyntheticSpec:
    if quick:
        return SyntheticSpec(num_train=48, num_val=16, seed=seed, **DEMO_SET)
    return SyntheticSpec(num_train=300, num_val=150, seed=seed, **DEMO_SET)


def demo_config(variant: str, data_root: str | Path, seed: int = 0, quick: bool = False) -> Config:
    """The recipe ``configs/synthetic/<VARIANTS[variant]>`` on ``data_root`` with training seed ``seed``;
    ``quick``: 2 epochs, batches of 16, FSAE from epoch 1, two inference scales (the fast test run)."""
    path = RECIPES / VARIANTS[variant]
    if not path.is_file():
        raise ConfigError(f"{path}: the demo's recipe is missing (the demo runs from a source checkout)")
    cfg = load_config(path)
    cfg.name = f"demo_{variant}"
    cfg.data.root = str(data_root)
    cfg.train.seed = seed
    if quick:
        cfg.train.epochs = 2
        cfg.train.batch_size = 16
        cfg.fsae.start_epoch = 1
        cfg.train.log_every = 1  # every step in metrics.csv: fsae_note sees whether FSAE acted
        cfg.infer.scales = [1.0, 1.5]
    return cfg


SMALL_MASK = 0.001  # a mean FSAE mask share below this (0.1 %) is named in the demo's rows


def fsae_note(run_dir: Path, cfg: Config) -> str:
    """Why a run with FSAE on shows little or no FSAE effect, from its ``metrics.csv`` (the steps at or after
    ``fsae.start_epoch``): ``"FSAE not started"`` (no such step logged), ``"FSAE selected no pixel"`` (its mask
    empty at every step: a network not yet confident), ``"FSAE masked 0.03 % of pixels"`` (a mean mask share
    under ``SMALL_MASK``, as in the 6 steps of ``--quick``), with ``"; SAE added none"`` when SAE is on and
    added no pixel. Empty when FSAE is off or acted on a fair share of the pixels."""
    if not cfg.fsae.enabled:
        return ""
    rows = [r for r in read_csv(run_dir / "metrics.csv") if int(r["epoch"]) >= cfg.fsae.start_epoch]
    if not rows:
        return "FSAE not started"
    shares = [r.get("mask_ratio", 0.0) for r in rows]
    shares = [v for v in shares if v == v]  # NaN: not logged
    if not any(v > 0 for v in shares):
        return "FSAE selected no pixel"
    notes = []
    mean = sum(shares) / len(shares)
    if mean < SMALL_MASK:
        notes.append(f"FSAE masked {100 * mean:.2f} % of pixels")
    if cfg.fsae.use_sae and not any(r.get("sae_added_ratio", 0.0) > 0 for r in rows):
        notes.append("SAE added none")
    return "; ".join(notes)


def demo_workers() -> int:
    """Processes for the three trainings: one per run when the machine has 2 cores or more (the demo's tiny
    network keeps a second thread of one process busy only part of the time, so three runs side by side
    finish sooner than one after another: docs/decisions.md), else 1 (in this process)."""
    return len(VARIANTS) if (os.cpu_count() or 1) >= 2 else 1


def run_demo(out: str | Path = "runs/demo", seed: int | None = None, quick: bool = False,
             progress: bool = True, workers: int | None = None) -> dict:
    started = time.time()
    if seed is None:
        seed = int(os.environ.get("FSAE_DEMO_SEED", "0"))
    workers = demo_workers() if workers is None else workers
    out = Path(out)
    data_root = generate(out / "data", demo_spec(seed, quick), progress=progress)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    jobs = []
    for variant in VARIANTS:
        cfg = demo_config(variant, data_root, seed, quick)
        save_config(cfg, out / variant / "config.yaml")
        print(f"[{variant}] training {cfg.train.epochs} epochs -> {out / variant}", flush=True)
        jobs.append({"variant": variant, "cfg": cfg, "run_dir": out / variant, "threads": threads,
                     "progress": progress and workers == 1})
    results: dict = {"seed": seed}
    for job, rows in zip(jobs, train_variants(jobs, workers, progress)):
        results.update(rows)
        row = rows[job["variant"]]
        print(f"[{job['variant']}] seed mIoU {row['seed_miou']:.1f} (train split, best threshold "
              f"{row['best_threshold']:.2f})", flush=True)
    run_dirs = {LABELS[variant]: out / variant for variant in VARIANTS}
    train_set = VOCDataset(data_root, jobs[0]["cfg"].infer.split, num_classes=jobs[0]["cfg"].data.num_classes)
    results["curves"] = {variant: heldout_curve(out / variant) for variant in VARIANTS}
    results["claims"] = claims(results)
    results["seconds"] = round(time.time() - started, 1)

    figures = out / "figures"
    plot_training_curves(figures / "curves.png", run_dirs)
    plot_heldout_curves(figures / "heldout.png", {LABELS[v]: c for v, c in results["curves"].items()})
    save_overlays(figures / "overlays.png", out, train_set, n=6)
    write_json(out / "results.json", results)
    write_text(out / "report.md", render_report(results))
    html_report = write_report(out, compute=False, preamble=render_report_html(results))
    print(render_table(results))
    print(render_curves(results["curves"]))
    print(f"report: {out / 'report.md'} and {html_report}\nresults: {out / 'results.json'}\nfigures: {figures}")
    return results


def train_variant(job: dict) -> dict:
    """One row of Table 6: train ``job["cfg"]`` into ``job["run_dir"]`` and score its last epoch's seeds
    multi-scale + flip on the train split and the held-out split (the base's best epoch too); -> ``{variant:
    row}`` (and ``"base_best_epoch"``). ``job["threads"]``: torch threads of a pool process (None: unchanged)."""
    if job["threads"] is None:
        return run_variant(job)
    torch.set_num_threads(job["threads"])
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the parent's bar and lines speak
        return run_variant(job)


def run_variant(job: dict) -> dict:
    """``train_variant``'s work, in this process and on its threads."""
    variant, cfg, run_dir, progress = job["variant"], job["cfg"], Path(job["run_dir"]), job["progress"]
    thresholds = default_thresholds()
    train(cfg, run_dir, progress=progress)
    train_set = VOCDataset(cfg.data.root, cfg.infer.split, num_classes=cfg.data.num_classes)
    val_set = VOCDataset(cfg.data.root, cfg.data.val_split, num_classes=cfg.data.num_classes)
    model, _ = model_from_checkpoint(run_checkpoint(run_dir, "last"))
    ev = score_seeds(model, train_set, run_dir, "seeds", cfg, thresholds, progress)
    # The same multi-scale protocol on the held-out split: seeds of images the network never saw.
    ev_val = score_seeds(model, val_set, run_dir, "seeds_val", cfg, thresholds, progress)
    epochs = read_csv(run_dir / "epochs.csv")
    best_epoch = max(epochs, key=lambda r: r["val_miou"])
    rows = {variant: {
        **seed_row(ev), **{f"heldout_{k}": v for k, v in seed_row(ev_val).items() if k != "best_threshold"},
        "val_miou_last_epoch": 100 * epochs[-1]["val_miou"],
        "val_miou_best_epoch": 100 * best_epoch["val_miou"], "val_best_epoch": int(best_epoch["epoch"]),
        "fsae_note": fsae_note(run_dir, cfg),
    }}
    if variant == "base":  # the early-stopped base: its best held-out epoch, on the paper's protocol
        best_model, _ = model_from_checkpoint(run_checkpoint(run_dir, "best"))
        ev_best = score_seeds(best_model, train_set, run_dir, "seeds_best", cfg, thresholds, progress)
        rows["base_best_epoch"] = {"epoch": int(best_epoch["epoch"]), **seed_row(ev_best)}
    return rows


def train_variants(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    """``train_variant`` of every job: in this process (``workers`` 1), else in a pool of ``workers`` spawned
    processes under one progress bar over all runs' epochs (their ``epochs.csv`` rows); the first failure
    ends the others (the pool is terminated) and is raised here."""
    if workers == 1:
        return [train_variant(job) for job in jobs]
    total = sum(job["cfg"].train.epochs for job in jobs)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool, \
            tqdm(total=total, desc="epochs of " + " / ".join(LABELS[j["variant"]] for j in jobs),
                 disable=not progress) as bar:
        pending = [pool.apply_async(train_variant, (job,)) for job in jobs]
        while not all(p.ready() for p in pending):
            for p in pending:
                if p.ready() and not p.successful():
                    p.get()  # the worker's error, raised here; leaving the block terminates the pool
            bar.update(sum(epochs_done(job["run_dir"]) for job in jobs) - bar.n)
            time.sleep(0.5)
        bar.update(total - bar.n)
        return [p.get() for p in pending]


def epochs_done(run_dir: Path) -> int:
    """Rows of ``run_dir/epochs.csv`` (epochs finished), 0 before the first."""
    path = Path(run_dir) / "epochs.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def run_demo_seeds(out: str | Path, seeds: list[int], quick: bool = False, progress: bool = True) -> str:
    """``run_demo`` once per seed into ``out/seed_N``; writes ``out/seeds.md``: each seed and the mean."""
    out = Path(out)
    runs = [run_demo(out / f"seed_{seed}", seed=seed, quick=quick, progress=progress) for seed in seeds]
    table = render_seeds_table(runs)
    write_text(out / "seeds.md", table + "\n")
    print(table)
    return table


SEED_COLUMNS = ("seed_miou", "fpr", "fnr", "coverage")


def render_seeds_table(runs: list[dict]) -> str:
    """One row per (seed, method) and a mean row per method; the claims each seed met; the time."""
    methods = [("base", "Base, last epoch"), ("base_best_epoch", "Base, best epoch"), ("fae", LABELS["fae"]),
               ("fsae", LABELS["fsae"])]
    rows = []
    for key, label in methods:
        for run in runs:
            epoch = f" (ep {run['base_best_epoch']['epoch']})" if key == "base_best_epoch" else ""
            rows.append([run["seed"], label + epoch, *(run[key][c] for c in SEED_COLUMNS)])
        rows.append(["mean", f"**{label}**", *(sum(r[key][c] for r in runs) / len(runs) for c in SEED_COLUMNS)])
    table = markdown_table(["seed", "Method", "Seed mIoU", "FPR", "FNR", "object coverage"], rows)
    met = {name: sum(r["claims"][name] for r in runs) for name in runs[0]["claims"]}
    lines = [f"- {CLAIM_TEXT[name]}: {count} of {len(runs)} seeds" for name, count in met.items()]
    times = ", ".join(f"{r['seconds']:.0f}" for r in runs)
    return f"{table}\n\n" + "\n".join(lines) + f"\n\nTime per seed (s): {times}."


def score_seeds(model, dataset: VOCDataset, run_dir: Path, name: str, cfg: Config, thresholds: list[float],
                progress: bool) -> dict:
    """``model``'s seeds of ``dataset`` into ``run_dir/name``, swept and saved as ``run_dir/eval/<name>.json``
    (read by ``fsae report`` / ``fsae compare``)."""
    infer_seeds(model, dataset, run_dir / name, cfg.infer.scales, cfg.infer.flip, cfg.infer.batch_size,
                progress=progress)
    ev = evaluate_seeds(run_dir / name, dataset.mask_dir, dataset.ids, dataset.num_classes, thresholds,
                        progress=False)
    save_eval(run_dir / "eval" / f"{name}.json", ev, scored=run_dir / name, gt_dir=dataset.mask_dir, ids=dataset.ids)
    return ev


def seed_row(ev: dict) -> dict:
    """Seed mIoU, FPR, FNR, object coverage (in %) and the threshold of a sweep's best entry."""
    best = ev["best"]
    return {"seed_miou": 100 * best["miou"], "fpr": 100 * best["fpr"], "fnr": 100 * best["fnr"],
            "coverage": 100 * best["coverage"], "best_threshold": best["threshold"]}


# What the demo is meant to show (issue #30: converged runs, the paper's Table 5 direction and Table 6 order).
PLATEAU_POINTS = 1.0  # the base's held-out seed mIoU over the last third of its epochs stays within this of its best
FSAE_GAINS = {"over_best_epoch": 2.0, "coverage": 3.0}
SAE_TIE = 0.5  # +FAE+SAE within this many points below +FAE counts as a tie (Table 6: SAE may tie FAE)


def last_third(curve: list[float]) -> list[float]:
    """The last ceil(n / 3) entries of a per-epoch curve (n epochs)."""
    return curve[len(curve) - -(-len(curve) // 3):]


def plateaued(curve: list[float], points: float = PLATEAU_POINTS) -> bool:
    """Whether every epoch of the curve's last third is within ``points`` of the curve's best epoch (curve:
    held-out seed mIoU in %, one entry per epoch). An empty curve has not plateaued."""
    return bool(curve) and min(last_third(curve)) >= max(curve) - points


def claims(results: dict) -> dict[str, bool]:
    """The demo's claims on this run: the base has stopped improving (``plateaued`` on its held-out
    curve, ``results["curves"]["base"]``); FSAE's last epoch beats the base's best epoch by
    ``FSAE_GAINS["over_best_epoch"]`` points of seed mIoU, with object coverage up by
    ``FSAE_GAINS["coverage"]`` and FNR down (an expansion); Base < +FAE <= +FAE+SAE (Table 6)."""
    base, best, fae, fsae = results["base"], results["base_best_epoch"], results["fae"], results["fsae"]
    return {
        "base_plateaued": plateaued(results["curves"]["base"]["val_miou"]),
        "fsae_beats_base_best_epoch": fsae["seed_miou"] - best["seed_miou"] >= FSAE_GAINS["over_best_epoch"],
        "fsae_expands": (fsae["coverage"] - best["coverage"] >= FSAE_GAINS["coverage"]
                         and fsae["fnr"] < best["fnr"]),
        "table6_order": base["seed_miou"] < fae["seed_miou"] <= fsae["seed_miou"] + SAE_TIE,
    }


def heldout_curve(run_dir: Path) -> dict[str, list]:
    """The run's per-epoch held-out seed mIoU, FPR and FNR in % (``epochs.csv``), with the epoch numbers."""
    rows = [r for r in read_csv(run_dir / "epochs.csv") if r["val_miou"] == r["val_miou"]]  # NaN: not evaluated
    return {"epoch": [int(r["epoch"]) for r in rows], "val_miou": [100 * r["val_miou"] for r in rows],
            "val_fpr": [100 * r["val_fpr"] for r in rows], "val_fnr": [100 * r["val_fnr"] for r in rows]}


def curve_table(curves: dict[str, dict], mark_tail: bool) -> tuple[list[str], list[list]]:
    """Header and rows of the runs' held-out seed mIoU per epoch, side by side (cells "61.2", "" past a
    run's last evaluated epoch); ``mark_tail``: the base's last third named in the epoch column."""
    variants = [v for v in VARIANTS if v in curves]
    epochs = curves["base"]["epoch"]
    tail = set(last_third(epochs)) if mark_tail else set()
    rows = [[f"{epoch}{' (last third)' if epoch in tail else ''}",
             *(f"{curves[v]['val_miou'][i]:.1f}" if i < len(curves[v]["val_miou"]) else "" for v in variants)]
            for i, epoch in enumerate(epochs)]
    return ["epoch", *(LABELS[v] for v in variants)], rows


def render_curves(curves: dict[str, dict]) -> str:
    """The held-out seed mIoU of each run per epoch, side by side (markdown); the base's last third marked."""
    return markdown_table(*curve_table(curves, mark_tail=True))


def render_report_html(results: dict) -> str:
    """The checklist and the held-out curves side by side, for the top of ``report.html``."""
    items = "".join(f"<li>[{'x' if held else ' '}] {html.escape(CLAIM_TEXT[name])}</li>"
                    for name, held in results["claims"].items())
    return (f"<h2>What the demo is meant to show (seed {results['seed']})</h2><ul>{items}</ul>"
            "<h2>Held-out seed mIoU per epoch</h2>" + html_table(*curve_table(results["curves"], mark_tail=False)))


def save_overlays(path: Path, out: Path, dataset: VOCDataset, n: int = 6) -> Path:
    """Image, GT and the CAM of each variant (and of the base's best epoch) for the first ``n`` images."""
    columns = [("base", "seeds_best"), *((v, "seeds") for v in VARIANTS)]
    titles = [f"CAM {LABELS['base']}, best epoch", *(f"CAM {LABELS[v]}" for v in VARIANTS)]
    rows = []
    for index in range(min(n, len(dataset))):
        sample = dataset[index]
        row = [sample["image"], overlay(sample["image"], colour_mask(sample["mask"]))]
        for variant, folder in columns:
            _, cams = load_seed(out / variant / folder / f"{sample['id']}.npz")
            row.append(overlay(sample["image"], cam_heatmap(cams)))
        rows.append(row)
    return save_overlay_grid(path, rows, ["image", "GT", *titles])


def _label(variant: str, row: dict) -> str:
    """The row's method name, with its ``fsae_note`` when FSAE did not act (rows of older results have none)."""
    note = row.get("fsae_note")
    return f"{LABELS[variant]} ({note})" if note else LABELS[variant]


def render_table(results: dict) -> str:
    best = results["base_best_epoch"]
    rows = [[_label(v, results[v]), results[v]["seed_miou"], results[v]["fpr"], results[v]["fnr"],
             f"{results[v]['best_threshold']:.2f}", results[v]["coverage"], results[v]["heldout_seed_miou"],
             results[v]["heldout_fpr"], results[v]["heldout_fnr"], results[v]["val_miou_last_epoch"],
             f"{results[v]['val_miou_best_epoch']:.1f} (ep {results[v]['val_best_epoch']})"] for v in VARIANTS]
    rows.insert(1, [f"Base, best epoch ({best['epoch']})", best["seed_miou"], best["fpr"], best["fnr"],
                    f"{best['best_threshold']:.2f}", best["coverage"], "", "", "", "", ""])
    header = ["Method", "Seed mIoU (train)", "FPR", "FNR", "threshold", "object coverage",
              "Seed mIoU (held-out)", "FPR", "FNR", "per-epoch val: last epoch", "best epoch"]
    return markdown_table(header, rows)


CLAIM_TEXT = {
    "base_plateaued": (f"the base has plateaued (held-out seed mIoU over the last third of epochs within "
                       f"{PLATEAU_POINTS:g} point of its best)"),
    "fsae_beats_base_best_epoch": (f"+FAE+SAE's last epoch beats the base's best epoch by >= "
                                   f"{FSAE_GAINS['over_best_epoch']:g} points of seed mIoU"),
    "fsae_expands": (f"the gain is expansion: object coverage +{FSAE_GAINS['coverage']:g} points or more and FNR "
                     "down (against the base's best epoch)"),
    "table6_order": f"Base < +FAE <= +FAE+SAE (a tie within {SAE_TIE} point counts)",
}


def render_claims(claims_: dict[str, bool]) -> str:
    return "\n".join(f"- [{'x' if held else ' '}] {CLAIM_TEXT[name]}" for name, held in claims_.items())


def render_report(results: dict) -> str:
    return f"""# fsae demo: Base vs +FAE vs +FAE+SAE on the generated data set (seed {results['seed']})

Seeds are inferred multi-scale (0.5, 1.0, 1.5, 2.0) + flip on the train split (the paper's protocol:
seeds of the training images) and on the held-out val split, each scored at its best background
threshold of a 0.00-0.60 sweep (mIoU, FPR, FNR in %, the paper's Table 6 columns). Object coverage is
the share of GT object pixels that the seed labels with the right class. "Base, best epoch" is the
base's checkpoint of its best held-out epoch (early stopping), scored the same way. The last two
columns are the per-epoch held-out seed mIoU (single scale + flip) after the last epoch and at the
best epoch.

{render_table(results)}

What the demo is meant to show, on this run:

{render_claims(results["claims"])}

Held-out seed mIoU per epoch (val split, single scale + flip, best threshold of the sweep): the base
has stopped improving when its last third stays within {PLATEAU_POINTS:g} point of its best.

{render_curves(results["curves"])}

![held-out curves](figures/heldout.png)

Total time: {results['seconds']:.0f} s.

![curves](figures/curves.png)

![overlays](figures/overlays.png)
"""
