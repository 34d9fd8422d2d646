"""``fsae report``, ``compare``, ``grid``, ``predict``, ``demo``: looking at runs, grids, your own images."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsae.cli.common import add_device, add_set
from fsae.cli.masks import threshold_arg


def cmd_report(args) -> None:
    from fsae.report import write_report

    path = write_report(args.run, out=args.out, num_images=args.images, embed=args.embed,
                        compute=not args.no_compute, progress=True)
    print(f"report: {path.resolve().as_uri()}")


def cmd_compare(args) -> None:
    from fsae.compare import compare_markdown, compare_runs, write_comparison

    summaries = compare_runs(args.runs, compute=not args.no_compute, progress=True)
    text = compare_markdown(summaries)
    print(text, end="")
    if args.out:
        print(f"written: {write_comparison(args.out, summaries, text)}")


def cmd_grid(args) -> None:
    from fsae.grid import GridSpec, parse_seeds, parse_vary, run_grid

    spec = GridSpec(config=args.config, varies=[parse_vary(v) for v in args.vary], seeds=parse_seeds(args.seeds),
                    out=Path(args.out), base=args.base, masks=args.masks, overrides=args.overrides,
                    irn_config=args.irn_config, devices=args.devices.split(",") if args.devices else None,
                    nproc=args.nproc)
    written = run_grid(spec, only=args.only)
    if not written:  # --only: one job, no table
        return
    print(Path(written["md"]).read_text(), end="")
    print(f"grid: {written['md']}, {written['json']}, {Path(written['html']).resolve().as_uri()}")


def cmd_predict(args) -> None:
    from fsae.predict import predict_images

    record = predict_images(args.model, args.images, args.out, labels=args.labels, top_k=args.top_k,
                            min_prob=args.min_prob, crf=args.crf, threshold=args.threshold, device=args.device)
    print(f"threshold {record['threshold']:.2f} from {record['threshold_from']}")
    for entry in record["images"]:
        found = ", ".join(f"{c['name']} ({c['prob']:.2f})" for c in entry["classes"]) or "no class"
        print(f"{entry['image']}: {found} -> {entry['figure']}")
    print(f"predictions: {Path(args.out) / 'predictions.json'}")


def cmd_demo(args) -> None:
    from fsae.demo import run_demo, run_demo_seeds

    if args.seeds:
        run_demo_seeds(args.out, args.seeds, quick=args.quick)
    else:
        run_demo(args.out, seed=args.seed, quick=args.quick)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate data, train base / +FAE / +FAE+SAE, compare seeds")
    p.add_argument("--out", default="runs/demo", help="output folder: data, runs and the report (default runs/demo)")
    p.add_argument("--seed", type=int, default=None, help="data and training seed (default: $FSAE_DEMO_SEED or 0)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="run the demo once per seed into OUT/seed_N and write OUT/seeds.md (mean and each seed)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.set_defaults(func=cmd_demo)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="RUN_DIR/report.html: config, curves, metric tables, per-class IoU, examples")
    p.add_argument("run", help="run directory (or a folder of runs, e.g. the demo's output)")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html; figures in report_files/ beside it)")
    p.add_argument("--images", type=int, default=4, help="example images in the grid")
    p.add_argument("--embed", action="store_true", help="figures inside the HTML (data URIs): one self-contained file")
    p.add_argument("--no-compute", action="store_true",
                   help="only show eval/*.json; do not evaluate seeds/ and crf/ that have no evaluation yet")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="runs side by side (seed mIoU / FPR / FNR, pseudo-mask mIoU) with deltas")
    p.add_argument("runs", nargs="+", help="run directories; the first is the base of the deltas")
    p.add_argument("--out", default=None, help="write the table (markdown; .json: the numbers)")
    p.add_argument("--no-compute", action="store_true",
                   help="only use eval/*.json; do not evaluate seeds/ and crf/ that have no evaluation yet")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("grid", help="ablation grid: train every --vary combination x seed, table of median and "
                                    "mean ± std over seeds (grid.md / .json / .html)")
    p.add_argument("config", help="the recipe every run starts from, e.g. configs/synthetic/cam_fsae.yaml")
    p.add_argument("--vary", action="append", required=True, metavar="FIELD=V1,V2",
                   help="a config field and its values, e.g. fsae.tau_fae=0.9,0.95 (repeatable: every combination)")
    p.add_argument("--seeds", default="0", help="training seeds (train.seed) of every setting, e.g. 0,1,2")
    p.add_argument("--out", required=True, help="grid folder: one run directory per setting and seed, the tables")
    p.add_argument("--base", action="store_true", help="also train the recipe with fsae.enabled=false (first row)")
    p.add_argument("--masks", choices=["crf", "irn"], default=None,
                   help="also make and evaluate pseudo-masks: dense CRF at the protocol's threshold (as fsae crf RUN), "
                        "or IRN")
    p.add_argument("--irn-config", default=None, help="IRN recipe for --masks irn, e.g. configs/synthetic/irn.yaml")
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--devices", default=None, metavar="D1,D2",
                      help="one job per device side by side, e.g. cuda:0,cuda:1 (default: train.device, one at a time)")
    jobs.add_argument("--nproc", type=int, default=1, help="train each job with N processes (fsae train --nproc)")
    p.add_argument("--only", default=None, metavar="SETTING/seed=S",
                   help="run just this run of the grid here, e.g. tau_fae=0.9/seed=1 (what each job runs), no table")
    add_set(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("predict", help="a checkpoint on any image: CAM per class, seed (and CRF mask) as a PNG figure")
    p.add_argument("model", help="a run directory (its checkpoints/last.pt, its protocol's threshold) or a checkpoint file")
    p.add_argument("images", nargs="+", help="image files, any size, JPEG or PNG")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--labels", default=None, metavar="NAME,NAME",
                         help="the classes in the images, by name (default: the classifier's own predictions)")
    classes.add_argument("--top-k", type=int, default=None, help="take the classifier's K most probable classes")
    p.add_argument("--min-prob", type=float, default=0.5,
                   help="without --labels / --top-k: classes with a sigmoid probability at least this")
    p.add_argument("--crf", action="store_true", help="also the dense-CRF mask at the threshold")
    p.add_argument("--threshold", type=threshold_arg, default=None, metavar="T|best",
                   help="background threshold of the seed; best: the best of RUN/eval/seeds.json (default: the one "
                        "`fsae crf RUN` uses, the run's protocol's)")
    p.add_argument("--out", required=True, help="output folder")
    add_device(p, "cpu", default="cpu")
    p.set_defaults(func=cmd_predict)
