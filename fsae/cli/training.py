"""``fsae train`` and ``fsae cam``: a base method (+ FSAE), then its seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsae.cli.common import add_device, add_force, add_set, add_shard, run_paths, shard_part


def cmd_train(args) -> None:
    from fsae.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad recipe or --set answers before torch is imported
    from fsae.distributed import env_world, is_main, launch, per_rank_batch
    from fsae.stages import train_stage

    if args.nproc > 1 and env_world()[1] == 1:  # the shortcut: torchrun this same command N times
        per_rank_batch(cfg.train.batch_size, args.nproc)  # fail before spawning
        argv = ["train", args.config, *(["--out", args.out] if args.out else []),
                *(["--device", args.device] if args.device else []), *(["--no-resume"] if args.no_resume else []),
                *(f"--set={o}" for o in args.overrides)]
        launch(args.nproc, argv)
        return
    run_dir = args.stopped_in = Path(args.out) if args.out else Path("runs") / cfg.name
    result = train_stage(cfg, run_dir, resume=not args.no_resume, device=args.device)
    if is_main():
        print(f"trained: {result['checkpoint']}\nrun dir: {run_dir}")


def cmd_cam(args) -> None:
    from fsae.config import load_config

    config_path, run_dir = run_paths(args.config)
    cfg = load_config(config_path, args.overrides)
    from fsae.stages import cam_stage

    args.stopped_in = Path(args.out) if args.out else (run_dir / "seeds" if run_dir else Path("seeds"))
    result = cam_stage(run_dir, cfg, checkpoint=args.checkpoint, split=args.split, out=args.out, device=args.device,
                       shard=args.shard, force=args.force, seed_dtype=args.seed_dtype)
    print(f"seeds: {result['out']} ({result['written']} written, {result['skipped']} already there"
          f"{shard_part(result['shard'])})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a base method (+ FSAE when fsae.enabled)")
    p.add_argument("config", help="a recipe, e.g. configs/synthetic/cam_fsae.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    add_device(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run directory holds checkpoints/last.pt")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (one per GPU): runs `torchrun --standalone --nproc_per_node N`; "
                        "train.batch_size stays the global batch")
    add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cam", help="multi-scale + flip CAM inference -> seeds/<id>.npz")
    p.add_argument("config", help="a run directory (or a config file with --checkpoint PATH)")
    p.add_argument("--checkpoint", default=None, metavar="best|last|PATH",
                   help="the run's best.pt (best held-out epoch) or last.pt, or a checkpoint file (default: last)")
    p.add_argument("--out", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--seed-dtype", choices=["float16", "uint8"], default=None,
                   help="seed storage: float16, or uint8 per class on the 0.005 threshold grid (error <= 0.0025), "
                        "smaller files (default: infer.seed_dtype)")
    p.add_argument("--split", default=None, help="image list to infer (default: the recipe's infer.split)")
    add_device(p)
    add_force(p)
    add_shard(p)
    add_set(p, "infer.scales=[1.0,0.5]")
    p.set_defaults(func=cmd_cam)
