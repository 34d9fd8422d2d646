"""``fsae <stage>``: parse, build the config, call the library, print where results went."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsae import __version__
from fsae.errors import FsaeError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set fsae.enabled=true (repeatable)")


def _run_paths(target: str):
    """A run directory or a config file -> (config path, run dir or None)."""
    path = Path(target)
    if path.is_dir():
        return path / "config.yaml", path
    return path, None


def cmd_data_synthetic(args) -> None:
    from fsae.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(num_train=args.train, num_val=args.val, image_size=args.size,
                         num_classes=args.classes, seed=args.seed)
    out = generate(args.out, spec)
    print(f"synthetic data set: {out} ({args.train} train / {args.val} val images, {args.classes} classes)")


def cmd_data_prepare(args) -> None:
    from fsae.data import prepare

    if args.kind == "voc":
        result = prepare.prepare_voc(args.root, sbd=args.sbd, workers=args.workers)
    else:
        result = prepare.prepare_coco(args.root, workers=args.workers, crowd=args.crowd)
    print(result.summary())


def cmd_data_check(args) -> int:
    from fsae.data.check import check_dataset, format_problems

    problems = check_dataset(args.kind, args.root, split=args.split, saliency=args.saliency, fast=args.fast)
    print(format_problems(problems))
    return 1 if problems else 0


def cmd_train(args) -> None:
    from fsae.config import load_config
    from fsae.train import train

    cfg = load_config(args.config, args.overrides)
    if args.device:
        cfg.train.device = args.device
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    ckpt = train(cfg, run_dir, resume=not args.no_resume)
    print(f"trained: {ckpt}\nrun dir: {run_dir}")


def cmd_cam(args) -> None:
    from fsae.config import load_config
    from fsae.data import build_dataset
    from fsae.infer import infer_seeds
    from fsae.train import model_from_checkpoint

    config_path, run_dir = _run_paths(args.config)
    cfg = load_config(config_path, args.overrides)
    checkpoint = args.checkpoint or (run_dir / "checkpoints" / "last.pt" if run_dir else None)
    if checkpoint is None:
        raise FsaeError("fsae cam: pass --checkpoint (or a run directory instead of a config file)")
    out = Path(args.out) if args.out else (run_dir / "seeds" if run_dir else Path("seeds"))
    device = args.device or cfg.train.device
    model, _ = model_from_checkpoint(checkpoint, cfg, device)
    dataset = build_dataset(cfg.data, args.split or cfg.infer.split)
    result = infer_seeds(model, dataset, out, cfg.infer.scales, cfg.infer.flip, cfg.infer.batch_size, device)
    print(f"seeds: {result['out']} ({result['written']} written, {result['skipped']} already there)")


def cmd_eval(args) -> None:
    from fsae.evaluate import (default_thresholds, evaluate_masks, evaluate_seeds, format_scores_table,
                               save_eval)
    from fsae.io import read_id_list

    source = Path(args.seeds or args.masks)
    suffix = ".npz" if args.seeds else ".png"
    ids = read_id_list(args.ids) if args.ids else sorted(p.stem for p in source.glob(f"*{suffix}"))
    if args.seeds:
        thresholds = default_thresholds(*args.sweep) if args.sweep else [args.threshold]
        result = evaluate_seeds(source, args.gt, ids, args.num_classes, thresholds)
    else:
        result = evaluate_masks(source, args.gt, ids, args.num_classes, ignore_as=args.ignore_as)
    print(format_scores_table(result))
    if args.out:
        print(f"written: {save_eval(args.out, result)}")


def cmd_crf(args) -> None:
    from fsae.config import load_config
    from fsae.io import read_id_list
    from fsae.refine import refine_dir

    seeds, images, out = args.seeds, args.images, args.out
    if args.run:
        run = Path(args.run)
        cfg = load_config(run / "config.yaml")
        seeds = seeds or run / "seeds"
        images = images or Path(cfg.data.root) / "JPEGImages"
        out = out or run / "crf"
    if not (seeds and images and out):
        raise FsaeError("fsae crf: pass a run directory, or --seeds, --images and --out")
    ids = read_id_list(args.ids) if args.ids else sorted(p.stem for p in Path(seeds).glob("*.npz"))
    result = refine_dir(seeds, images, out, ids, threshold=args.threshold, workers=args.workers)
    print(f"pseudo-masks: {result['out_dir']} ({result['refined']} refined, {result['skipped']} already there)")


def cmd_demo(args) -> None:
    from fsae.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsae", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fsae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate data, train base / +FAE / +FAE+SAE, compare seeds")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=None, help="data and training seed (default: $FSAE_DEMO_SEED or 0)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="generate, prepare or check data sets").add_subparsers(dest="data_cmd",
                                                                                             required=True)
    p = data.add_parser("synthetic", help="write the generated WSSS data set (VOC layout)")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synthetic)
    p = data.add_parser("prepare", help="build train_aug / COCO masks and label files")
    p.add_argument("kind", choices=["voc", "coco"])
    p.add_argument("--root", required=True)
    p.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE/dataset folder (voc)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--crowd", choices=["class", "ignore"], default="class",
                   help="coco: draw crowd regions as their class (reference protocol) or as 255")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("check", help="validate a data set; one line per problem")
    p.add_argument("kind", choices=["voc", "coco", "saliency"])
    p.add_argument("--root", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--saliency", default=None)
    p.add_argument("--fast", action="store_true", help="lists, label file and file existence only")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="train a base method (+ FSAE when fsae.enabled)")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cam", help="multi-scale + flip CAM inference -> seeds/<id>.npz")
    p.add_argument("config", help="a config file or a run directory")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--device", default=None)
    _add_set(p)
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("crf", help="dense-CRF refinement of seeds -> pseudo-mask PNGs (all cores, resumable)")
    p.add_argument("run", nargs="?", default=None, help="run directory (seeds/, config.yaml); or give paths")
    p.add_argument("--seeds", default=None)
    p.add_argument("--images", default=None, help="folder of <id>.jpg images")
    p.add_argument("--out", default=None, help="output folder (default RUN/crf)")
    p.add_argument("--threshold", type=float, required=True, help="background score of the unary")
    p.add_argument("--ids", default=None, help="image list (default: every seed file)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=cmd_crf)

    p = sub.add_parser("eval", help="evaluate seeds (threshold sweep) or pseudo-masks against GT")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seeds", help="folder of <id>.npz seeds")
    src.add_argument("--masks", help="folder of <id>.png pseudo-masks")
    p.add_argument("--gt", required=True, help="folder of GT <id>.png masks")
    p.add_argument("--num-classes", type=int, required=True, help="foreground classes C")
    p.add_argument("--ids", default=None, help="image list (default: every file in the folder)")
    p.add_argument("--threshold", type=float, default=0.25)
    p.add_argument("--sweep", nargs=3, type=float, default=None, metavar=("START", "STOP", "STEP"),
                   help="sweep the background threshold, e.g. --sweep 0 0.6 0.01")
    p.add_argument("--ignore-as", type=int, default=None)
    p.add_argument("--out", default=None, help="write the result as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (FsaeError, FileExistsError) as exc:
        print(f"fsae: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
