"""One function per stage: the rules of running it, shared by ``fsae <stage>``, ``fsae grid`` and ``fsae predict``.

Each ``*_stage`` function takes a run directory and resolved settings (plus the explicit paths the CLI
allows), decides everything the stage needs (checkpoint, protocol, threshold and where it came from, the
ids, the COCO split folders, the number of workers, resume / ``force``) and calls the library function
that does the work (``train``, ``infer_seeds``, ``evaluate_seeds``, ``refine_dir``, ``run_irn``, ``run_psa``,
``train_segmentation``, ``run_seg_inference``). It returns a dict of what it wrote and the numbers a caller
prints; it prints nothing itself. The rules written once here:

- ``seed_threshold``: the background threshold of the CRF / ``fsae predict`` / the grid's CRF;
- ``mask_groups``: which images and which subfolder each group of pseudo-masks has (COCO: per split);
- ``worker_count``: processes of a per-image pool;
- the ids a folder holds: ``fsae.io.ids_in``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from fsae.config import Config, EvalConfig, load_config
from fsae.errors import ConfigError, FsaeError
from fsae.io import ids_in, read_id_list
from fsae.settings import check_device, check_sweep, check_value

_THRESHOLD_FIELD = {f.name: f for f in dataclasses.fields(EvalConfig)}["threshold"]


# ------------------------------------------------------------------------------------------ shared rules


def worker_count(given: int | None = None, name: str = "--workers") -> int:
    """Processes of a per-image pool: ``given`` (>= 1), else this machine's cores shared by the torchrun
    processes on it (``LOCAL_WORLD_SIZE``)."""
    if given is None:
        return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if given < 1:
        raise ConfigError(f"{name} {given} is not allowed; expected an integer >= 1")
    return int(given)


def shard_of(text: str | tuple[int, int] | None, force: bool = False, out=None) -> tuple[int, int]:
    """This process's share of an image list: ``"I/N"`` (or ``(I, N)``) and/or torchrun's rank and world
    size. ``force`` with several shards is refused (each would delete the others' outputs)."""
    from fsae.distributed import current_shard, parse_shard

    shard = current_shard(parse_shard(text) if isinstance(text, str) or text is None else tuple(text))
    if force and shard[1] > 1:
        raise FsaeError(f"--force with --shard: remove {out} first, then start the shards without --force")
    return shard


def run_config(run_dir: str | os.PathLike | None) -> Config | None:
    """A run directory's ``config.yaml``, or None (no run, or a folder without one)."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    return load_config(Path(run_dir) / "config.yaml")


def best_threshold(run_dir: str | os.PathLike) -> float | None:
    """The best background threshold of the run's seed evaluation (``eval/seeds.json``, else the first seed
    evaluation in ``eval/``); None when the run has none."""
    from fsae.rundir import load_evals, pick_eval

    if not (Path(run_dir) / "eval").is_dir():
        return None
    picked = pick_eval(load_evals(run_dir), "seeds")
    threshold = picked[1]["best"].get("threshold") if picked else None
    return None if threshold is None else float(threshold)


def check_threshold(value, name: str = "--threshold") -> float:
    """A background threshold given on the command line, checked by ``eval.threshold``'s own rule."""
    try:
        return check_value(value, _THRESHOLD_FIELD, name)
    except ConfigError:
        raise ConfigError(f"{name} {value} is not allowed; expected a background score in [0, 1]") from None


