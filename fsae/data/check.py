"""Find what is wrong with a data set on disk before a long run trips over it.

``check_dataset(kind, root)`` returns every problem it finds as ``Problem(path, message)``, the path
being the file to fix. ``kind``:

- ``"voc"``: a VOC2012 root (``fsae.data.voc``); splits train, val and, if its list exists, train_aug
  (masks in ``SegmentationClass``, for train_aug in ``SegmentationClassAug``); 20 classes.
- ``"coco"``: a COCO 2014 root (``fsae.data.coco``); splits train2014, val2014; 80 classes.
- ``"saliency"``: the saliency maps (``<id>.png``, greyscale 0..255, e.g. the PFAN maps EPS and PPC
  distribute) of a VOC root's train_aug split (train if there is no train_aug list); ``saliency``
  names their folder, default ``root/SALImages``. For ``"voc"`` / ``"coco"``, a ``saliency`` folder
  is checked for the training splits (those not named ``val*``).

What is checked: list files exist and are not empty (and, with ``strict_counts``, hold the number of
ids of the real data set); the label file parses, has an entry for every listed id, and every entry is
a list of distinct classes in 1..C; every image, mask and saliency map exists. Unless ``fast``: every
image and mask decodes (a corrupt JPEG, a truncated PNG), mask values are in {0..C, 255}, masks and
saliency maps have their image's size, labels agree with masks, and (VOC) every ``Annotations/<id>.xml``
parses and names only VOC classes (one problem per file). For VOC the labels must equal the
classes in the mask; for COCO every class in the mask must be labelled, but a label need not show in
the mask (``fsae.data.prepare``: a COCO instance may be fully covered by a later one).
``fast=True`` is what training checks before it starts: no file is opened but lists and labels.

``label_disagreements(root)`` (VOC) is a report, not a problem list: the ids whose label-file entry (fsae
builds it from the masks) differs from the classes their ``Annotations/<id>.xml`` names (IRN builds its
labels from the XML, ``fsae.data.voc.xml_image_labels``), one line each naming both label sets.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fsae.data.coco import COCO_SPLITS, split_paths
from fsae.data.prepare import map_parallel, present_classes
from fsae.data.synthetic import META_FILE
from fsae.data.voc import ANNOTATION_DIR, LABEL_FILE, saliency_folder, xml_objects
from fsae.labels import VOC_CLASSES
from fsae.errors import DataError
from fsae.io import read_id_list, read_image, read_json, read_mask

KINDS = ("voc", "coco", "saliency")
NUM_CLASSES = {"voc": 20, "coco": 80, "saliency": 20}
EXPECTED_COUNTS = {
    "voc": {"train": 1464, "val": 1449, "train_aug": 10582},
    "coco": {"train2014": 82081, "val2014": 40137},
}
PREPARE_HINT = {
    "voc": "fsae data prepare voc",
    "coco": "fsae data prepare coco",
    "saliency": "fsae data prepare voc",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_problems(problems: list[Problem], limit: int | None = None) -> str:
    """One line per problem (the file, then what is wrong), then a summary line."""
    shown = problems if limit is None else problems[:limit]
    lines = [str(p) for p in shown]
    if len(problems) > len(shown):
        lines.append(f"... and {len(problems) - len(shown)} more")
    if problems:
        files = len({p.path for p in problems})
        lines.append(f"{len(problems)} problem(s) in {files} file(s)")
    else:
        lines.append("no problems found")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Split:
    name: str
    list_path: Path
    image_dir: Path
    mask_dir: Path | None  # None: masks are not part of this check
    saliency_dir: Path | None


def _problem(exc: DataError, path: Path) -> Problem:
    """A ``DataError`` (whose message starts with the file) as a Problem on that file."""
    message = str(exc)
    prefix = f"{path}: "
    return Problem(str(path), message[len(prefix):] if message.startswith(prefix) else message)


def _splits(kind: str, root: Path, split: str | None, saliency: Path | None) -> list[_Split]:
    if kind == "coco":
        names = [split] if split else list(COCO_SPLITS)
        out = []
        for name in names:
            paths = split_paths(root, name)  # DataError for an unknown split
            sal = saliency if saliency and not name.startswith("val") else None
            out.append(_Split(name, paths["list"], paths["images"], paths["masks"], sal))
        return out
    list_dir = root / "ImageSets" / "Segmentation"
    if kind == "saliency":
        if split is None:
            split = "train_aug" if (list_dir / "train_aug.txt").is_file() else "train"
        return [_Split(split, list_dir / f"{split}.txt", root / "JPEGImages", None, saliency)]
    if split is None:
        names = ["train", "val"] + (["train_aug"] if (list_dir / "train_aug.txt").is_file() else [])
    else:
        names = [split]
    out = []
    for name in names:
        masks = root / ("SegmentationClassAug" if name == "train_aug" else "SegmentationClass")
        sal = saliency if saliency and not name.startswith("val") else None
        out.append(_Split(name, list_dir / f"{name}.txt", root / "JPEGImages", masks, sal))
    return out


def _check_label_file(
    path: Path, num_classes: int, kind: str
) -> tuple[dict[str, list[int]] | None, list[Problem]]:
    """Valid entries of ``cls_labels.json`` (None if the file is unusable) and a problem per invalid one."""
    try:
        raw = read_json(path)
    except DataError as exc:
        problem = _problem(exc, path)
        if not path.is_file():
            problem = Problem(problem.path, f"{problem.message}; run `{PREPARE_HINT[kind]}`")
        return None, [problem]
    if not isinstance(raw, dict):
        return None, [Problem(str(path), "expected a JSON object {id: [labels 1..C]}")]
    labels, problems = {}, []
    for image_id, entry in raw.items():
        where = f"image {image_id!r}"
        integers = isinstance(entry, list) and all(type(c) is int for c in entry)
        if not integers:
            problems.append(Problem(str(path), f"{where}: labels must be a list of integers, got {entry!r}"))
            continue
        if len(entry) > 1 and set(entry) <= {0, 1}:
            problems.append(Problem(
                str(path),
                f"{where}: {entry[:8]}{'...' if len(entry) > 8 else ''} looks like a multi-hot vector "
                f"of length {len(entry)} (C = {num_classes}); the file stores class numbers "
                f"1..{num_classes}",
            ))
            continue
        bad = [c for c in entry if not 1 <= c <= num_classes]
        if bad:
            problems.append(Problem(str(path), f"{where}: labels {bad} are outside 1..{num_classes}: out of range for {num_classes} classes"))
            continue
        if len(set(entry)) != len(entry):
            problems.append(Problem(str(path), f"{where}: labels {entry} repeat a class"))
            continue
        labels[str(image_id)] = sorted(entry)
    return labels, problems


def _check_xml(path: Path | None) -> list[Problem]:
    """A VOC annotation XML that does not parse, or names objects of no VOC class: one problem."""
    if path is None or not path.is_file():
        return []
    try:
        _, unknown = xml_objects(path)
    except DataError as exc:
        return [_problem(exc, path)]
    if unknown:
        return [Problem(str(path), f"object name(s) {unknown} are no VOC class (IRN's labels drop them)")]
    return []


def _check_item(item: dict) -> list[Problem]:
    """Files of one id: existence, and unless ``fast`` decoding, values, sizes and labels."""
    problems = []
    image_path, mask_path, sal_path = item["image"], item["mask"], item["saliency"]
    paths = [p for p in (image_path if item["check_image"] else None, mask_path, sal_path) if p]
    missing = {p for p in paths if not p.is_file()}
    for p in sorted(missing):
        what = "image" if p == image_path else "mask" if p == mask_path else "saliency map"
        problems.append(Problem(str(p), f"{what} file not found"))
    if item["fast"]:
        return problems
    problems += _check_xml(item.get("xml"))

    image = mask = None
    if image_path.is_file():
        try:
            image = read_image(image_path)
        except DataError as exc:
            if item["check_image"]:
                problems.append(_problem(exc, image_path))
    if mask_path and mask_path not in missing:
        try:
            mask = read_mask(mask_path, item["num_classes"])
        except DataError as exc:
            problems.append(_problem(exc, mask_path))
    if sal_path and sal_path not in missing:
        try:
            sal = read_mask(sal_path)
            if image is not None and sal.shape != image.shape[:2]:
                problems.append(Problem(
                    str(sal_path),
                    f"saliency map size {sal.shape[1]}x{sal.shape[0]} differs from image size "
                    f"{image.shape[1]}x{image.shape[0]} of {image_path}",
                ))
        except DataError as exc:
            problems.append(_problem(exc, sal_path))
    if mask is None:
        return problems
    if image is not None and mask.shape != image.shape[:2]:
        problems.append(Problem(
            str(mask_path),
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{image.shape[1]}x{image.shape[0]} of {image_path}",
        ))
    labels = item["labels"]
    if labels is not None:
        shown = set(present_classes(mask))
        wrong = shown != set(labels) if item["labels_equal_mask"] else not shown <= set(labels)
        if wrong:
            problems.append(Problem(
                str(item["label_file"]),
                f"image {item['id']!r} is labelled {labels} but its mask {mask_path} shows classes "
                f"{sorted(shown)}",
            ))
    return problems


def check_dataset(
    kind: str,
    root: str | os.PathLike,
    split: str | None = None,
    saliency: str | os.PathLike | None = None,
    fast: bool = False,
    strict_counts: bool = False,
    num_classes: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[Problem]:
    """Every problem found in a data set on disk (module docstring); an empty list means none.

    ``split``: one split (VOC list name, COCO ``train2014`` / ``val2014``); default all of the kind's.
    ``strict_counts``: also report lists whose length differs from the real data set's.
    ``num_classes``: default the data set's own (``meta.json`` of a generated set) or the kind's (20, 80).
    ``workers``: processes reading files (full check only).
    """
    if kind not in KINDS:
        raise DataError(f"unknown data set kind {kind!r}; use one of {', '.join(KINDS)}")
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "data root not found")]
    if kind == "saliency" and saliency is None:
        saliency = root / "SALImages"
    saliency = Path(saliency) if saliency else None
    splits = _splits(kind, root, split, saliency)
    return _check_splits(kind, root, splits, root / LABEL_FILE, dataset_classes(kind, root, num_classes),
                         fast=fast, strict_counts=strict_counts, workers=workers, progress=progress)


def dataset_classes(kind: str, root: str | os.PathLike, num_classes: int | None = None) -> int:
    """``num_classes`` if given, else the ``num_classes`` of ``root/meta.json`` (a generated set), else the
    kind's (VOC 20, COCO 80)."""
    if num_classes is not None:
        if num_classes < 1:
            raise DataError(f"num_classes = {num_classes} is not allowed; expected an integer >= 1")
        return num_classes
    meta = Path(root) / META_FILE
    if meta.is_file():
        data = read_json(meta)
        value = data.get("num_classes") if isinstance(data, dict) else None
        if type(value) is int and value >= 1:
            return value
    return NUM_CLASSES[kind]


