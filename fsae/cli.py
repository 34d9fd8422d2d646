"""``fsae <stage>``: parse, build the config, call the library, print where results went."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fsae import __version__
from fsae.errors import FsaeError
from fsae.formats import FOREIGN_FORMATS, FORMATS

DESCRIPTION = """\
fsae: weakly-supervised semantic segmentation from image-level labels, with FSAE (Feature- and
Spatial-level Activation Expansion, WACV) as an extra loss on the classification network.

The stages, in order (each writes into a run directory and skips work it finished before):
  data     generate the synthetic set, or prepare / check VOC and COCO
  train    train a base method (cam, ppc, sipe, mctformer), + FSAE when fsae.enabled
  cam      multi-scale + flip CAMs of the trained network -> seeds
  eval     score seeds (threshold sweep) or pseudo-masks against ground truth
  crf      dense CRF on the seeds -> pseudo-masks   (or irn / psa: random-walk pseudo-masks)
  seg      train DeepLab on the pseudo-masks, then predict and score val / test
  report   one HTML page of a run: curves, scores, examples

Start with `fsae demo --out runs/demo`; `fsae <stage> -h` explains each stage's options."""


def _add_set(p: argparse.ArgumentParser, example: str = "fsae.enabled=true") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field of this stage's config, e.g. --set {example} (repeatable)")


def _ids_in(folder, suffix: str) -> list[str]:
    """Ids of ``folder/<id><suffix>`` files, sorted; hidden files (a killed run's ``.<name>.*.tmp`` partial
    writes) are not outputs."""
    return sorted(p.stem for p in Path(folder).glob(f"*{suffix}") if not p.name.startswith("."))


def _shard(text: str | None) -> tuple[int, int]:
    """This process's share of an image list: ``--shard I/N`` and/or torchrun's rank and world size."""
    from fsae.distributed import current_shard, parse_shard

    return current_shard(parse_shard(text))


def _no_force_with_shards(force: bool, shard: tuple[int, int], out) -> None:
    if force and shard[1] > 1:  # each shard would delete the outputs the others had just written
        raise FsaeError(f"--force with --shard: remove {out} first, then start the shards without --force")


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
    if args.kind == "voc" and not args.fast:  # a report beside the problems: IRN's XML labels against fsae's
        from fsae.data.check import format_disagreements, label_disagreements

        report = format_disagreements(label_disagreements(args.root, split=args.split))
        if report:
            print(report)
    return 1 if problems else 0


def cmd_train(args) -> None:
    from fsae.config import check_device, load_config

    cfg = load_config(args.config, args.overrides)  # a bad recipe or --set answers before torch is imported
    from fsae.distributed import env_world, is_main, launch, per_rank_batch, process_group
    from fsae.models.backbones import check_backbone
    from fsae.train import train

    if args.nproc > 1 and env_world()[1] == 1:  # the shortcut: torchrun this same command N times
        per_rank_batch(cfg.train.batch_size, args.nproc)  # fail before spawning
        argv = ["train", args.config, *(["--out", args.out] if args.out else []),
                *(["--device", args.device] if args.device else []), *(["--no-resume"] if args.no_resume else []),
                *(f"--set={o}" for o in args.overrides)]
        launch(args.nproc, argv)
        return
    if args.device:
        cfg.train.device = args.device
    check_device(cfg.train.device, "--device" if args.device else "train.device")
    check_backbone(cfg.model.backbone)
    run_dir = args.stopped_in = Path(args.out) if args.out else Path("runs") / cfg.name
    with process_group(cfg.train.device):
        ckpt = train(cfg, run_dir, resume=not args.no_resume)
        if is_main():
            print(f"trained: {ckpt}\nrun dir: {run_dir}")


def _cam_checkpoint(given: str | None, run_dir: Path | None) -> Path:
    """``--checkpoint best|last|PATH`` of ``fsae cam``: a name picks the run's own checkpoint."""
    from fsae.train import CHECKPOINTS, run_checkpoint

    if given is None or given in CHECKPOINTS:
        if run_dir is None:
            raise FsaeError("fsae cam: pass --checkpoint PATH (or a run directory instead of a config file)")
        return run_checkpoint(run_dir, given or "last")
    return Path(given)


