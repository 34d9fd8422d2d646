"""``fsae crf``, ``fsae irn``, ``fsae psa``: seeds -> pseudo-masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsae.cli.common import add_device, add_force, add_ids, add_set, add_shard, shard_part, warned


def threshold_arg(text: str):
    """``--threshold T|best``: a number, or ``best`` (the run's evaluated best threshold)."""
    if text == "best":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1] or 'best'") from None


def cmd_crf(args) -> None:
    from fsae.stages import crf_stage

    args.stopped_in = args.out or (Path(args.run) / "crf" if args.run else None)
    result = crf_stage(args.run, seeds=args.seeds, images=args.images, out=args.out, ids=args.ids,
                       threshold=args.threshold, background=args.background, bg_power=args.bg_power,
                       iterations=args.iterations, workers=args.workers, shard=args.shard, force=args.force)
    shard = result["shard"]
    if result["background"] == "own":
        print("pseudo-masks: SIPE's cam2ir labels (the seeds' own background, ignore band 255)")
    elif result["threshold"] is not None:
        print(f"threshold {result['threshold']:g} ({result['threshold_source']})")
    if not result["groups"]:
        print(f"pseudo-masks: nothing to do for shard {shard[0]}/{shard[1]} of {result['total']} images")
    for group in result["groups"]:
        print(f"pseudo-masks: {group['out_dir']} ({group['refined']} refined, {group['skipped']} already "
              f"there{shard_part(shard)}){warned(group)}")


def _counts(r: dict, part: str = "") -> str:
    """One random-walk step's result as ``OUT_DIR (N written, M already there)``."""
    return f"{r['out_dir']} ({r['written']} written, {r['skipped']} already there{part}){warned(r)}"


def cmd_irn(args) -> None:
    from fsae.refine.irn import load_irn_config
    from fsae.stages import irn_stage

    cfg = load_irn_config(args.config, args.overrides)
    args.stopped_in = Path(args.run)
    result = irn_stage(args.run, cfg, images=args.images, seeds=args.seeds, ids=args.ids, device=args.device,
                       force=args.force)
    print(f"ir labels: {_counts(result['ir_labels'])}\nirn checkpoint: {result['checkpoint']}\n"
          f"pseudo-masks: {_counts(result['masks'])}")


def cmd_psa(args) -> None:
    from fsae.refine.psa import load_psa_config
    from fsae.stages import psa_stage

    cfg = load_psa_config(args.config, args.overrides)
    args.stopped_in = Path(args.run)
    result = psa_stage(args.run, cfg, images=args.images, seeds=args.seeds, ids=args.ids,
                       steps=None if args.step == "all" else (args.step,), shard=args.shard, device=args.device,
                       force=args.force)
    part = shard_part(result["shard"])
    if "labels" in result:
        print(f"affinity labels: {_counts(result['labels'], part)}")
    if "train" in result:
        print(f"psa checkpoint: {result['train']}")
    if "masks" in result:
        print(f"pseudo-masks: {_counts(result['masks'], part)}")


def _random_walk_inputs(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config", default=None,
                   help=f"{name.upper()} recipe, e.g. configs/voc/{name}.yaml (default: {name.upper()}'s defaults)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    add_ids(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crf", help="dense-CRF refinement of seeds -> pseudo-mask PNGs (all cores, resumable)")
    p.add_argument("run", nargs="?", default=None, help="run directory (seeds/, config.yaml); or give paths")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--out", default=None, help="output folder (default RUN/crf; COCO: RUN/crf/<split>/)")
    p.add_argument("--threshold", type=threshold_arg, default=None, metavar="T|best",
                   help="background score of the unary; best: the best threshold of RUN/eval/seeds.json (default: "
                        "the run's protocol, fsae/protocol.py: the recipe's eval.threshold, else the method's; the "
                        "same threshold fsae grid and fsae predict use)")
    p.add_argument("--background", choices=["threshold", "power"], default=None,
                   help="background plane: constant threshold, or (1 - max CAM)^bg_power (PSA/EPS/PPC); default: "
                        "the protocol's (SIPE: its own background, cam2ir labels with an ignore band)")
    p.add_argument("--bg-power", type=float, default=None, help="alpha of the power background (PPC: 8)")
    p.add_argument("--iterations", type=int, default=None, help="mean-field iterations (PPC: 5, PSA: 10)")
    add_ids(p)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    add_force(p)
    add_shard(p)
    p.set_defaults(func=cmd_crf)

    p = sub.add_parser("irn", help="IRN: seeds -> IR labels -> boundary network -> random-walk pseudo-masks")
    p.add_argument("run", help="run directory: reads seeds/, writes ir_labels/, irn/irn.pt, irn_masks/")
    _random_walk_inputs(p, "irn")
    add_device(p, "the IRN recipe's device")
    add_force(p, "ir_labels/, irn/, irn_masks/")
    add_set(p, "train.epochs=1")
    p.set_defaults(func=cmd_irn)

    p = sub.add_parser("psa", help="PSA: seeds -> affinity labels -> AffinityNet -> random-walk pseudo-masks")
    p.add_argument("run", help="run directory: reads seeds/, writes aff_labels/, psa/psa.pt, psa_masks/")
    _random_walk_inputs(p, "psa")
    p.add_argument("--step", choices=["all", "labels", "train", "masks"], default="all",
                   help="run one step only (default: all three in turn)")
    add_shard(p, "labels / masks steps: only images I, I+N, I+2N, ... of the list (training takes all)")
    add_device(p, "the PSA recipe's device")
    add_force(p, "the steps run: aff_labels/, psa/, psa_masks/")
    add_set(p, "train.epochs=1")
    p.set_defaults(func=cmd_psa)