def seed_threshold(run_dir: str | os.PathLike | None, cfg: Config | None,
                   given: float | str | None = None) -> tuple[float | None, str]:
    """THE background threshold of a run's seeds for the CRF, ``fsae predict`` and the grid, and where it
    came from (a phrase to print):

    - a number ``given`` (checked like ``eval.threshold``): ``"--threshold"``;
    - ``"best"``: the best threshold of ``RUN/eval/seeds.json`` (picked by the protocol's ``eval.mode``), only
      when asked for: it is tuned on ground-truth pixels; without a seed evaluation it is an error;
    - None: the protocol's threshold (``fsae.protocol.resolve_protocol``: the recipe's ``eval.threshold``, else
      the method's, e.g. PPC's 0.22 as its authors' script); (None, ...) without a config.
    """
    if given is not None and given != "best":
        return check_threshold(given), "--threshold"
    if given == "best":
        best = best_threshold(run_dir) if run_dir is not None else None
        if best is not None:
            return best, f"best of {Path(run_dir) / 'eval' / 'seeds.json'}"
        where = Path(run_dir) if run_dir is not None else Path("RUN")
        raise FsaeError(f"{where}: --threshold best needs a seed evaluation with a threshold in {where / 'eval'}; "
                        f"run `fsae eval --seeds {where / 'seeds'} ... --out {where / 'eval' / 'seeds.json'}` "
                        f"first, or pass --threshold T")
    if cfg is None:
        return None, "none given"
    from fsae.protocol import resolve_protocol

    which = "eval.threshold" if cfg.eval.threshold is not None else "fsae/protocol.py"
    return resolve_protocol(cfg).threshold, f"protocol of {cfg.model.method} ({which})"


def mask_groups(data, ids: Sequence[str], images: str | os.PathLike | None = None,
                one_split: bool = False) -> list[tuple[str, Path, list[str]]]:
    """Where each image's pseudo-mask goes: ``[(subfolder, image folder, ids)]``. VOC-like sets: one group,
    no subfolder, images in ``images`` (default ``data.root/JPEGImages``). COCO: one group per split folder
    holding the images (``train2014`` / ``val2014``, the layout COCO segmentation training reads), images from
    that folder unless ``images`` is given. ``one_split``: a random walk trains on one split; several are an
    error (``fsae.data.coco.single_split``)."""
    if data.kind != "coco":
        return [("", Path(images) if images else Path(data.root) / "JPEGImages", list(ids))]
    from fsae.data.coco import ids_by_split, single_split

    if one_split:
        split = single_split(data.root, ids)
        return [(split, Path(images) if images else Path(data.root) / split, list(ids))]
    return [(split, Path(images) if images else Path(data.root) / split, group)
            for split, group in ids_by_split(data.root, ids).items()]


def _device(given: str | None, recipe: str, field: str = "train.device") -> str:
    return check_device(given or recipe, "--device" if given else field)


def irn_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()):
    """An IRN recipe (``configs/*/irn.yaml``; None: IRN's defaults) with ``--set`` overrides: ``irn_stage``'s
    settings."""
    from fsae.refine.irn import load_irn_config

    return load_irn_config(path, list(overrides))


# ------------------------------------------------------------------------------------------ train, cam


def train_stage(cfg: Config, run_dir: str | os.PathLike, resume: bool = True, progress: bool = True,
                device: str | None = None) -> dict[str, Any]:
    """``fsae train`` in this process: ``{"checkpoint", "run_dir"}``."""
    from fsae.distributed import process_group
    from fsae.models.backbones import check_backbone
    from fsae.train import train

    if device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    check_device(cfg.train.device, "--device" if device else "train.device")
    check_backbone(cfg.model.backbone)
    with process_group(cfg.train.device):
        checkpoint = train(cfg, run_dir, resume=resume, progress=progress)
    return {"checkpoint": checkpoint, "run_dir": Path(run_dir)}


def cam_checkpoint(run_dir: str | os.PathLike | None, given: str | os.PathLike | None = None) -> Path:
    """``best`` / ``last`` (default) of the run, or a checkpoint file."""
    from fsae.train import CHECKPOINTS, run_checkpoint

    if given is None or given in CHECKPOINTS:
        if run_dir is None:
            raise FsaeError("fsae cam: pass --checkpoint PATH (or a run directory instead of a config file)")
        return run_checkpoint(run_dir, given or "last")
    return Path(given)