def cmd_cam(args) -> None:
    from fsae.config import check_device, load_config

    config_path, run_dir = _run_paths(args.config)
    cfg = load_config(config_path, args.overrides)
    from fsae.data import build_dataset
    from fsae.distributed import process_device, shard_indices
    from fsae.infer import infer_seeds
    from fsae.protocol import resolve_protocol
    from fsae.stamps import file_digest
    from fsae.train import model_from_checkpoint

    checkpoint = _cam_checkpoint(args.checkpoint, run_dir)
    out = Path(args.out) if args.out else (run_dir / "seeds" if run_dir else Path("seeds"))
    device = process_device(check_device(args.device or cfg.train.device, "--device" if args.device else "train.device"))
    args.stopped_in = out
    model, _ = model_from_checkpoint(checkpoint, cfg, device)
    dataset = build_dataset(cfg.data, args.split or cfg.infer.split)
    shard = _shard(args.shard)
    _no_force_with_shards(args.force, shard, out)
    result = infer_seeds(model, dataset, out, cfg.infer.scales, cfg.infer.flip, cfg.infer.batch_size, device,
                         indices=shard_indices(range(len(dataset)), shard), protocol=resolve_protocol(cfg),
                         source={"checkpoint": file_digest(checkpoint)}, force=args.force,
                         precision=cfg.infer.precision, seed_dtype=args.seed_dtype or cfg.infer.seed_dtype)
    part = f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    print(f"seeds: {result['out']} ({result['written']} written, {result['skipped']} already there{part})")


def _run_protocol(config: str | None, source: Path):
    """The protocol and config of ``--config`` (a run directory or recipe), else of the run directory holding
    ``source`` (``RUN/seeds``), else (None, None)."""
    from fsae.config import load_config
    from fsae.protocol import resolve_protocol

    path = Path(config) if config else source.parent / "config.yaml"
    if path.is_dir():
        path = path / "config.yaml"
    if not config and not path.is_file():
        return None, None
    cfg = load_config(path)
    return resolve_protocol(cfg), cfg


def cmd_eval(args) -> None:
    from fsae.config import check_sweep

    if args.sweep:
        check_sweep(args.sweep, "--sweep")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise FsaeError(f"--threshold {args.threshold} is not allowed; expected a background score in [0, 1]")
    if args.num_classes < 1:
        raise FsaeError(f"--num-classes {args.num_classes} is not allowed; expected an integer >= 1")
    if args.workers < 1 or (args.workers > 1 and args.masks):
        raise FsaeError(f"fsae eval: --workers {args.workers} is not allowed; expected an integer >= 1, "
                        f"with --seeds")
    from fsae.distributed import env_world, is_main, process_group
    from fsae.evaluate import (default_thresholds, evaluate_masks, evaluate_seeds, format_scores_table,
                               save_eval)
    from fsae.formats import seed_suffix
    from fsae.io import read_id_list

    source = Path(args.seeds or args.masks)
    if args.masks and args.format:
        raise FsaeError("fsae eval: --format applies to --seeds, not --masks")
    protocol, cfg = _run_protocol(args.config, source)
    split = args.split or (protocol.eval_split if protocol else None)
    if args.ids:
        ids = read_id_list(args.ids)
    elif split and cfg is not None:  # the protocol's scored ids (VOC train, 1,464), not every seed file
        from fsae.data import build_dataset

        ids = list(build_dataset(cfg.data, split).ids)
    else:
        ids = None
    seed_format = _seed_format(args.format, source, ids) if args.seeds else None
    ids = ids or _ids_in(source, seed_suffix(seed_format) if args.seeds else ".png")
    if args.sweep:
        thresholds, mode = default_thresholds(*args.sweep), args.mode or "sweep"
    elif args.threshold is not None:
        thresholds, mode = [args.threshold], args.mode or "fixed"
    elif protocol is not None:
        mode = args.mode or protocol.eval_mode
        thresholds = protocol.thresholds() if mode == protocol.eval_mode else \
            ([protocol.threshold] if mode in ("fixed", "argmax") else default_thresholds(*protocol.sweep))
    else:
        thresholds, mode = [0.25], args.mode or "fixed"
    rank, world, _ = env_world()
    shard = (rank, world) if world > 1 else None  # under torchrun: each process reads 1/N, confusions summed
    with process_group("cpu"):
        if args.seeds:
            result = evaluate_seeds(source, args.gt, ids, args.num_classes, thresholds, shard=shard,
                                    seed_format=seed_format, mode=mode, workers=args.workers)
            if split:
                result["split"] = split
        else:
            result = evaluate_masks(source, args.gt, ids, args.num_classes, ignore_as=args.ignore_as, shard=shard)
        if is_main():
            print(format_scores_table(result))
            if args.out:
                written = save_eval(args.out, result, scored=source, gt_dir=args.gt, ids=ids,
                                    ignore_as=None if args.seeds else args.ignore_as)
                print(f"written: {written}")


