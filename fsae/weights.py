"""Weight files: reading them, and the pretrained files each recipe starts from.

``read_weight_file`` reads any state dict or checkpoint (every stage uses it). ``resolve_weights``
turns a recipe's ``weights`` entry into a local file: ``imagenet`` means the backbone's documented
default (``DEFAULTS``: the file its base repository loads), looked up in the weights folder
(``$FSAE_WEIGHTS``, default ``data/weights/``), else downloaded there from its published URL with
its checksum verified; offline and missing, one ``WeightsError`` names the file, its checksum, the
URL and the folder. Any other value is a local path, used as given.

This module imports nothing of fsae but the errors: every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fsae.errors import CheckpointError

IMAGENET = "imagenet"  # the recipe value for "the backbone's documented default file"
DEFAULT_FOLDER = Path("data/weights")


class WeightsError(CheckpointError):
    """A pretrained weight file is missing (and could not be downloaded) or corrupt."""


@dataclass(frozen=True)
class WeightFile:
    """One published weight file. ``sha256`` is the published prefix (torch.hub's ``name-<sha256[:8]>.pth``
    convention, checked by ``torch.hub.load_state_dict_from_url(check_hash=True)``) or a full digest;
    ``None`` where nothing was published. ``url`` None: not downloadable as such (``how`` says how to
    get it)."""

    filename: str
    sha256: str | None
    url: str | None
    what: str
    how: str = ""


# torchvision's ResNet-50 v1 as IRN (net/resnet50.py:7) and SIPE (network/resnet50.py:6) load it (legacy
# URL), and the same weights as today's torchvision ResNet50_Weights.IMAGENET1K_V1 serves them.
RESNET50_V1 = (
    WeightFile("resnet50-19c8e357.pth", "19c8e357", "https://download.pytorch.org/models/resnet50-19c8e357.pth",
               "torchvision ResNet-50 v1 ImageNet (legacy URL of IRN / SIPE)"),
    WeightFile("resnet50-0676ba61.pth", "0676ba61", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
               "torchvision ResNet-50 IMAGENET1K_V1"),
)
RESNET101_V1 = (
    WeightFile("resnet101-63fe2227.pth", "63fe2227", "https://download.pytorch.org/models/resnet101-63fe2227.pth",
               "torchvision ResNet-101 v1 ImageNet (SIPE network/resnet50.py:7)"),
)
# MCTformer run.sh --finetune, loaded with check_hash=True (main.py:211-213); timm's deit_small_patch16_224
# fb_in1k pretrained_cfg names the same url (its hf_hub copy is a safetensors conversion).
DEIT_SMALL = (
    WeightFile("deit_small_patch16_224-cd65a155.pth", "cd65a155",
               "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
               "DeiT-S ImageNet-1k (Touvron et al.; timm deit_small_patch16_224.fb_in1k); a dict with 'model'"),
)
# PSA / SEAM / EPS / PPC: README "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" from github.com/itijyou/ademxapp.
RESNET38_MXNET = (
    WeightFile("ilsvrc-cls_rna-a1_cls1000_ep-0001.params", None, None,
               "ResNet-38 (model A1) ImageNet, MXNet NDArray file",
               "download it from the links of github.com/itijyou/ademxapp (as PSA's README says)"),
)
# deeplab-pytorch configs/voc12.yaml MODEL.INIT_MODEL, made by its convert.py --dataset coco from
# init.caffemodel of scripts/setup_caffemodels.sh; ImageNet ResNet-101 is the documented fallback.
DEEPLAB_COCO = (
    WeightFile("deeplabv1_resnet101-coco.pth", None,
               "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip",
               "DeepLab ResNet-101 COCO init (deeplab-pytorch's conversion of init.caffemodel)",
               "unzip init.caffemodel from the URL and run `python convert.py --dataset coco` of "
               "github.com/kazuto1011/deeplab-pytorch; fallback: weights: resnet101-63fe2227.pth "
               "(torchvision ImageNet) with backbone resnet101_deeplab"),
)

# The PPC/EPS authors' DeepLab backbone (wseg segmentation/lib/net/backbone/resnet.py:16,19): PyTorch-Encoding's
# deep-stem ImageNet ResNet-101 (timm's resnet101s layout); its published hash prefix is a sha1, not checked.
RESNET101S = (
    WeightFile("resnet101s-03a0f310.pth", None, None, "deep-stem ResNet-101 ImageNet (PyTorch-Encoding resnet101s)",
               "unzip https://s3.us-west-1.wasabisys.com/encoding/models/resnet101s-03a0f310.zip "
               "(the URL of wseg segmentation/lib/net/backbone/resnet.py:19)"),
)
# MCTformer's segmentation init (README:40, run_seg.sh --init_weights): PSA's VOC-trained ResNet-38 classifier.
PSA_RES38_CLS = (
    WeightFile("res38_cls.pth", None, None, "ResNet-38 trained on VOC classification (PSA res38_cls.pth)",
               "download it from PSA's README (github.com/jiwoon-ahn/psa, ResNet-38 weights link)"),
)

# Backbone name -> the files ``weights: imagenet`` accepts, first preferred.
DEFAULTS: dict[str, tuple[WeightFile, ...]] = {
    "resnet50_irn": RESNET50_V1,
    "deit_small_patch16_224": DEIT_SMALL,
    "resnet38": RESNET38_MXNET,
    "resnet101_deeplab": DEEPLAB_COCO,
    "torchvision:resnet50": RESNET50_V1,
    "torchvision:resnet101": RESNET101_V1,
    "resnet101s": RESNET101S,
}
KNOWN_FILES = (*DEFAULTS.values(), PSA_RES38_CLS)  # every file a recipe may name by path


def weights_folder() -> Path:
    """``$FSAE_WEIGHTS`` or ``data/weights``."""
    return Path(os.environ.get("FSAE_WEIGHTS") or DEFAULT_FOLDER)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, wf: WeightFile) -> None:
    """Raise WeightsError when ``path``'s sha256 does not start with the published checksum."""
    if wf.sha256 is None:
        return
    digest = sha256_of(path)
    if not digest.startswith(wf.sha256):
        raise WeightsError(f"{path}: sha256 {digest[:16]}... does not match the published {wf.sha256} of "
                           f"{wf.filename}: the file is corrupt or another file; delete it and fetch {wf.url}")


