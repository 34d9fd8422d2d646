"""``fsae eval`` and ``fsae convert``: scores of seeds and pseudo-masks; a base repository's seed files."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsae.cli.common import add_force
from fsae.errors import FsaeError
from fsae.formats import FOREIGN_FORMATS, FORMATS


def _format_note(result: dict) -> None:
    if result.get("format_detected") and result["seed_format"] != "fsae":
        print(f"seed format: {result['seed_format']} (detected; --format sets it)")


def cmd_eval(args) -> None:
    if args.num_classes < 1:  # answered before torch is imported
        raise FsaeError(f"--num-classes {args.num_classes} is not allowed; expected an integer >= 1")
    if args.workers < 1 or (args.workers > 1 and args.masks):
        raise FsaeError(f"fsae eval: --workers {args.workers} is not allowed; expected an integer >= 1, "
                        f"with --seeds")
    if args.masks and args.format:
        raise FsaeError("fsae eval: --format applies to --seeds, not --masks")
    from fsae.stages import eval_masks_stage, eval_seeds_stage

    if args.seeds:
        result = eval_seeds_stage(args.seeds, args.gt, args.num_classes, cfg=args.config, ids=args.ids,
                                  split=args.split, threshold=args.threshold, sweep=args.sweep, mode=args.mode,
                                  out=args.out, workers=args.workers, seed_format=args.format)
    else:
        result = eval_masks_stage(args.masks, args.gt, args.num_classes, cfg=args.config, ids=args.ids,
                                  split=args.split, ignore_as=args.ignore_as, out=args.out)
    if not result["main"]:
        return
    from fsae.evaluate import format_scores_table

    _format_note(result)
    if args.masks and Path(result["scored"]) != Path(args.masks):
        print(f"scored: {result['scored']}")
    print(format_scores_table(result))
    if result["written"]:
        print(f"written: {result['written']}")


def cmd_convert(args) -> None:
    from fsae.formats import convert_seeds
    from fsae.io import ids_in, read_id_list
    from fsae.stages import detect_seed_format

    ids = read_id_list(args.ids) if args.ids else None
    seed_format, detected = detect_seed_format(args.format, Path(args.seeds), ids)
    _format_note({"seed_format": seed_format, "format_detected": detected})
    if seed_format == "fsae":
        raise FsaeError(f"{args.seeds}: holds fsae seeds (.npz) already; nothing to convert")
    ids = ids or ids_in(args.seeds, ".npy")
    result = convert_seeds(args.seeds, seed_format, args.out, ids, args.num_classes, force=args.force)
    print(f"seeds: {result['out']} ({result['written']} written from {seed_format} files)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate seeds (threshold sweep) or pseudo-masks against GT "
                                    "(under torchrun: images split over the processes, confusions summed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seeds", help="folder of <id>.npz seeds")
    src.add_argument("--masks", help="folder of <id>.png pseudo-masks (a COCO run's RUN/crf: its crf/<split>/)")
    p.add_argument("--gt", required=True, help="folder of GT <id>.png masks")
    p.add_argument("--num-classes", type=int, required=True, help="foreground classes C")
    p.add_argument("--ids", default=None, help="image list (default: every file in the folder)")
    p.add_argument("--config", default=None, help="run directory or recipe whose protocol (fsae/protocol.py) "
                   "decides threshold / sweep / mode / scored split (default: the run directory holding the folder)")
    p.add_argument("--threshold", type=float, default=None, help="score this one threshold")
    p.add_argument("--sweep", nargs=3, type=float, default=None, metavar=("START", "STOP", "STEP"),
                   help="sweep the background threshold, e.g. --sweep 0 0.6 0.01")
    p.add_argument("--mode", choices=["fixed", "sweep", "first_drop", "argmax"], default=None,
                   help="which threshold is reported: the one given, the best of a sweep, MCTformer's first "
                        "drop, or the seed's own background plane")
    p.add_argument("--split", default=None, help="score the ids of this split of the run's data set")
    p.add_argument("--ignore-as", type=int, default=None, metavar="LABEL",
                   help="--masks: score pseudo-mask pixels marked 255 (ignore) as this class, e.g. 0 = background "
                        "(default: leave them out)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="seed files: fsae .npz, or a base repository's .npy (irn, sipe, psa: also SEAM / PPC / "
                        "EPS, mctformer); default: detected from the first file")
    p.add_argument("--workers", type=int, default=1,
                   help="--seeds: processes reading the seed files (default 1); the result does not depend on it")
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="a base repository's <id>.npy seed files (irn, sipe, psa, mctformer) "
                                       "-> fsae seeds <id>.npz")
    p.add_argument("seeds", help="folder of <id>.npy seed files")
    p.add_argument("--format", choices=FOREIGN_FORMATS, default=None,
                   help="their format (default: detected from the first file)")
    p.add_argument("--out", required=True, help="folder for the fsae seeds")
    p.add_argument("--ids", default=None, help="image list (default: every .npy file in the folder)")
    p.add_argument("--num-classes", type=int, default=None, help="foreground classes C: check the class indices")
    add_force(p)
    p.set_defaults(func=cmd_convert)