def cam_stage(run_dir: str | os.PathLike | None, cfg: Config, checkpoint: str | os.PathLike | None = None,
              split: str | None = None, out: str | os.PathLike | None = None, device: str | None = None,
              shard: str | tuple[int, int] | None = None, force: bool = False, seed_dtype: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """``fsae cam``: seeds of ``split`` (default ``infer.split``) into ``out`` (default ``RUN/seeds``):
    ``{"out", "written", "skipped", "shard"}``."""
    from fsae.data import build_dataset
    from fsae.distributed import process_device, shard_indices
    from fsae.stamps import file_digest
    from fsae.train import model_from_checkpoint

    ckpt = cam_checkpoint(run_dir, checkpoint)
    out = Path(out) if out else (Path(run_dir) / "seeds" if run_dir else Path("seeds"))
    device = process_device(_device(device, cfg.train.device))
    model, _ = model_from_checkpoint(ckpt, cfg, device)
    dataset = build_dataset(cfg.data, split or cfg.infer.split)
    mine = shard_of(shard, force, out)
    result = dataset_seeds(model, cfg, dataset, out, device, indices=shard_indices(range(len(dataset)), mine),
                           source={"checkpoint": file_digest(ckpt)}, force=force, seed_dtype=seed_dtype,
                           progress=progress)
    return {**result, "out": Path(result["out"]), "shard": mine}


def dataset_seeds(model, cfg: Config, dataset, out, device: str, indices=None, source: dict | None = None,
                  force: bool = False, seed_dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Seeds of ``dataset`` (anything with ``ids`` and ``{"id", "image", "label"}`` samples) by the run's
    recipe and protocol: what ``fsae cam`` writes, also for ``fsae predict``'s own images."""
    from fsae.infer import infer_seeds
    from fsae.protocol import resolve_protocol

    return infer_seeds(model, dataset, out, cfg.infer.scales, cfg.infer.flip, cfg.infer.batch_size, device,
                       progress=progress, indices=indices, protocol=resolve_protocol(cfg), source=source,
                       force=force, precision=cfg.infer.precision, seed_dtype=seed_dtype or cfg.infer.seed_dtype)


def image_probabilities(model, image, device: str):
    """Sigmoid of the image-level logits of one whole image. Shape: (H, W, 3) uint8 -> (C,) float32."""
    import torch

    from fsae.augment import normalize
    from fsae.infer import to_tensor_image

    with torch.no_grad():
        x = normalize(to_tensor_image(image)[None]).to(device)
        return torch.sigmoid(model(x).logits[0]).float().cpu().numpy()


def seed_masks(image, keys, cams, threshold: float, background=None, crf: bool = False, cfg: Config | None = None):
    """One seed as a label-space mask at ``threshold`` (and its dense-CRF mask, or None), as ``fsae eval`` and
    ``fsae crf`` make them: the CRF's background form, power and iterations are the protocol of ``cfg``
    (a plain threshold plane for a protocol with the seed's own background). Shape: image (H, W, 3), keys (K,),
    cams (K, H, W), background (H, W) or None -> (H, W) uint8 each."""
    from fsae.evaluate import seed_to_mask
    from fsae.refine.crf import refine_seed

    seed = seed_to_mask(keys, cams, threshold, background)
    if not crf:
        return seed, None
    form: dict[str, Any] = {}
    if cfg is not None:
        from fsae.protocol import resolve_protocol

        p = resolve_protocol(cfg)
        if p.background in ("threshold", "power"):
            form = {"background": p.background, "bg_power": p.bg_power}
        if p.crf_iterations is not None:
            form["iterations"] = int(p.crf_iterations)
    return seed, refine_seed(image, keys, cams, threshold, **form)


# ------------------------------------------------------------------------------------------ eval


def eval_config(config: str | os.PathLike | Config | None, source: str | os.PathLike) -> Config | None:
    """The config whose protocol scores ``source``: ``config`` (a Config, run directory or recipe), else the
    run directory holding ``source`` (``RUN/seeds``), else None."""
    if isinstance(config, Config):
        return config
    path = Path(config) if config else Path(source).parent / "config.yaml"
    if path.is_dir():
        path = path / "config.yaml"
    if not config and not path.is_file():
        return None
    return load_config(path)


def _scored_ids(cfg: Config | None, ids, split: str | None) -> tuple[list[str] | None, str | None]:
    """``ids`` (a list or a list file), else the ids of ``split`` (default: the protocol's ``eval_split``) of the
    run's data set, else None (every file of the folder)."""
    from fsae.protocol import resolve_protocol

    split = split or (resolve_protocol(cfg).eval_split if cfg is not None else None)
    if ids is not None:
        return (read_id_list(ids) if isinstance(ids, (str, os.PathLike)) else list(ids)), split
    if split and cfg is not None:  # the protocol's scored ids (VOC train, 1,464), not every seed file
        from fsae.data import build_dataset

        return list(build_dataset(cfg.data, split).ids), split
    return None, split


def _gt_and_classes(cfg: Config | None, split: str | None, gt, num_classes):
    """``gt`` / ``num_classes``, defaulting to the run's data set (the GT folder of ``split``)."""
    if gt is None and cfg is not None:
        from fsae.data import build_dataset

        gt = build_dataset(cfg.data, split or cfg.infer.split).mask_dir
        if gt is None:
            raise ConfigError(f"{cfg.data.root}: no ground-truth mask folder (data.mask_dir) to evaluate against")
    if num_classes is None and cfg is not None:
        num_classes = cfg.data.num_classes
    if gt is None or num_classes is None:
        raise FsaeError("fsae eval: pass --gt and --num-classes (or a run directory with --config)")
    if num_classes < 1:
        raise FsaeError(f"--num-classes {num_classes} is not allowed; expected an integer >= 1")
    return Path(gt), int(num_classes)


def seed_thresholds(cfg: Config | None, threshold=None, sweep=None, mode=None) -> tuple[list[float], str]:
    """The thresholds a seed evaluation scores and how it reports one: ``sweep``, else ``threshold``, else the
    protocol's (``mode`` may change how), else 0.25 fixed."""
    from fsae.evaluate import default_thresholds
    from fsae.protocol import resolve_protocol

    if sweep:
        check_sweep(sweep, "--sweep")
        return default_thresholds(*sweep), mode or "sweep"
    if threshold is not None:
        return [check_threshold(threshold)], mode or "fixed"
    if cfg is None:
        return [0.25], mode or "fixed"
    protocol = resolve_protocol(cfg)
    mode = mode or protocol.eval_mode
    if mode == protocol.eval_mode:
        return protocol.thresholds(), mode
    return ([protocol.threshold] if mode in ("fixed", "argmax") else default_thresholds(*protocol.sweep)), mode


def detect_seed_format(given: str | None, seed_dir, ids) -> tuple[str, bool]:
    """``given``, or the format of the folder's first seed file; (format, detected)."""
    from fsae.formats import detect_format

    return (given, False) if given else (detect_format(seed_dir, ids), True)


def eval_seeds_stage(seeds, gt=None, num_classes: int | None = None, cfg=None, ids=None, split: str | None = None,
                     threshold: float | None = None, sweep=None, mode: str | None = None, out=None, workers: int = 1,
                     seed_format: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``fsae eval --seeds``: the result dict (``evaluate_seeds``) with ``"written"`` (the JSON, or None),
    ``"seed_format"``, ``"format_detected"`` and ``"main"`` (whether this process reports, under torchrun)."""
    from fsae.distributed import env_world, is_main, process_group
    from fsae.evaluate import evaluate_seeds, save_eval
    from fsae.formats import seed_suffix

    seeds = Path(seeds)
    cfg = eval_config(cfg, seeds)
    thresholds, mode = seed_thresholds(cfg, threshold, sweep, mode)
    workers = worker_count(workers)
    ids, split = _scored_ids(cfg, ids, split)
    gt, num_classes = _gt_and_classes(cfg, split, gt, num_classes)
    seed_format, detected = detect_seed_format(seed_format, seeds, ids)
    ids = ids or ids_in(seeds, seed_suffix(seed_format))
    rank, world, _ = env_world()
    with process_group("cpu"):  # under torchrun: each process reads 1/N, confusions summed
        result = evaluate_seeds(seeds, gt, ids, num_classes, thresholds, shard=(rank, world) if world > 1 else None,
                                seed_format=seed_format, mode=mode, workers=workers, progress=progress)
        if split:
            result["split"] = split
        main = is_main()
        written = save_eval(out, result, scored=seeds, gt_dir=gt, ids=ids) if out and main else None
    return {**result, "written": written, "seed_format": seed_format, "format_detected": detected, "main": main}



def scored_mask_folder(masks: str | os.PathLike, cfg: Config | None, split: str | None = None) -> Path:
    """The folder of pseudo-masks to score: ``masks`` itself, or on a COCO run its ``<split>/`` subfolder
    (``RUN/crf`` holds ``crf/train2014/``, as ``fsae crf`` writes and ``fsae seg train`` reads it) when
    ``masks`` holds no mask of its own."""
    from fsae.data.coco import COCO_SPLITS
    from fsae.rundir import mask_split

    masks = Path(masks)
    if cfg is None or cfg.data.kind != "coco" or ids_in(masks, ".png"):
        return masks
    sub = masks / (split if split in COCO_SPLITS else mask_split(cfg))
    return sub if sub.is_dir() else masks


def _run_config_above(path: Path) -> Config | None:
    """The config of the run directory holding ``path`` (``RUN/crf``) or its parent (``RUN/crf/train2014``)."""
    for folder in (path.parent, path.parent.parent):
        cfg = run_config(folder)
        if cfg is not None:
            return cfg
    return None


def eval_masks_stage(masks, gt=None, num_classes: int | None = None, cfg=None, ids=None, split: str | None = None,
                     ignore_as: int | None = None, out=None, progress: bool = True) -> dict[str, Any]:
    """``fsae eval --masks``: the result dict (``evaluate_masks``) with ``"written"``, ``"scored"`` (the
    folder scored: on a COCO run ``RUN/crf/<split>/``) and ``"main"``."""
    from fsae.distributed import env_world, is_main, process_group
    from fsae.evaluate import evaluate_masks, save_eval

    masks = Path(masks)
    cfg = eval_config(cfg, masks) if cfg is not None else _run_config_above(masks)
    ids, split = _scored_ids(cfg, ids, split)
    gt, num_classes = _gt_and_classes(cfg, split, gt, num_classes)
    masks = scored_mask_folder(masks, cfg, split)
    ids = ids or ids_in(masks, ".png")
    rank, world, _ = env_world()
    with process_group("cpu"):
        result = evaluate_masks(masks, gt, ids, num_classes, ignore_as=ignore_as,
                                shard=(rank, world) if world > 1 else None, progress=progress)
        main = is_main()
        written = save_eval(out, result, scored=masks, gt_dir=gt, ids=ids, ignore_as=ignore_as) \
            if out and main else None
    return {**result, "written": written, "scored": masks, "main": main}


# ------------------------------------------------------------------------------------------ pseudo-masks


def _sipe_labels(seeds: Path, images: Path, out: Path, ids: list[str], workers: int, force: bool,
                 progress: bool) -> dict[str, Any]:
    """SIPE's pseudo-masks of a COCO run (SIPE ``cam2ir.py:26-42``): the IS-CAM's own background plane, the
    confident foreground / background with an ignore band between them, CRF-refined
    (``fsae.refine.irn.ir_labels``), into ``out/<id>.png``, stamped like the CRF's masks."""
    from fsae.io import read_mask
    from fsae.refine.irn.ir_labels import make_ir_labels
    from fsae.stamps import folder_digest, ids_part, make_stamp, stage_output

    stamp = make_stamp("crf", {"seeds": folder_digest(seeds)}, {"background": "own", "labels": "sipe_cam2ir"})
    with stage_output(out, stamp, force, ("*.png",), read_mask, part=ids_part(ids)) as target:
        result = make_ir_labels(seeds, images, target, ids, workers=workers, progress=progress)
    return {"total": result["total"], "refined": result["written"], "skipped": result["skipped"],
            "out_dir": str(out), "warnings": []}


def crf_stage(run_dir: str | os.PathLike | None = None, cfg: Config | None = None, seeds=None, images=None,
              out=None, ids=None, threshold: float | str | None = None, background: str | None = None,
              bg_power: float | None = None, iterations: int | None = None, workers: int | None = None,
              shard=None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """``fsae crf``: seeds -> pseudo-masks ``out[/<split>]/<id>.png`` (default ``RUN/crf``; COCO: per split).

    The threshold is ``seed_threshold``'s; a protocol whose background is the seed's own plane (SIPE) gets
    SIPE's cam2ir labels instead of a CRF at a threshold. Returns ``{"threshold", "threshold_source",
    "background", "groups": [refine_dir results], "shard", "total"}`` (``groups`` empty: nothing for this
    shard)."""
    from fsae.distributed import shard_indices
    from fsae.protocol import resolve_protocol
    from fsae.refine import refine_dir

    if run_dir is not None:
        run_dir = Path(run_dir)
        cfg = cfg or run_config(run_dir)
        if cfg is None:
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); pass the folder `fsae train` wrote")
        seeds, out = Path(seeds or run_dir / "seeds"), Path(out or run_dir / "crf")
    if not (seeds and out and (images or cfg is not None)):
        raise FsaeError("fsae crf: pass a run directory, or --seeds, --images and --out")
    value, source = seed_threshold(run_dir, cfg, threshold)
    if cfg is not None:
        protocol = resolve_protocol(cfg, threshold=value, background=background, bg_power=bg_power,
                                    crf_iterations=iterations)
        background, bg_power, iterations = protocol.background, protocol.bg_power, protocol.crf_iterations
    background, bg_power = background or "threshold", 1.0 if bg_power is None else bg_power
    if value is None and background == "threshold":
        raise FsaeError("fsae crf: pass --threshold (or a run directory whose recipe gives eval.threshold)")
    seeds, out = Path(seeds), Path(out)
    ids = (read_id_list(ids) if isinstance(ids, (str, os.PathLike)) else list(ids)) if ids else ids_in(seeds, ".npz")
    if not ids:
        raise FsaeError(f"{seeds}: no seed files (<id>.npz) to refine; run `fsae cam` first")
    mine_shard = shard_of(shard, force, out)
    mine = shard_indices(ids, mine_shard)
    record = {"threshold": value, "threshold_source": source, "background": background, "groups": [],
              "shard": mine_shard, "total": len(ids)}
    if not mine:
        return record
    workers = worker_count(workers)
    groups = mask_groups(cfg.data, mine, images) if cfg is not None else [("", Path(images), mine)]
    params = {} if iterations is None else {"iterations": int(iterations)}
    for sub, group_images, group_ids in groups:
        if background == "own":
            result = _sipe_labels(seeds, group_images, out / sub, group_ids, workers, force, progress)
        else:
            result = refine_dir(seeds, group_images, out / sub, group_ids, threshold=value if value is not None
                                else 0.0, workers=workers, background=background, bg_power=bg_power, force=force,
                                progress=progress, **params)
        record["groups"].append(result)
    return record


def _walk_inputs(run_dir: Path, images, seeds, ids) -> tuple[Path | None, list[str] | None, str]:
    """IRN / PSA: the image folder (default: the run's ``data.root``/JPEGImages; COCO: the split folder holding
    the seeds' images), the ids (None: every seed) and the pseudo-masks' subfolder (COCO: that split)."""
    ids = (read_id_list(ids) if isinstance(ids, (str, os.PathLike)) else list(ids)) if ids is not None else None
    cfg = run_config(run_dir)
    if cfg is None:
        if images is None:
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); pass --images with seeds from "
                              f"elsewhere")
        return Path(images), ids, ""
    seed_ids = ids if ids is not None else ids_in(seeds or run_dir / "seeds", ".npz")
    if cfg.data.kind != "coco":
        return mask_groups(cfg.data, [], images)[0][1], ids, ""
    sub, folder, _ = mask_groups(cfg.data, seed_ids, images, one_split=True)[0]
    return folder, ids, sub


def _stage_device(cfg, device: str | None):
    if device:
        cfg.device = device
    check_device(cfg.device, "--device" if device else "device")
    return cfg


def irn_stage(run_dir: str | os.PathLike, irn_cfg, images=None, seeds=None, ids=None, device: str | None = None,
              force: bool = False, progress: bool = True) -> dict[str, Any]:
    """``fsae irn``: ``run_irn``'s result (``ir_labels``, ``checkpoint``, ``masks``)."""
    from fsae.refine.irn import run_irn

    run_dir = Path(run_dir)
    irn_cfg = _stage_device(irn_cfg, device)
    images, ids, sub = _walk_inputs(run_dir, images, seeds, ids)
    return run_irn(run_dir, irn_cfg, images, ids=ids, seed_dir=seeds, force=force, mask_subdir=sub,
                   progress=progress)


def psa_stage(run_dir: str | os.PathLike, psa_cfg, images=None, seeds=None, ids=None, steps=None, shard=None,
              device: str | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """``fsae psa``: ``run_psa``'s result (``labels``, ``train``, ``masks`` of the steps run) and ``shard``."""
    from fsae.refine.psa import run_psa
    from fsae.refine.psa.pipeline import STEPS

    run_dir = Path(run_dir)
    psa_cfg = _stage_device(psa_cfg, device)
    images, ids, sub = _walk_inputs(run_dir, images, seeds, ids)
    mine = shard_of(shard, force, run_dir)
    result = run_psa(run_dir, psa_cfg, images, ids=ids, seed_dir=seeds, steps=tuple(steps or STEPS), shard=mine,
                     mask_subdir=sub, force=force, progress=progress)
    return {**result, "shard": mine}


# ------------------------------------------------------------------------------------------ segmentation


def seg_train_stage(seg_cfg, run_dir: str | os.PathLike, masks=None, resume: bool = True, allow_gt: bool = False,
                    device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``fsae seg train``: DeepLab on the pseudo-masks ``masks`` (sets ``data.mask_dir``):
    ``{"checkpoint", "run_dir"}``."""
    from fsae.models.backbones import check_backbone
    from fsae.segment.train import train_segmentation

    if masks:
        seg_cfg.data.mask_dir = str(Path(masks).resolve())
    if device:
        seg_cfg.train.device = device
    check_device(seg_cfg.train.device, "--device" if device else "train.device")
    check_backbone(seg_cfg.model.backbone)
    checkpoint = train_segmentation(seg_cfg, run_dir, resume=resume, allow_gt=allow_gt, progress=progress)
    return {"checkpoint": checkpoint, "run_dir": Path(run_dir)}


def seg_infer_stage(run_dir: str | os.PathLike | None, seg_cfg, checkpoint=None, out=None, splits=None,
                    crf: bool | None = None, device: str | None = None, force: bool = False) -> dict[str, Any]:
    """``fsae seg infer``: ``run_seg_inference``'s result per split (default checkpoint
    ``RUN/checkpoints/last.pt``, output root the run directory)."""
    from fsae.segment.infer import run_seg_inference
    from fsae.segment.train import seg_model_from_checkpoint
    from fsae.stamps import file_digest

    checkpoint = checkpoint or (Path(run_dir) / "checkpoints" / "last.pt" if run_dir else None)
    if checkpoint is None:
        raise FsaeError("fsae seg infer: pass --checkpoint (or a run directory instead of a config file)")
    out = Path(out) if out else (Path(run_dir) if run_dir else None)
    if out is None:
        raise FsaeError("fsae seg infer: pass --out (or a run directory instead of a config file)")
    device = _device(device, seg_cfg.train.device)
    model, _ = seg_model_from_checkpoint(checkpoint, seg_cfg.data.num_classes, device)
    return run_seg_inference(model, seg_cfg, out, splits=list(splits) if splits else None, crf=crf, device=device,
                             source={"checkpoint": file_digest(checkpoint)}, force=force)