def _seed_format(given: str | None, seed_dir: Path, ids: list[str] | None) -> str:
    """``--format``, or the format of the folder's first seed file (printed when it is not fsae's)."""
    from fsae.formats import detect_format

    if given:
        return given
    seed_format = detect_format(seed_dir, ids)
    if seed_format != "fsae":
        print(f"seed format: {seed_format} (detected; --format sets it)")
    return seed_format


def cmd_convert(args) -> None:
    from fsae.formats import convert_seeds
    from fsae.io import read_id_list

    ids = read_id_list(args.ids) if args.ids else None
    seed_format = _seed_format(args.format, Path(args.seeds), ids)
    if seed_format == "fsae":
        raise FsaeError(f"{args.seeds}: holds fsae seeds (.npz) already; nothing to convert")
    ids = ids or _ids_in(args.seeds, ".npy")
    result = convert_seeds(args.seeds, seed_format, args.out, ids, args.num_classes, force=args.force)
    print(f"seeds: {result['out']} ({result['written']} written from {seed_format} files)")


def _threshold_arg(text: str):
    """``--threshold T|best``: a number, or ``best`` (the run's evaluated best threshold)."""
    if text == "best":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1] or 'best'") from None


def best_threshold(run_dir: str | os.PathLike) -> float:
    """The best background threshold of the run's seed evaluation (``eval/seeds.json``, else the first seed
    evaluation in ``eval/``); FsaeError when the run has none."""
    from fsae.rundir import load_evals, pick_eval

    picked = pick_eval(load_evals(run_dir), "seeds")
    threshold = picked[1]["best"].get("threshold") if picked else None
    if threshold is None:
        raise FsaeError(f"{run_dir}: --threshold best needs a seed evaluation with a threshold in "
                        f"{Path(run_dir) / 'eval'}; run `fsae eval --seeds {Path(run_dir) / 'seeds'} ... "
                        f"--out {Path(run_dir) / 'eval' / 'seeds.json'}` first, or pass --threshold T")
    return float(threshold)


def cmd_crf_threshold(args) -> None:
    """``fsae crf``, with ``--threshold best`` replaced by the run's best evaluated threshold."""
    if args.threshold == "best":
        if not args.run:
            raise FsaeError("fsae crf: --threshold best reads RUN/eval/seeds.json; pass a run directory")
        args.threshold = best_threshold(args.run)
        print(f"threshold {args.threshold:g} (best of {Path(args.run) / 'eval'})")
    return cmd_crf(args)