def check_training_data(cfg) -> list[Problem]:
    """The fast check (lists, label file, file existence) of every split a ``fsae train`` run with ``cfg``
    (``fsae.config.Config``) reads, in its configured folders: the training split (images, labels, saliency
    maps when ``data.saliency_dir`` is set, GT masks when the mask folder exists: a batch cannot mix images
    with and without one) and, when held-out evaluation is on, the validation split with its GT masks."""
    data = cfg.data
    root = Path(data.root)
    if data.kind not in ("voc", "coco"):
        raise DataError(f"unknown data set kind {data.kind!r}; use voc or coco")
    if not root.is_dir():
        return [Problem(str(root), "data root not found")]

    def split_of(name: str, training: bool) -> _Split:
        if data.kind == "coco":
            paths = split_paths(root, name)
            list_path, images = paths["list"], paths["images"]
            masks = root / data.mask_dir / name if data.mask_dir else None
        else:
            list_path, images = root / "ImageSets" / "Segmentation" / f"{name}.txt", root / "JPEGImages"
            masks = root / data.mask_dir if data.mask_dir else None
        if training and masks is not None and not masks.is_dir():
            masks = None  # training reads GT masks only where they exist
        saliency = saliency_folder(root, data.saliency_dir) if training else None
        return _Split(name, list_path, images, masks, saliency)

    splits = [split_of(data.train_split, True)]
    if cfg.train.val_every and data.val_split:
        splits.append(split_of(data.val_split, False))
    label_path = Path(data.label_file) if data.label_file else root / LABEL_FILE
    return _check_splits(data.kind, root, splits, label_path, data.num_classes, fast=True)