def _download(wf: WeightFile, folder: Path) -> Path | None:
    """Fetch ``wf`` into ``folder`` with torch.hub (sha256 prefix checked); None when offline / refused."""
    if wf.url is None or wf.how:  # published only as an archive or a conversion: not a direct download
        return None
    import torch.hub

    target = folder / wf.filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(wf.url, str(target), hash_prefix=wf.sha256, progress=False)
    except (OSError, RuntimeError, ValueError):  # offline (URLError is an OSError) or a hash mismatch
        target.unlink(missing_ok=True)
        return None
    return target


def missing_message(files: tuple[WeightFile, ...], folder: Path) -> str:
    """One line: the file(s), checksum, URL and the folder to put them in."""
    wf = files[0]
    parts = [f"{wf.what}: {wf.filename} not found in {folder}/ (set FSAE_WEIGHTS or put it there)"]
    parts.append(f"sha256 {wf.sha256}..." if wf.sha256 else "no published checksum")
    if wf.url:
        parts.append(f"from {wf.url}")
    if wf.how:
        parts.append(wf.how)
    if len(files) > 1:
        parts.append("also accepted: " + ", ".join(f"{o.filename} ({o.url})" for o in files[1:]))
    return "; ".join(parts)


def default_files(backbone: str) -> tuple[WeightFile, ...]:
    if backbone not in DEFAULTS:
        raise WeightsError(f"weights: imagenet has no documented default for backbone {backbone!r} "
                           f"(defaults exist for {', '.join(DEFAULTS)}); give a local file path")
    return DEFAULTS[backbone]


def find_default(backbone: str, download: bool = True) -> Path:
    """The local file of ``backbone``'s default weights: found in the folder (verified) or downloaded."""
    files = default_files(backbone)
    folder = weights_folder()
    for wf in files:
        path = folder / wf.filename
        if path.is_file():
            verify(path, wf)
            return path
    if download and os.environ.get("FSAE_OFFLINE", "") in ("", "0"):
        for wf in files:
            path = _download(wf, folder)
            if path is not None:
                return path
    raise WeightsError(missing_message(files, folder))


def resolve_weights(weights: str | None, backbone: str, download: bool = True) -> str | None:
    """A recipe's ``weights`` entry -> what the loader reads: None, a library keyword, or a local path.

    ``imagenet`` -> the verified default file of ``backbone``; a path naming a known default file
    (e.g. ``data/weights/resnet50-19c8e357.pth``) is verified when present.
    """
    if weights in (None, ""):
        return None
    if weights == IMAGENET:
        return str(find_default(backbone, download))
    path = Path(weights)
    for wf in (f for files in KNOWN_FILES for f in files):
        if path.name == wf.filename and path.is_file():
            verify(path, wf)
    return weights