def cmd_crf(args) -> None:
    from fsae.config import load_config
    from fsae.distributed import shard_indices
    from fsae.io import read_id_list
    from fsae.refine import refine_dir

    from fsae.protocol import resolve_protocol

    if args.workers is not None and args.workers < 1:
        raise FsaeError(f"fsae crf: --workers {args.workers} is not allowed; expected an integer >= 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise FsaeError(f"fsae crf: --threshold {args.threshold} is not allowed; expected a background score in [0, 1]")
    seeds, images, out = args.seeds, args.images, args.out
    protocol, coco_root = None, None
    if args.run:
        run = Path(args.run)
        cfg = load_config(run / "config.yaml")
        protocol = resolve_protocol(cfg, threshold=args.threshold, background=args.background,
                                    bg_power=args.bg_power, crf_iterations=args.iterations)
        seeds = seeds or run / "seeds"
        # COCO keeps images in train2014/ and val2014/ and reads pseudo-masks from <mask_dir>/<split>/
        # (fsae.data.coco): its masks go to <out>/<split>/, each split's images from its own folder.
        coco_root = Path(cfg.data.root) if cfg.data.kind == "coco" else None
        images = images or (coco_root or Path(cfg.data.root) / "JPEGImages")
        out = out or run / "crf"
    threshold = protocol.threshold if protocol else args.threshold
    background = protocol.background if protocol else (args.background or "threshold")
    bg_power = protocol.bg_power if protocol else (args.bg_power or 1.0)
    iterations = protocol.crf_iterations if protocol else args.iterations
    if background == "own":
        raise FsaeError("fsae crf: this method's protocol takes its own background plane, and its pseudo-masks "
                        "come from IRN (`fsae irn`); pass --background threshold or power to run a CRF anyway")
    if threshold is None and background == "threshold":
        raise FsaeError("fsae crf: pass --threshold (or a run directory whose recipe gives eval.threshold)")
    if not (seeds and images and out):
        raise FsaeError("fsae crf: pass a run directory, or --seeds, --images and --out")
    ids = read_id_list(args.ids) if args.ids else _ids_in(seeds, ".npz")
    if not ids:
        raise FsaeError(f"{seeds}: no seed files (<id>.npz) to refine; run `fsae cam` first")
    shard = _shard(args.shard)
    _no_force_with_shards(args.force, shard, out)
    mine = shard_indices(ids, shard)
    part = f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    if not mine:
        print(f"pseudo-masks: nothing to do for shard {shard[0]}/{shard[1]} of {len(ids)} images")
        return
    workers = args.workers
    if workers is None:  # under torchrun the processes of this machine share its cores
        workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    crf_params = {} if iterations is None else {"iterations": int(iterations)}
    if coco_root is None:
        groups = [(images, Path(out), mine)]
    else:
        from fsae.data.coco import ids_by_split

        groups = [(images if args.images else coco_root / split, Path(out) / split, split_ids)
                  for split, split_ids in ids_by_split(coco_root, mine).items()]
    for group_images, group_out, group_ids in groups:
        args.stopped_in = group_out
        result = refine_dir(seeds, group_images, group_out, group_ids,
                            threshold=threshold if threshold is not None else 0.0, workers=workers,
                            background=background, bg_power=bg_power, force=args.force, **crf_params)
        print(f"pseudo-masks: {result['out_dir']} ({result['refined']} refined, {result['skipped']} already "
              f"there{part})")


def _random_walk_inputs(args, load_stage_config):
    """``fsae irn`` / ``fsae psa``: the stage's recipe with ``--set`` and ``--device`` (checked), the image
    folder (default: the run's ``data.root``/JPEGImages; COCO: the split folder holding the seeds' images),
    the ``--ids`` list (None: every seed) and the pseudo-masks' subfolder (COCO: that split, the layout COCO
    segmentation training reads; else none)."""
    from fsae.config import check_device, load_config
    from fsae.io import read_id_list

    cfg = load_stage_config(args.config, args.overrides)
    if args.device:
        cfg.device = args.device
    check_device(cfg.device, "--device" if args.device else "device")
    ids = read_id_list(args.ids) if args.ids else None
    run_config = Path(args.run) / "config.yaml"
    if args.images and not run_config.is_file():  # seeds from elsewhere (`fsae convert`): no recipe to read
        return cfg, args.images, ids, ""
    data = load_config(run_config).data
    if data.kind != "coco":
        return cfg, args.images or Path(data.root) / "JPEGImages", ids, ""
    from fsae.data.coco import single_split

    seed_ids = ids if ids is not None else _ids_in(args.seeds or Path(args.run) / "seeds", ".npz")
    split = single_split(data.root, seed_ids)
    return cfg, args.images or Path(data.root) / split, ids, split


def _counts(r: dict, part: str = "") -> str:
    """One random-walk step's result as ``OUT_DIR (N written, M already there)``."""
    return f"{r['out_dir']} ({r['written']} written, {r['skipped']} already there{part})"


def cmd_irn(args) -> None:
    from fsae.refine.irn import load_irn_config, run_irn

    run = args.stopped_in = Path(args.run)
    cfg, images, ids, mask_subdir = _random_walk_inputs(args, load_irn_config)
    result = run_irn(run, cfg, images, ids=ids, seed_dir=args.seeds, force=args.force, mask_subdir=mask_subdir)
    print(f"ir labels: {_counts(result['ir_labels'])}\nirn checkpoint: {result['checkpoint']}\n"
          f"pseudo-masks: {_counts(result['masks'])}")


def cmd_psa(args) -> None:
    from fsae.refine.psa import load_psa_config, run_psa
    from fsae.refine.psa.pipeline import STEPS

    cfg, images, ids, mask_subdir = _random_walk_inputs(args, load_psa_config)
    shard = _shard(args.shard)
    steps = STEPS if args.step == "all" else (args.step,)
    _no_force_with_shards(args.force, shard, Path(args.run))
    result = run_psa(Path(args.run), cfg, images, ids=ids, seed_dir=args.seeds, steps=steps, shard=shard,
                     mask_subdir=mask_subdir, force=args.force)
    part = f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    if "labels" in result:
        print(f"affinity labels: {_counts(result['labels'], part)}")
    if "train" in result:
        print(f"psa checkpoint: {result['train']}")
    if "masks" in result:
        print(f"pseudo-masks: {_counts(result['masks'], part)}")


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


def cmd_weights(args) -> int:
    from fsae.weights import recipe_weights, report_lines, weights_folder

    lines, ok = report_lines(recipe_weights(args.configs), hash_it=args.weights_cmd == "check")
    print(f"weights folder: {weights_folder()} (FSAE_WEIGHTS)")
    print("\n".join(lines))
    return 0 if ok or args.weights_cmd == "list" else 1


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


CONFIG_KINDS = ("train", "seg", "irn", "psa")


def cmd_config_show(args) -> None:
    import yaml

    config_path, _ = _run_paths(args.config)
    if args.kind == "train":
        from fsae.config import load_config as load
    elif args.kind == "seg":
        from fsae.segment.config import load_seg_config as load
    elif args.kind == "irn":
        from fsae.refine.irn import load_irn_config as load
    else:
        from fsae.refine.psa import load_psa_config as load
    cfg = load(config_path, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def cmd_demo(args) -> None:
    from fsae.demo import run_demo, run_demo_seeds

    if args.seeds:
        run_demo_seeds(args.out, args.seeds, quick=args.quick)
    else:
        run_demo(args.out, seed=args.seed, quick=args.quick)


# ------------------------------------------------------------------ fsae seg: DeepLab on pseudo-masks


def cmd_seg_train(args) -> None:
    from fsae.config import check_device
    from fsae.segment.config import load_seg_config

    cfg = load_seg_config(args.config, args.overrides)
    from fsae.models.backbones import check_backbone
    from fsae.segment.train import train_segmentation

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
    from fsae.segment.config import load_seg_config

    config_path, run_dir = _run_paths(args.config)
    cfg = load_seg_config(config_path, args.overrides)
    from fsae.evaluate import format_scores_table
    from fsae.segment.infer import run_seg_inference
    from fsae.segment.train import seg_model_from_checkpoint
    from fsae.stamps import file_digest

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
    results = run_seg_inference(model, cfg, out, splits=args.split or None, crf=crf, device=device,
                                source={"checkpoint": file_digest(checkpoint)}, force=args.force)
    for split, result in results.items():
        print(f"{split}: {', '.join(result['dirs'])} ({result['written']} written, {result['skipped']} already there)")
        for name, scores in result["eval"].items():
            print(f"[{name}] " + format_scores_table(scores))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsae", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fsae {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate data, train base / +FAE / +FAE+SAE, compare seeds")
    p.add_argument("--out", default="runs/demo", help="output folder: data, runs and the report (default runs/demo)")
    p.add_argument("--seed", type=int, default=None, help="data and training seed (default: $FSAE_DEMO_SEED or 0)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="run the demo once per seed into OUT/seed_N and write OUT/seeds.md (mean and each seed)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="generate, prepare or check data sets").add_subparsers(dest="data_cmd",
                                                                                             required=True)
    p = data.add_parser("synthetic", help="write the generated WSSS data set (VOC layout)")
    p.add_argument("out", help="folder to write (JPEGImages/, SegmentationClass/, cls_labels.json, lists)")
    p.add_argument("--train", type=int, default=800, help="training images (default 800)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--classes", type=int, default=4, help="foreground classes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator (default 0): same seed, same images")
    p.set_defaults(func=cmd_data_synthetic)
    p = data.add_parser("prepare", help="build train_aug / COCO masks and label files")
    p.add_argument("kind", choices=["voc", "coco"], help="data set: voc (VOC2012 + SBD train_aug) or coco (2014)")
    p.add_argument("--root", required=True, help="the data set's folder (VOC2012, or COCO with train2014/ and annotations/)")
    p.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE/dataset folder (voc)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--crowd", choices=["class", "ignore"], default="class",
                   help="coco: draw crowd regions as their class (reference protocol) or as 255")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("check", help="validate a data set; one line per problem")
    p.add_argument("kind", choices=["voc", "coco", "saliency"], help="layout to check")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--split", default=None, help="check only this image list, e.g. train_aug (default: every list)")
    p.add_argument("--saliency", default=None, help="folder of saliency <id>.png maps to check as well")
    p.add_argument("--fast", action="store_true", help="lists, label file and file existence only")
    p.add_argument("--num-classes", type=int, default=None,
                   help="foreground classes C (default: the data set's meta.json, else VOC 20 / COCO 80)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="train a base method (+ FSAE when fsae.enabled)")
    p.add_argument("config", help="a recipe, e.g. configs/synthetic/cam_fsae.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the recipe's train.device)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run directory holds checkpoints/last.pt")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (one per GPU): runs `torchrun --standalone --nproc_per_node N`; "
                        "train.batch_size stays the global batch")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cam", help="multi-scale + flip CAM inference -> seeds/<id>.npz")
    p.add_argument("config", help="a run directory (or a config file with --checkpoint PATH)")
    p.add_argument("--checkpoint", default=None, metavar="best|last|PATH",
                   help="the run's best.pt (best held-out epoch) or last.pt, or a checkpoint file (default: last)")
    p.add_argument("--out", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--seed-dtype", choices=["float16", "uint8"], default=None,
                   help="seed storage: float16, or uint8 per class on the 0.005 threshold grid (error <= 0.0025), smaller files "
                        "(default: infer.seed_dtype)")
    p.add_argument("--split", default=None, help="image list to infer (default: the recipe's infer.split)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the recipe's train.device)")
    p.add_argument("--force", action="store_true", help="delete the seeds already in the output folder and redo them (needed when they were made otherwise)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only images I, I+N, I+2N, ... of the list (split a run over jobs or machines); "
                        "under torchrun each process also takes its share")
    _add_set(p, "infer.scales=[1.0,0.5]")
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("crf", help="dense-CRF refinement of seeds -> pseudo-mask PNGs (all cores, resumable)")
    p.add_argument("run", nargs="?", default=None, help="run directory (seeds/, config.yaml); or give paths")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--out", default=None, help="output folder (default RUN/crf)")
    p.add_argument("--threshold", type=_threshold_arg, default=None, metavar="T|best",
                   help="background score of the unary; best: the best threshold of RUN/eval/seeds.json "
                        "(default: the run's protocol, fsae/protocol.py)")
    p.add_argument("--background", choices=["threshold", "power"], default=None,
                   help="background plane: constant threshold, or (1 - max CAM)^bg_power (PSA/EPS/PPC)")
    p.add_argument("--bg-power", type=float, default=None, help="alpha of the power background (PPC: 8)")
    p.add_argument("--iterations", type=int, default=None, help="mean-field iterations (PPC: 5, PSA: 10)")
    p.add_argument("--ids", default=None, help="image list (default: every seed file)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="delete the pseudo-masks already in the output folder and redo them (needed when they were made otherwise)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only images I, I+N, I+2N, ... of the list (split a run over jobs or machines); "
                        "under torchrun each process also takes its share")
    p.set_defaults(func=cmd_crf_threshold)

    p = sub.add_parser("irn", help="IRN: seeds -> IR labels -> boundary network -> random-walk pseudo-masks")
    p.add_argument("run", help="run directory: reads seeds/, writes ir_labels/, irn/irn.pt, irn_masks/")
    p.add_argument("--config", default=None, help="IRN recipe, e.g. configs/voc/irn.yaml (default: IRN's defaults)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--ids", default=None, help="image list (default: every seed file)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the IRN recipe's device)")
    p.add_argument("--force", action="store_true", help="delete ir_labels/, irn/ and irn_masks/ outputs and redo them (needed when they were made otherwise)")
    _add_set(p, "train.epochs=1")
    p.set_defaults(func=cmd_irn)

    p = sub.add_parser("psa", help="PSA: seeds -> affinity labels -> AffinityNet -> random-walk pseudo-masks")
    p.add_argument("run", help="run directory: reads seeds/, writes aff_labels/, psa/psa.pt, psa_masks/")
    p.add_argument("--config", default=None, help="PSA recipe, e.g. configs/voc/psa.yaml (default: PSA's defaults)")
    p.add_argument("--images", default=None, help="folder of <id>.jpg images (default: the run's data root)")
    p.add_argument("--seeds", default=None, help="seed folder (default RUN/seeds)")
    p.add_argument("--ids", default=None, help="image list (default: every seed file)")
    p.add_argument("--step", choices=["all", "labels", "train", "masks"], default="all",
                   help="run one step only (default: all three in turn)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="labels / masks steps: only images I, I+N, I+2N, ... of the list (training takes all)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the PSA recipe's device)")
    p.add_argument("--force", action="store_true",
                   help="delete the outputs of the steps run (aff_labels/, psa/, psa_masks/) and redo them (needed "
                        "when they were made otherwise)")
    _add_set(p, "train.epochs=1")
    p.set_defaults(func=cmd_psa)

    p = sub.add_parser("eval", help="evaluate seeds (threshold sweep) or pseudo-masks against GT "
                                    "(under torchrun: images split over the processes, confusions summed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seeds", help="folder of <id>.npz seeds")
    src.add_argument("--masks", help="folder of <id>.png pseudo-masks")
    p.add_argument("--gt", required=True, help="folder of GT <id>.png masks")
    p.add_argument("--num-classes", type=int, required=True, help="foreground classes C")
    p.add_argument("--ids", default=None, help="image list (default: every file in the folder)")
    p.add_argument("--config", default=None, help="run directory or recipe whose protocol (fsae/protocol.py) "
                   "decides threshold / sweep / mode / scored split (default: the run directory holding --seeds)")
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
    p.add_argument("--force", action="store_true",
                   help="delete the seeds in --out first (needed when they were converted from other files)")
    p.set_defaults(func=cmd_convert)

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
                   help="also make and evaluate pseudo-masks: dense CRF at each run's best threshold, or IRN")
    p.add_argument("--irn-config", default=None, help="IRN recipe for --masks irn, e.g. configs/synthetic/irn.yaml")
    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--devices", default=None, metavar="D1,D2",
                      help="one job per device side by side, e.g. cuda:0,cuda:1 (default: train.device, one at a time)")
    jobs.add_argument("--nproc", type=int, default=1, help="train each job with N processes (fsae train --nproc)")
    p.add_argument("--only", default=None, metavar="SETTING/seed=S",
                   help="run just this run of the grid here, e.g. tau_fae=0.9/seed=1 (what each job runs), no table")
    _add_set(p)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("predict", help="a checkpoint on any image: CAM per class, seed (and CRF mask) as a PNG figure")
    p.add_argument("model", help="a run directory (uses its eval/seeds.json threshold) or a checkpoint file")
    p.add_argument("images", nargs="+", help="image files, any size, JPEG or PNG")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--labels", default=None, metavar="NAME,NAME",
                         help="the classes in the images, by name (default: the classifier's own predictions)")
    classes.add_argument("--top-k", type=int, default=None, help="take the classifier's K most probable classes")
    p.add_argument("--min-prob", type=float, default=0.5,
                   help="without --labels / --top-k: classes with a sigmoid probability at least this")
    p.add_argument("--crf", action="store_true", help="also the dense-CRF mask at the threshold")
    p.add_argument("--threshold", type=float, default=None,
                   help="background threshold of the seed (default: the run's best, else eval.threshold)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=cmd_predict)

    config = sub.add_parser("config", help="look at a recipe").add_subparsers(dest="config_cmd", required=True)
    p = config.add_parser("show", help="print the resolved config (defaults, then the recipe, then --set) as YAML")
    p.add_argument("config", help="a recipe YAML or a run directory (its config.yaml)")
    p.add_argument("--kind", choices=CONFIG_KINDS, default="train",
                   help="which stage's config the file is: train (fsae train / cam), seg, irn or psa (default train)")
    _add_set(p)
    p.set_defaults(func=cmd_config_show)

    seg = sub.add_parser("seg", help="DeepLab V1/V2 on pseudo-masks: train, infer").add_subparsers(
        dest="seg_cmd", required=True)
    p = seg.add_parser("train", help="train DeepLab on pseudo-masks (poly LR, resumable)")
    p.add_argument("config", help="a recipe, e.g. configs/voc/deeplabv2_r101.yaml")
    p.add_argument("--masks", default=None, help="pseudo-mask folder (sets data.mask_dir)")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the recipe's train.device)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch even when the run directory holds checkpoints/last.pt")
    _add_set(p, "train.iterations=100")
    p.set_defaults(func=cmd_seg_train)
    p = seg.add_parser("infer", help="multi-scale + flip (+ CRF) masks for val (evaluated) and test (VOC server layout)")
    p.add_argument("config", help="a run directory (or a config file with --checkpoint and --out)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint file (default RUN/checkpoints/last.pt)")
    p.add_argument("--out", default=None, help="output root (default: the run directory)")
    p.add_argument("--split", action="append", default=[], help="split(s) to predict (default: data.val_split "
                   "and data.test_split)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    p.add_argument("--force", action="store_true", help="delete the masks already in the output folders and redo them (needed when they were made otherwise)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the recipe's train.device)")
    _add_set(p, "infer.scales=[1.0]")
    p.set_defaults(func=cmd_seg_infer)

    weights = sub.add_parser("weights", help="the pretrained files of every recipe: where, present, intact"
                             ).add_subparsers(dest="weights_cmd", required=True)
    for name, text in (("list", "each recipe's weight files and where they are looked for"),
                       ("check", "as list, with the sha256 of each present file checked; exit 1 if one is missing")):
        p = weights.add_parser(name, help=text)
        p.add_argument("--configs", default="configs", help="folder of recipe YAMLs (default configs/)")
        p.set_defaults(func=cmd_weights)
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