def _check_splits(kind: str, root: Path, splits: list[_Split], label_path: Path, num_classes: int,
                  fast: bool, strict_counts: bool = False, workers: int = 1, progress: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    labels = None  # not checked against lists and masks
    if kind != "saliency":
        labels, label_problems = _check_label_file(label_path, num_classes, kind)
        problems += label_problems
    saliency_dirs = {s.saliency_dir for s in splits if s.saliency_dir}

    missing_dirs: set[Path] = set()
    image_dirs = {s.image_dir for s in splits}
    for folder in sorted({d for s in splits for d in (s.image_dir, s.mask_dir, s.saliency_dir) if d}):
        if not folder.is_dir():
            what = "saliency folder" if folder in saliency_dirs else "folder"
            made_by_prepare = folder not in saliency_dirs and folder not in image_dirs
            hint = f"; run `{PREPARE_HINT[kind]}`" if made_by_prepare else ""
            problems.append(Problem(str(folder), f"{what} not found{hint}"))
            missing_dirs.add(folder)

    items, seen_images = [], set()
    for s in splits:
        try:
            ids = read_id_list(s.list_path)
        except DataError as exc:
            problem = _problem(exc, s.list_path)
            if not s.list_path.is_file():
                problem = Problem(problem.path, f"{problem.message}; run `{PREPARE_HINT[kind]}`")
            problems.append(problem)
            continue
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            problems.append(
                Problem(str(s.list_path), f"{len(repeated)} id(s) listed twice, e.g. {repeated[:3]}")
            )
        expected = EXPECTED_COUNTS.get(kind, {}).get(s.name)
        if strict_counts and expected is not None and len(ids) != expected:
            problems.append(Problem(str(s.list_path), f"expected {expected} ids, found {len(ids)}"))
        if labels is not None:
            unlabelled = [i for i in ids if i not in labels]
            if unlabelled:
                problems.append(Problem(
                    str(label_path),
                    f"no valid image-level label for {len(unlabelled)} id(s) of {s.list_path.name}, "
                    f"e.g. {unlabelled[:3]}",
                ))
        for image_id in dict.fromkeys(ids):
            image = s.image_dir / f"{image_id}.jpg"
            items.append({
                "id": image_id,
                "image": image,
                "check_image": image not in seen_images and s.image_dir not in missing_dirs,
                "mask": (
                    s.mask_dir / f"{image_id}.png" if s.mask_dir and s.mask_dir not in missing_dirs else None
                ),
                "saliency": (
                    s.saliency_dir / f"{image_id}.png"
                    if s.saliency_dir and s.saliency_dir not in missing_dirs else None
                ),
                "labels": labels.get(image_id) if labels is not None else None,
                "labels_equal_mask": kind == "voc",
                "xml": root / ANNOTATION_DIR / f"{image_id}.xml" if kind == "voc" else None,
                "label_file": label_path,
                "num_classes": num_classes,
                "fast": fast,
            })
            seen_images.add(image)

    workers = 1 if fast else workers
    for found in map_parallel(_check_item, items, workers, desc=f"check {kind}", progress=progress):
        problems += found
    return _unique_sorted(problems)


def _unique_sorted(problems: list[Problem]) -> list[Problem]:
    """Drop repeats (an image listed in two splits); sort by file, first-found order within a file."""
    unique = list(dict.fromkeys(problems))
    order = {p: i for i, p in enumerate(unique)}
    return sorted(unique, key=lambda p: (p.path, order[p]))


@dataclass(frozen=True)
class LabelDisagreement:
    """An id whose label-file classes differ from those its VOC annotation XML names."""

    image_id: str
    xml_path: str
    xml_labels: tuple[int, ...]
    label_file: str
    file_labels: tuple[int, ...]

    def __str__(self) -> str:
        def named(labels):
            return "[" + ", ".join(f"{c} {VOC_CLASSES[c - 1]}" for c in labels) + "]"

        return (f"{self.xml_path}: image {self.image_id!r}: the XML names {named(self.xml_labels)}, "
                f"{self.label_file} has {named(self.file_labels)}")


def label_disagreements(root: str | os.PathLike, split: str | None = None) -> list[LabelDisagreement]:
    """Ids of a VOC root's splits (``_splits``; default train, val, train_aug) with an annotation XML whose
    classes differ from the id's ``cls_labels.json`` entry; ids without an XML or an entry are skipped
    (``check_dataset`` reports missing entries), and so are XML files that do not parse (``check_dataset``
    reports them, and object names of no VOC class). Sorted by id."""
    root = Path(root)
    label_path = root / LABEL_FILE
    labels, _ = _check_label_file(label_path, len(VOC_CLASSES), "voc") if label_path.is_file() else (None, [])
    if not labels:
        return []
    ids: dict[str, None] = {}
    for s in _splits("voc", root, split, None):
        if s.list_path.is_file():
            ids.update(dict.fromkeys(read_id_list(s.list_path)))
    out = []
    for image_id in sorted(ids):
        xml = root / ANNOTATION_DIR / f"{image_id}.xml"
        if image_id not in labels or not xml.is_file():
            continue
        try:
            from_xml, _ = xml_objects(xml)
        except DataError:  # check_dataset reports it as a problem
            continue
        if from_xml != labels[image_id]:
            out.append(LabelDisagreement(image_id, str(xml), tuple(from_xml), str(label_path),
                                         tuple(labels[image_id])))
    return out


def format_disagreements(found: list[LabelDisagreement]) -> str:
    """One line per disagreeing id, then a count; empty when there are none."""
    if not found:
        return ""
    return "\n".join([*map(str, found), f"{len(found)} image(s) whose labels differ from their annotation XML "
                                         f"(IRN's labels; fsae's come from the masks)"])
