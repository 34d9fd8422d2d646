"""``fsae seg train`` and ``fsae seg infer``: DeepLab V1/V2 on the pseudo-masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsae.cli.common import add_device, add_force, add_set, run_paths


def cmd_seg_train(args) -> None:
    from fsae.segment.config import load_seg_config

    cfg = load_seg_config(args.config, args.overrides)  # a bad recipe or --set answers before torch is imported
    from fsae.stages import seg_train_stage

    run_dir = args.stopped_in = Path(args.out) if args.out else Path("runs") / cfg.name
    result = seg_train_stage(cfg, run_dir, masks=args.masks, resume=not args.no_resume, allow_gt=args.allow_gt,
                             device=args.device)
    print(f"trained: {result['checkpoint']}\nrun dir: {run_dir}")


def cmd_seg_infer(args) -> None:
    from fsae.segment.config import load_seg_config

    config_path, run_dir = run_paths(args.config)
    cfg = load_seg_config(config_path, args.overrides)
    from fsae.evaluate import format_scores_table
    from fsae.stages import seg_infer_stage

    args.stopped_in = Path(args.out) if args.out else run_dir
    results = seg_infer_stage(run_dir, cfg, checkpoint=args.checkpoint, out=args.out, splits=args.split or None,
                              crf=False if args.no_crf else None, device=args.device, force=args.force)
    for split, result in results.items():
        if result.get("note"):  # skipped (a missing test list): the note is on stderr already
            continue
        print(f"{split}: {', '.join(result['dirs'])} ({result['written']} written, {result['skipped']} already there)")
        for name, scores in result["eval"].items():
            print(f"[{name}] " + format_scores_table(scores))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("seg", help="DeepLab V1/V2 on pseudo-masks: train, infer").add_subparsers(
        dest="seg_cmd", required=True)
    p = seg.add_parser("train", help="train DeepLab on pseudo-masks (poly LR, resumable)")
    p.add_argument("config", help="a recipe, e.g. configs/voc/deeplabv2_r101.yaml")
    p.add_argument("--masks", default=None, help="pseudo-mask folder (sets data.mask_dir)")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    add_device(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run directory holds checkpoints/last.pt")
    p.add_argument("--allow-gt", action="store_true",
                   help="train on the data set's ground truth (an upper-bound run; recorded in the checkpoint)")
    add_set(p, "train.iterations=100")
    p.set_defaults(func=cmd_seg_train)

    p = seg.add_parser("infer", help="multi-scale + flip (+ CRF) masks for val (evaluated) and test (VOC server layout)")
    p.add_argument("config", help="a run directory (or a config file with --checkpoint and --out)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (default RUN/checkpoints/last.pt)")
    p.add_argument("--out", default=None, help="output root (default: the run directory)")
    p.add_argument("--split", action="append", default=[], help="split(s) to predict (default: data.val_split "
                   "and data.test_split)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    add_force(p)
    add_device(p)
    add_set(p, "infer.scales=[1.0]")
    p.set_defaults(func=cmd_seg_infer)
