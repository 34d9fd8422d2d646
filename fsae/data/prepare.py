"""Build the files WSSS training reads from the real data sets as they are downloaded.

VOC 2012 + SBD (``prepare_voc``), below the VOC root (``VOCdevkit/VOC2012``)::

    SegmentationClassAug/<id>.png              one mask per id of train_aug and val
    ImageSets/Segmentation/train_aug.txt       (VOC train | SBD train | SBD val) - VOC val: 10,582 ids
    cls_labels.json                            {"<id>": [classes 1..20 in its mask]}, train_aug and val

  Masks of ``SegmentationClassAug`` are VOC's own ``SegmentationClass`` masks where VOC has one (their
  object boundaries are 255 = ignore) and SBD's ``cls/<id>.mat`` ``GTcls.Segmentation`` otherwise (no
  ignore pixels), written as VOC palette PNGs. This is how the usual ``SegmentationClassAug`` is made;
  a downloaded ``SegmentationClassAug`` folder is kept as it is (existing masks are never rewritten).
  Image-level labels are the classes present in the mask, 0 (background) and 255 (ignore) excluded.

COCO 2014 (``prepare_coco``), below the COCO root (layout in ``fsae.data.coco``)::

    SegmentationClass/{train2014,val2014}/<id>.png     class masks, 0 bg, 1..80, 255 ignore
    ImageSets/train.txt, ImageSets/val.txt             82,081 / 40,137 ids on the real data
    cls_labels.json                                    {"<id>": [classes 1..80]} for both splits

  Masks follow the COCO mask preparation of the MCTformer / SIPE / PPC line of work: every
  annotation of the image, crowd ones included, is drawn with ``COCO.annToMask`` (polygons,
  RLE and uncompressed RLE) in annotation-file order, a later annotation overwriting an earlier
  one where they overlap. ``crowd="class"`` (default, that protocol) draws a crowd region with its
  class; ``crowd="ignore"`` draws it as 255 (still in annotation order) and leaves its class out of
  the image's labels unless a non-crowd annotation has it too.
  Image-level labels are the classes of the image's annotations (not of the drawn mask: an instance
  fully covered by a later one, or too small to cover a pixel, still labels its image). The lists
  hold the images with at least one label, as the standard WSSS lists do; the 702 / 367 images
  without any annotation (and, with ``crowd="ignore"``, images with crowd annotations only) are left
  out and get no mask.

Both are resumable: masks already on disk are skipped (every write is atomic, so an existing file is
complete), and lists and the label file are rewritten only when their content changes, so a second
run writes nothing. Masks are converted in a ``multiprocessing`` pool of ``workers`` processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fsae.data.coco import COCO_CATEGORY_IDS, COCO_SPLITS, category_mapping, split_paths
from fsae.data.voc import LABEL_FILE
from fsae.errors import DataError
from fsae.io import atomic_write, read_id_list, read_json, read_mask, write_mask, write_text
from fsae.labels import IGNORE_INDEX

VOC_NUM_CLASSES = 20
CROWD_MODES = ("class", "ignore")


@dataclass
class PrepareReport:
    """What a ``prepare_*`` run did."""

    root: Path
    written: int = 0  # masks written by this run
    skipped: int = 0  # masks already on disk (resumed or downloaded)
    lists: dict[str, int] = field(default_factory=dict)  # list file -> number of ids
    labels: int = 0  # ids in the label file
    files_updated: list[Path] = field(default_factory=list)  # lists / label file (re)written
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.root}: {self.written} mask(s) written, {self.skipped} already there"]
        lines += [f"{path}: {count} ids" for path, count in self.lists.items()]
        lines.append(f"{self.root / LABEL_FILE}: {self.labels} image-level labels")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- helpers


def present_classes(mask: np.ndarray) -> list[int]:
    """Classes shown in a label-space mask, sorted: its values without 0 (background) and 255."""
    values = np.unique(mask)
    return [int(v) for v in values if v != 0 and v != IGNORE_INDEX]


def map_parallel(
    fn: Callable, jobs: list, workers: int | None = None, desc: str = "", progress: bool = True
) -> Iterator:
    """``fn`` over ``jobs`` in a process pool (in this process when ``workers <= 1``), with a tqdm bar.

    Results come in completion order. ``fn`` must be a module-level function (it is pickled).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="img")
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
        else:
            chunksize = max(1, min(64, len(jobs) // (workers * 8)))
            with multiprocessing.Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(fn, jobs, chunksize=chunksize):
                    yield result
                    bar.update()
    finally:
        bar.close()


def _write_text_if_changed(path: Path, text: str, report: PrepareReport) -> None:
    if path.is_file() and path.read_text() == text:
        return
    write_text(path, text)
    report.files_updated.append(path)


def _write_list(path: Path, ids: Iterable[str], report: PrepareReport) -> None:
    ids = sorted(ids)
    _write_text_if_changed(path, "".join(f"{i}\n" for i in ids), report)
    report.lists[str(path)] = len(ids)


def _write_labels(path: Path, labels: dict[str, list[int]], report: PrepareReport) -> None:
    """``cls_labels.json``, one id per line (valid JSON, diffable)."""
    lines = [f"  {json.dumps(i)}: {json.dumps(labels[i])}" for i in sorted(labels)]
    _write_text_if_changed(path, "{\n" + ",\n".join(lines) + "\n}\n", report)
    report.labels = len(labels)


# --------------------------------------------------------------------------------------- VOC + SBD


def read_sbd_mask(path: str | os.PathLike) -> np.ndarray:
    """SBD ``cls/<id>.mat`` -> (H, W) uint8 label-space mask (0 bg, 1..20; SBD has no 255)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SBD mask file not found")
    try:
        mat = loadmat(path, struct_as_record=False, variable_names=["GTcls"])
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ... on broken files
        raise DataError(f"{path}: cannot read SBD .mat file ({exc}); the file is corrupt") from exc
    gt = mat.get("GTcls")
    gt = gt.flat[0] if isinstance(gt, np.ndarray) and gt.size == 1 else gt  # a 1x1 MATLAB struct
    if not hasattr(gt, "Segmentation"):
        raise DataError(f"{path}: no GTcls.Segmentation in this .mat; is it an SBD cls/ file?")
    seg = np.asarray(gt.Segmentation)
    if seg.ndim != 2 or seg.size == 0:
        raise DataError(f"{path}: GTcls.Segmentation has shape {seg.shape}, expected (H, W)")
    if seg.min() < 0 or seg.max() > VOC_NUM_CLASSES:
        raise DataError(
            f"{path}: GTcls.Segmentation values {sorted(set(np.unique(seg).tolist()))[:8]} "
            f"are outside 0..{VOC_NUM_CLASSES}"
        )
    return seg.astype(np.uint8)


def train_aug_ids(
    voc_train: Iterable[str], voc_val: Iterable[str], sbd_train: Iterable[str], sbd_val: Iterable[str]
) -> list[str]:
    """The train_aug split: (VOC train | SBD train | SBD val) - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _voc_mask_job(job: tuple[str, str, str | None, str | None]) -> tuple[str, list[int], bool]:
    """Write one ``SegmentationClassAug`` mask (unless there); return (id, its classes, written)."""
    image_id, out, kind, src = job
    out = Path(out)
    if out.is_file():
        return image_id, present_classes(read_mask(out, VOC_NUM_CLASSES)), False
    if kind == "voc":
        mask = read_mask(src, VOC_NUM_CLASSES)  # validates before copying the file as it is
        atomic_write(out, lambda tmp: shutil.copyfile(src, tmp))
    else:
        mask = read_sbd_mask(src)
        write_mask(out, mask)
    return image_id, present_classes(mask), True


def _sbd_dataset_dir(sbd: Path) -> Path:
    """Accept ``benchmark_RELEASE/dataset`` or one of the folders above it."""
    for candidate in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise DataError(
        f"{sbd}: no cls/ folder here; pass the SBD folder benchmark_RELEASE/dataset "
        "(with cls/<id>.mat, train.txt, val.txt)"
    )


def prepare_voc(
    root: str | os.PathLike,
    sbd: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Build ``SegmentationClassAug/``, ``train_aug.txt`` and ``cls_labels.json`` below a VOC2012 root.

    ``root`` is ``VOCdevkit/VOC2012``; ``sbd`` is SBD's ``benchmark_RELEASE/dataset`` (or a folder
    above it). Without ``sbd``, train_aug is VOC train alone and the report carries a warning.
    ``workers``: processes converting masks (default: all CPUs; ``1`` = this process).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VOC root not found; pass the VOCdevkit/VOC2012 folder")
    report = PrepareReport(root=root)
    split_dir = root / "ImageSets" / "Segmentation"
    voc_train = read_id_list(split_dir / "train.txt")
    voc_val = read_id_list(split_dir / "val.txt")
    voc_mask_dir = root / "SegmentationClass"

    if sbd is None:
        sbd_dir, sbd_train, sbd_val = None, [], []
        report.warnings.append(
            "no SBD given: train_aug.txt is VOC train alone (1,464 ids instead of 10,582); "
            "pass the SBD benchmark_RELEASE/dataset folder for the standard train_aug split"
        )
    else:
        sbd_dir = _sbd_dataset_dir(Path(sbd))
        sbd_train = read_id_list(sbd_dir / "train.txt")
        sbd_val = read_id_list(sbd_dir / "val.txt")
    train_aug = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    sbd_ids = set(sbd_train) | set(sbd_val)

    out_dir = root / "SegmentationClassAug"
    jobs, no_source = [], []
    for image_id in sorted(set(train_aug) | set(voc_val)):
        out = out_dir / f"{image_id}.png"
        voc_mask = voc_mask_dir / f"{image_id}.png"
        if out.is_file():
            jobs.append((image_id, str(out), None, None))
        elif voc_mask.is_file():
            jobs.append((image_id, str(out), "voc", str(voc_mask)))
        elif sbd_dir is not None and image_id in sbd_ids:
            jobs.append((image_id, str(out), "sbd", str(sbd_dir / "cls" / f"{image_id}.mat")))
        else:
            no_source.append(image_id)
    if no_source:
        where = f"{voc_mask_dir}" + (f" or {sbd_dir / 'cls'}" if sbd_dir else "")
        raise DataError(
            f"{voc_mask_dir}: no mask for {len(no_source)} id(s) of the VOC lists in {where}, "
            f"e.g. {no_source[:3]}; is the VOC2012 download complete?"
        )

    labels = {}
    for image_id, present, written in map_parallel(
        _voc_mask_job, jobs, workers, desc="SegmentationClassAug", progress=progress
    ):
        labels[image_id] = present
        report.written += written
        report.skipped += not written

    _write_list(split_dir / "train_aug.txt", train_aug, report)
    _write_labels(root / LABEL_FILE, labels, report)
    return report


# -------------------------------------------------------------------------------------------- COCO


def _load_coco(path: Path):
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataError(
            f"{path}: COCO annotation file not found; "
            f"unpack annotations_trainval2014.zip into {path.parent.parent}"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timing
            return COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO instances annotation file ({exc})") from exc


def _coco_mask_job(job: tuple[str, dict, list[tuple[dict, int]]]) -> str:
    """Draw and write one class mask: annotations in order, later ones overwriting earlier ones."""
    from pycocotools.coco import COCO

    out, image_info, annotations = job
    coco = COCO()  # annToMask only needs the image's size
    coco.imgs[image_info["id"]] = image_info
    mask = np.zeros((image_info["height"], image_info["width"]), dtype=np.uint8)
    for ann, value in annotations:
        try:
            drawn = coco.annToMask(ann)
        except Exception as exc:  # malformed polygons / RLE raise from pycocotools' C code
            raise DataError(
                f"annotation {ann.get('id')} of {image_info['file_name']}: cannot rasterise its "
                f"segmentation ({exc})"
            ) from exc
        mask[drawn > 0] = value
    write_mask(out, mask)
    return out


def prepare_coco(
    root: str | os.PathLike,
    workers: int | None = None,
    crowd: str = "class",
    progress: bool = True,
) -> PrepareReport:
    """Build class masks, ``ImageSets/{train,val}.txt`` and ``cls_labels.json`` below a COCO 2014 root.

    ``crowd``: ``"class"`` draws crowd regions with their class (the reference protocol),
    ``"ignore"`` draws them as 255 and drops crowd-only classes from the labels (module docstring).
    ``workers``: processes drawing masks (default: all CPUs; ``1`` = this process).
    """
    if crowd not in CROWD_MODES:
        raise DataError(f"crowd={crowd!r}: use one of {', '.join(CROWD_MODES)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: COCO root not found")
    report = PrepareReport(root=root)

    # Masks drawn with one crowd option must not be resumed with the other.
    settings_path = root / "SegmentationClass" / "prepare.json"
    if settings_path.is_file():
        previous = read_json(settings_path).get("crowd")
        if previous != crowd:
            raise DataError(
                f"{settings_path}: the masks here were drawn with crowd={previous!r}, this run asks "
                f"for crowd={crowd!r}; delete {settings_path.parent} to redraw them"
            )
    else:
        write_text(settings_path, json.dumps({"crowd": crowd}) + "\n")

    labels: dict[str, list[int]] = {}
    for split in COCO_SPLITS:
        paths = split_paths(root, split)
        coco = _load_coco(paths["annotations"])
        if tuple(sorted(coco.getCatIds())) != COCO_CATEGORY_IDS:
            raise DataError(
                f"{paths['annotations']}: its categories {sorted(coco.getCatIds())[:10]}... are not the "
                f"80 COCO categories, so classes 1..80 would not match fsae.data.coco.COCO_CLASSES"
            )
        to_class = category_mapping(coco)
        split_ids, jobs = [], []
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            stem = Path(info["file_name"]).stem
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
            drawn, present = [], set()
            for ann in annotations:
                cls = to_class[ann["category_id"]]
                if ann.get("iscrowd", 0) and crowd == "ignore":
                    drawn.append((ann, IGNORE_INDEX))
                else:
                    drawn.append((ann, cls))
                    present.add(cls)
            if not present:
                continue
            labels[stem] = sorted(present)
            split_ids.append(stem)
            out = paths["masks"] / f"{stem}.png"
            if out.is_file():
                report.skipped += 1
            else:
                size = {k: info[k] for k in ("id", "height", "width", "file_name")}
                jobs.append((str(out), size, drawn))
        desc = f"COCO {split} masks"
        for _ in map_parallel(_coco_mask_job, jobs, workers, desc=desc, progress=progress):
            report.written += 1
        _write_list(paths["list"], split_ids, report)
        del coco
    _write_labels(root / LABEL_FILE, labels, report)
    return report
