"""``fsae <stage>``: parse, build the config, call the library, print where results went."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fsae import __version__
from fsae.errors import FsaeError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set fsae.enabled=true (repeatable)")


def _ids_in(folder, suffix: str) -> list[str]:
    """Ids of ``folder/<id><suffix>`` files, sorted; hidden files (a killed run's ``.<name>.*.tmp`` partial
    writes) are not outputs."""
    return sorted(p.stem for p in Path(folder).glob(f"*{suffix}") if not p.name.startswith("."))


def _shard(text: str | None) -> tuple[int, int]:
    """This process's share of an image list: ``--shard I/N`` and/or torchrun's rank and world size."""
    from fsae.distributed import current_shard, parse_shard

    return current_shard(parse_shard(text))


def _run_paths(target: str):
    """A run directory or a config file -> (config path, run dir or None)."""
    path = Path(target)
    if path.is_dir():
        return path / "config.yaml", path
    return path, None


def _check_synthetic(spec) -> None:
    """Sizes the generator can draw: objects (ellipses of semi-axes up to ``body_axes[1]``, centred at least
    0.6 of a semi-axis inside the border) must fit in the image."""
    smallest = math.ceil(1.2 * spec.body_axes[1])
    for flag, value, low in (("--train", spec.num_train, 1), ("--val", spec.num_val, 0),
                             ("--classes", spec.num_classes, 1), ("--size", spec.image_size, smallest)):
        if value < low:
            why = f" (objects have semi-axes up to {spec.body_axes[1]:g} px)" if flag == "--size" else ""
            raise FsaeError(f"fsae data synthetic: {flag} {value} is not allowed; expected an integer >= {low}{why}")


def cmd_data_synthetic(args) -> None:
    from fsae.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(num_train=args.train, num_val=args.val, image_size=args.size,
                         num_classes=args.classes, seed=args.seed)
    _check_synthetic(spec)
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

    problems = check_dataset(args.kind, args.root, split=args.split, saliency=args.saliency, fast=args.fast,
                             num_classes=args.num_classes)
    print(format_problems(problems))
    return 1 if problems else 0


def cmd_train(args) -> None:
    from fsae.config import check_backbone, check_device, load_config
    from fsae.distributed import env_world, is_main, launch, per_rank_batch, process_group
    from fsae.train import train

    if args.nproc > 1 and env_world()[1] == 1:  # the shortcut: torchrun this same command N times
        per_rank_batch(load_config(args.config, args.overrides).train.batch_size, args.nproc)  # fail before spawning
        argv = ["train", args.config, *(["--out", args.out] if args.out else []),
                *(["--device", args.device] if args.device else []), *(["--no-resume"] if args.no_resume else []),
                *(f"--set={o}" for o in args.overrides)]
        launch(args.nproc, argv)
        return
    cfg = load_config(args.config, args.overrides)
    if args.device:
        cfg.train.device = args.device
    check_device(cfg.train.device, "--device" if args.device else "train.device")
    check_backbone(cfg.model.backbone)
    run_dir = args.stopped_in = Path(args.out) if args.out else Path("runs") / cfg.name
    with process_group(cfg.train.device):
        ckpt = train(cfg, run_dir, resume=not args.no_resume)
        if is_main():
            print(f"trained: {ckpt}\nrun dir: {run_dir}")


def cmd_cam(args) -> None:
    from fsae.config import check_device, load_config
    from fsae.data import build_dataset
    from fsae.distributed import process_device, shard_indices
    from fsae.infer import infer_seeds
    from fsae.train import model_from_checkpoint

    config_path, run_dir = _run_paths(args.config)
    cfg = load_config(config_path, args.overrides)
    checkpoint = args.checkpoint or (run_dir / "checkpoints" / "last.pt" if run_dir else None)
    if checkpoint is None:
        raise FsaeError("fsae cam: pass --checkpoint (or a run directory instead of a config file)")
    out = Path(args.out) if args.out else (run_dir / "seeds" if run_dir else Path("seeds"))
    device = process_device(check_device(args.device or cfg.train.device, "--device" if args.device else "train.device"))
    args.stopped_in = out
    model, _ = model_from_checkpoint(checkpoint, cfg, device)
    dataset = build_dataset(cfg.data, args.split or cfg.infer.split)
    shard = _shard(args.shard)
    result = infer_seeds(model, dataset, out, cfg.infer.scales, cfg.infer.flip, cfg.infer.batch_size, device,
                         indices=shard_indices(range(len(dataset)), shard))
    part = f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    print(f"seeds: {result['out']} ({result['written']} written, {result['skipped']} already there{part})")


def cmd_eval(args) -> None:
    from fsae.evaluate import (default_thresholds, evaluate_masks, evaluate_seeds, format_scores_table,
                               save_eval)
    from fsae.config import check_sweep
    from fsae.distributed import env_world, is_main, process_group
    from fsae.io import read_id_list

    if args.sweep:
        check_sweep(args.sweep, "--sweep")
    if not 0 <= args.threshold <= 1:
        raise FsaeError(f"--threshold {args.threshold} is not allowed; expected a background score in [0, 1]")
    if args.num_classes < 1:
        raise FsaeError(f"--num-classes {args.num_classes} is not allowed; expected an integer >= 1")
    source = Path(args.seeds or args.masks)
    suffix = ".npz" if args.seeds else ".png"
    ids = read_id_list(args.ids) if args.ids else _ids_in(source, suffix)
    rank, world, _ = env_world()
    shard = (rank, world) if world > 1 else None  # under torchrun: each process reads 1/N, confusions summed
    with process_group("cpu"):
        if args.seeds:
            thresholds = default_thresholds(*args.sweep) if args.sweep else [args.threshold]
            result = evaluate_seeds(source, args.gt, ids, args.num_classes, thresholds, shard=shard)
        else:
            result = evaluate_masks(source, args.gt, ids, args.num_classes, ignore_as=args.ignore_as, shard=shard)
        if is_main():
            print(format_scores_table(result))
            if args.out:
                print(f"written: {save_eval(args.out, result)}")


def cmd_crf(args) -> None:
    from fsae.config import load_config
    from fsae.distributed import shard_indices
    from fsae.io import read_id_list
    from fsae.refine import refine_dir

    if args.workers is not None and args.workers < 1:
        raise FsaeError(f"fsae crf: --workers {args.workers} is not allowed; expected an integer >= 1")
    if not 0 <= args.threshold <= 1:
        raise FsaeError(f"fsae crf: --threshold {args.threshold} is not allowed; expected a background score in [0, 1]")
    seeds, images, out = args.seeds, args.images, args.out
    if args.run:
        run = Path(args.run)
        cfg = load_config(run / "config.yaml")
        seeds = seeds or run / "seeds"
        images = images or Path(cfg.data.root) / "JPEGImages"
        out = out or run / "crf"
    if not (seeds and images and out):
        raise FsaeError("fsae crf: pass a run directory, or --seeds, --images and --out")
    ids = read_id_list(args.ids) if args.ids else _ids_in(seeds, ".npz")
    if not ids:
        raise FsaeError(f"{seeds}: no seed files (<id>.npz) to refine; run `fsae cam` first")
    shard = _shard(args.shard)
    mine = shard_indices(ids, shard)
    part = f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    if not mine:
        print(f"pseudo-masks: nothing to do for shard {shard[0]}/{shard[1]} of {len(ids)} images")
        return
    workers = args.workers
    if workers is None:  # under torchrun the processes of this machine share its cores
        workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    args.stopped_in = out
    result = refine_dir(seeds, images, out, mine, threshold=args.threshold, workers=workers)
    print(f"pseudo-masks: {result['out_dir']} ({result['refined']} refined, {result['skipped']} already there{part})")


def cmd_irn(args) -> None:
    from fsae.config import check_device, load_config
    from fsae.io import read_id_list
    from fsae.refine.irn import load_irn_config, run_irn

    run = args.stopped_in = Path(args.run)
    cfg = load_irn_config(args.config, args.overrides)
    if args.device:
        cfg.device = args.device
    check_device(cfg.device, "--device" if args.device else "device")
    images = args.images or Path(load_config(run / "config.yaml").data.root) / "JPEGImages"
    ids = read_id_list(args.ids) if args.ids else None
    result = run_irn(run, cfg, images, ids=ids, seed_dir=args.seeds)
    labels, masks = result["ir_labels"], result["masks"]
    print(f"ir labels: {labels['out_dir']} ({labels['written']} written, {labels['skipped']} already there)\n"
          f"irn checkpoint: {result['checkpoint']}\n"
          f"pseudo-masks: {masks['out_dir']} ({masks['written']} written, {masks['skipped']} already there)")


def cmd_report(args) -> None:
    from fsae.report import write_report

    path = write_report(args.run, out=args.out, num_images=args.images, embed=args.embed,
                        compute=not args.no_compute, progress=True)
    print(f"report: {path.resolve().as_uri()}")


def cmd_compare(args) -> None:
    from fsae.compare import compare_markdown, compare_runs
    from fsae.io import write_json, write_text

    summaries = compare_runs(args.runs, compute=not args.no_compute, progress=True)
    text = compare_markdown(summaries)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        written = write_json(out, summaries) if out.suffix == ".json" else write_text(out, text)
        print(f"written: {written}")


def cmd_demo(args) -> None:
    from fsae.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick)


# ------------------------------------------------------------------ fsae seg: DeepLab on pseudo-masks


def cmd_seg_train(args) -> None:
    from fsae.config import check_backbone, check_device
    from fsae.segment.config import load_seg_config
    from fsae.segment.train import train_segmentation

    cfg = load_seg_config(args.config, args.overrides)
    if args.masks:
        cfg.data.mask_dir = str(Path(args.masks).resolve())
    if args.device:
        cfg.train.device = args.device
    check_device(cfg.train.device, "--device" if args.device else "train.device")
    check_backbone(cfg.model.backbone)
    run_dir = args.stopped_in = Path(args.out) if args.out else Path("runs") / cfg.name
    ckpt = train_segmentation(cfg, run_dir, resume=not args.no_resume)
    print(f"trained: {ckpt}\nrun dir: {run_dir}")


def cmd_seg_infer(args) -> None:
    from fsae.config import check_device
    from fsae.evaluate import format_scores_table
    from fsae.segment.config import load_seg_config
    from fsae.segment.infer import run_seg_inference
    from fsae.segment.train import seg_model_from_checkpoint

    config_path, run_dir = _run_paths(args.config)
    cfg = load_seg_config(config_path, args.overrides)
    checkpoint = args.checkpoint or (run_dir / "checkpoints" / "last.pt" if run_dir else None)
    if checkpoint is None:
        raise FsaeError("fsae seg infer: pass --checkpoint (or a run directory instead of a config file)")
    out = Path(args.out) if args.out else run_dir
    if out is None:
        raise FsaeError("fsae seg infer: pass --out (or a run directory instead of a config file)")
    device = check_device(args.device or cfg.train.device, "--device" if args.device else "train.device")
    args.stopped_in = out
    model, _ = seg_model_from_checkpoint(checkpoint, cfg.data.num_classes, device)
    crf = False if args.no_crf else None
    results = run_seg_inference(model, cfg, out, splits=args.split or None, crf=crf, device=device)
    for split, result in results.items():
        print(f"{split}: {', '.join(result['dirs'])} ({result['written']} written, {result['skipped']} already there)")
        for name, scores in result["eval"].items():
            print(f"[{name}] " + format_scores_table(scores))


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
    p.add_argument("--num-classes", type=int, default=None,
                   help="foreground classes C (default: the data set's meta.json, else VOC 20 / COCO 80)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="train a base method (+ FSAE when fsae.enabled)")
    p.add_argument("config")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (one per GPU): runs `torchrun --standalone --nproc_per_node N`; "
                        "train.batch_size stays the global batch")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cam", help="multi-scale + flip CAM inference -> seeds/<id>.npz")
    p.add_argument("config", help="a config file or a run directory")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only images I, I+N, I+2N, ... of the list (split a run over jobs or machines); "
                        "under torchrun each process also takes its share")
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
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only images I, I+N, I+2N, ... of the list (split a run over jobs or machines); "
                        "under torchrun each process also takes its share")
    p.set_defaults(func=cmd_crf)

    p = sub.add_parser("irn", help="IRN: seeds -> IR labels -> boundary network -> random-walk pseudo-masks")
    p.add_argument("run", help="run directory: reads seeds/, writes ir_labels/, irn/irn.pt, irn_masks/")
    p.add_argument("--config", default=None, help="IRN recipe, e.g. configs/voc/irn.yaml (default: IRN's defaults)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--ids", default=None, help="image list (default: every seed file)")
    p.add_argument("--device", default=None)
    _add_set(p)
    p.set_defaults(func=cmd_irn)

    p = sub.add_parser("eval", help="evaluate seeds (threshold sweep) or pseudo-masks against GT "
                                    "(under torchrun: images split over the processes, confusions summed)")
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

    seg = sub.add_parser("seg", help="DeepLab V1/V2 on pseudo-masks: train, infer").add_subparsers(
        dest="seg_cmd", required=True)
    p = seg.add_parser("train", help="train DeepLab on pseudo-masks (poly LR, resumable)")
    p.add_argument("config", help="a recipe, e.g. configs/voc/deeplabv2_r101.yaml")
    p.add_argument("--masks", default=None, help="pseudo-mask folder (sets data.mask_dir)")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_seg_train)
    p = seg.add_parser("infer", help="multi-scale + flip (+ CRF) masks for val (evaluated) and test (VOC server layout)")
    p.add_argument("config", help="a run directory (or a config file with --checkpoint and --out)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None, help="output root (default: the run directory)")
    p.add_argument("--split", action="append", default=[], help="split(s) to predict (default: data.val_split "
                   "and data.test_split)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    p.add_argument("--device", default=None)
    _add_set(p)
    p.set_defaults(func=cmd_seg_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (FsaeError, FileExistsError) as exc:
        print(f"fsae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfsae: interrupted: {_interrupted(args, argv)}", file=sys.stderr)
        return 130
    return int(code or 0)


def _interrupted(args, argv: list[str] | None) -> str:
    """Where a Ctrl-C stopped and how to go on: finished files and checkpoints are whole (atomic writes)."""
    command = " ".join(["fsae", *(sys.argv[1:] if argv is None else argv)])
    where = getattr(args, "stopped_in", None)
    kept = f"finished outputs in {where} are kept" if where else "finished outputs are kept"
    return f"{kept}; rerun `{command}` to resume"


if __name__ == "__main__":
    sys.exit(main())