def read_weight_file(path: str | Path, what: str = "weights", unwrap: bool = True) -> dict:
    """A state dict (or an fsae checkpoint) from a local ``.pt``/``.pth`` file, loaded on the CPU with
    ``weights_only=True``; with ``unwrap``, one level of ``state_dict`` / ``model`` nesting (common
    checkpoint layouts) is removed.

    Raises CheckpointError naming the file when it is missing or cannot be read.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from exc
    if unwrap:
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    return state


# --------------------------------------------------------------------------- recipes' files (fsae weights)

@dataclass(frozen=True)
class RecipeWeights:
    """One recipe's weights entry: ``recipe`` file, the ``field`` (model.weights / net.weights), its
    ``value``, the ``backbone`` it loads into and the candidate ``files`` (empty: trains from scratch
    or a library keyword; a lone path outside the known files: ``WeightFile(name, None, None, ...)``)."""

    recipe: Path
    field: str
    value: str | None
    backbone: str
    files: tuple[WeightFile, ...]


def _entry(recipe: Path, section: dict, field: str, irn: bool) -> RecipeWeights:
    value = section.get("weights")  # absent: the dataclass default None (from scratch)
    backbone = str(section.get("backbone", ""))
    if irn and not backbone.endswith("_irn"):
        backbone = f"{backbone}_irn"  # fsae.refine.irn.network: a torchvision name means its IRN variant
    if value in (None, "", "timm", "efficientnet-lite0-package"):
        files: tuple[WeightFile, ...] = ()
    elif value in (IMAGENET, "torchvision"):
        files = DEFAULTS.get(backbone, ())
    else:
        known = [f for fs in KNOWN_FILES for f in fs if f.filename == Path(value).name]
        files = (known[0],) if known else (WeightFile(Path(value).name, None, None, "a local file"),)
    return RecipeWeights(recipe, field, value, backbone, files)


def recipe_weights(folder: str | Path) -> list[RecipeWeights]:
    """The weights entry of every recipe YAML under ``folder`` (``model.weights``; IRN's ``net.weights``)."""
    import yaml

    out = []
    for recipe in sorted(Path(folder).rglob("*.yaml")):
        data = yaml.safe_load(recipe.read_text()) or {}
        for key, irn in (("model", False), ("net", True)):
            section = data.get(key)
            entry = _entry(recipe, section, f"{key}.weights", irn) if isinstance(section, dict) else None
            if entry is not None:
                out.append(entry)
    return out


def file_status(entry: RecipeWeights, wf: WeightFile, hash_it: bool) -> tuple[Path, str]:
    """Where ``wf`` is looked for and ``present`` / ``missing`` / ``intact`` / ``CORRUPT ...``."""
    given = Path(entry.value) if entry.value not in (IMAGENET, "torchvision") else None
    path = given if given is not None and given.name == wf.filename else weights_folder() / wf.filename
    if not path.is_file():
        return path, "missing"
    if not hash_it:
        return path, "present"
    if wf.sha256 is None:
        return path, "present (no published checksum)"
    digest = sha256_of(path)
    return path, "intact" if digest.startswith(wf.sha256) else f"CORRUPT (sha256 {digest[:16]}...)"


def report_lines(entries: list[RecipeWeights], hash_it: bool) -> tuple[list[str], bool]:
    """Lines of ``fsae weights list|check`` and whether every recipe has a usable file."""
    lines, ok = [], True
    for e in entries:
        head = f"{e.recipe}  {e.field}: {e.value}"
        if not e.files:
            lines.append(f"{head}  ({'trained from scratch' if e.value in (None, '') else 'library download'})")
            continue
        statuses = [(wf, *file_status(e, wf, hash_it)) for wf in e.files]
        usable = any(s in ("present", "intact") or s.startswith("present") for _, _, s in statuses)
        ok = ok and usable
        lines.append(f"{head}  [{e.backbone}]")
        for wf, path, status in statuses:
            sha = f"sha256 {wf.sha256}" if wf.sha256 else "no published checksum"
            lines.append(f"    {wf.filename}  {sha}  {path}: {status}" + (f"  <- {wf.url}" if status == "missing"
                                                                            and wf.url else ""))
    return lines, ok
