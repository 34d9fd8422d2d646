"""Dense-CRF refinement of CAM seeds into pseudo-masks (Krähenbühl & Koltun, NIPS 2011).

A seed (``seeds/<id>.npz``: ``keys`` (K,) in 1..C, ``cams`` (K, H, W) in [0, 1], see ``fsae.evaluate``)
becomes a probability map over ``[background, keys...]`` (``seed_to_probs``), a fully connected CRF
with a Gaussian (smoothness) and a bilateral (appearance) kernel refines it (``crf_inference``), and
the argmax is written as a VOC-palette label-space PNG (``refine_dir``).

Parameters. The defaults are those of ``crf_inference`` in PSA (Ahn & Kwak, CVPR 2018,
``tool/imutils.py``), which EPS and most CAM-seed repos copy unchanged: Gaussian ``sxy=3, compat=3``,
bilateral ``sxy=80, srgb=13, compat=10``, 10 mean-field iterations, unary ``-log(clip(p, 1e-5))``.
IRN's ``crf_inference_label`` keeps the Gaussian but uses bilateral ``sxy=50, srgb=5`` on a *hard
label* unary (``gt_prob=0.7``), to split confident foreground / background for its affinity labels.
Our unary is a probability map, not a label map, so the PSA values are the matching ones.

The package is ``pydensecrf2`` on PyPI (imports as ``pydensecrf``), a maintained, pip-installable
build of lucasb-eyer/pydensecrf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fsae.settings import at_least, positive
from fsae.errors import DataError, FsaeError
from fsae.seeds import check_seed, load_seed
from fsae.io import read_image, read_mask, write_mask
from fsae.masks_check import mask_warnings, say_warnings, seed_labels
from fsae.memory import named_out_of_memory
from fsae.parallel import map_jobs
from fsae.stamps import folder_digest, ids_part, make_stamp, stage_output



@dataclass
class CrfParams:
    """Dense-CRF settings, the keywords of ``crf_inference``. Defaults: PSA's ``crf_inference`` (module
    docstring); ``IRN_LABEL_CRF`` and ``DEEPLAB_CRF`` are the other stages' values."""

    iterations: int = at_least(0, 10)  # mean-field iterations
    gaussian_sxy: float = positive(3.0)
    gaussian_compat: float = at_least(0, 3.0)
    bilateral_sxy: float = positive(80.0)
    bilateral_srgb: float = positive(13.0)
    bilateral_compat: float = at_least(0, 10.0)

    def kwargs(self) -> dict[str, Any]:
        """``crf_inference`` keywords (only this class's own fields, not a subclass's switches)."""
        return {f.name: getattr(self, f.name) for f in fields(CrfParams)}

    @classmethod
    def from_kwargs(cls, base: "CrfParams | None" = None, **overrides: Any) -> "CrfParams":
        """``base`` (default PSA's) with ``overrides``; ValueError naming an unknown parameter."""
        unknown = sorted(set(overrides) - {f.name for f in fields(CrfParams)})
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {unknown}; valid: {sorted(f.name for f in fields(CrfParams))}")
        return replace(base or CrfParams(), **overrides)


PSA_CRF = CrfParams()
# IRN's crf_inference_label (irn misc/imutils.py): PSA's Gaussian, bilateral sxy 50, srgb 5.
IRN_LABEL_CRF = CrfParams(bilateral_sxy=50.0, bilateral_srgb=5.0)
# DeepLab's CRF (configs/voc/deeplabv2_r101.yaml): Gaussian sxy 1, bilateral sxy 67, srgb 3, compat 4.
DEEPLAB_CRF = CrfParams(gaussian_sxy=1.0, bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)
CRF_DEFAULTS = PSA_CRF.kwargs()
PROB_CLIP = 1e-5  # probabilities are clipped to this before normalising and before -log (PSA's clip)


class CrfDependencyError(FsaeError, ImportError):
    """The dense-CRF package is not installed."""


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise CrfDependencyError(
            f"dense-CRF refinement needs the 'pydensecrf2' package ({exc}); install it with "
            f"`pip install pydensecrf2==1.1` (or reinstall fsae: `pip install -e .`)"
        ) from exc
    return dcrf


def crf_inference(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = PSA_CRF.iterations,
    gaussian_sxy: float = PSA_CRF.gaussian_sxy,
    gaussian_compat: float = PSA_CRF.gaussian_compat,
    bilateral_sxy: float = PSA_CRF.bilateral_sxy,
    bilateral_srgb: float = PSA_CRF.bilateral_srgb,
    bilateral_compat: float = PSA_CRF.bilateral_compat,
) -> np.ndarray:
    """Mean-field posterior of a dense CRF with unary ``-log(clip(probs, 1e-5))``.

    Shape: image (H, W, 3) uint8 RGB, probs (K, H, W) float, summing to 1 over K -> (K, H, W) float32,
    summing to 1 over K. ``iterations=0`` returns ``softmax(-unary)``, i.e. the (clipped,
    renormalised) input. Defaults: PSA's ``crf_inference`` (module docstring).
    """
    dcrf = _densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (K, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    k, h, w = probs.shape
    unary = -np.log(np.clip(probs, PROB_CLIP, 1.0)).reshape(k, -1)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def seed_to_probs(keys: np.ndarray, cams: np.ndarray, threshold: float, background: str = "threshold",
                  bg_power: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Seed -> CRF input: scores over ``[background, keys...]`` and the label of each plane.

    Shape: keys (K,), cams (K, H, W) in [0, 1] -> probs (K+1, H, W) float32, labels (K+1,) uint8
    ``[0, *keys]``.

    ``background = "threshold"``: the background score is the constant ``threshold`` (as in
    ``fsae.evaluate.seed_to_mask``); the scores ``[threshold, cams...]`` are clipped to ``>= 1e-5`` and
    divided by their per-pixel sum. Dividing by a positive number keeps the order of the scores, so
    ``probs.argmax(0)`` (and the argmax of ``crf_inference(..., iterations=0)``) equals ``seed_to_mask``
    except where two scores tie after clipping or float32 rounding. (Softmax would also keep the order but
    flattens CAM scores in [0, 1] to nearly uniform probabilities.)

    ``background = "power"``: the background plane ``(1 - max_k cams_k) ** bg_power`` and the CAMs as
    they are, not renormalised (PSA / EPS / PPC ``_crf_with_alpha``, usr922/wseg esp
    ``contrast_infer.py:154-158``, whose ``unary_from_softmax`` takes ``-log(clip(p, 1e-5))``);
    ``threshold`` is unused.
    """
    keys, cams = check_seed(keys, cams)
    labels = np.concatenate([[0], keys]).astype(np.uint8)
    if background == "power":
        if not np.isfinite(bg_power) or bg_power <= 0:
            raise ValueError(f"bg_power must be a positive number, got {bg_power}")
        peak = cams.max(0, keepdims=True) if len(keys) else np.zeros((1, *cams.shape[1:]), np.float32)
        bg = np.power(np.clip(1.0 - peak, 0.0, None), bg_power)
        return np.concatenate([bg, cams], 0).astype(np.float32), labels
    if background != "threshold":
        raise ValueError(f"CRF background must be 'threshold' or 'power', got {background!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    bg = np.full((1, *cams.shape[1:]), threshold, dtype=np.float32)
    scores = np.maximum(np.concatenate([bg, cams], 0), np.float32(PROB_CLIP))
    probs = scores / scores.sum(0, keepdims=True)
    return probs.astype(np.float32), labels


def refine_seed(
    image: np.ndarray, keys: np.ndarray, cams: np.ndarray, threshold: float, background: str = "threshold",
    bg_power: float = 1.0, **crf_params: Any
) -> np.ndarray:
    """Seed + image -> CRF-refined label-space mask.

    Shape: image (H, W, 3) uint8, keys (K,), cams (K, H, W) -> (H, W) uint8 with values in {0} U keys.
    ``background`` / ``bg_power``: ``seed_to_probs``; ``crf_params`` are ``crf_inference``'s keywords.
    With K = 0 the mask is all background.
    """
    probs, labels = seed_to_probs(keys, cams, threshold, background, bg_power)
    if probs.shape[1:] != np.asarray(image).shape[:2]:
        raise ValueError(f"image size {np.asarray(image).shape[:2]} does not match CAM size {probs.shape[1:]}")
    if len(labels) == 1:
        return np.zeros(probs.shape[1:], dtype=np.uint8)
    posterior = crf_inference(image, probs, **crf_params)
    return labels[np.argmax(posterior, axis=0)]


# ----------------------------------------------------------------------------------------- folders


def _check_crf_params(crf_params: dict[str, Any]) -> None:
    CrfParams.from_kwargs(**crf_params)


def _refine_one(job: tuple[str, str, str, float, dict[str, Any]]) -> str:
    """Worker: refine one image and write its PNG atomically. Returns the id."""
    seed_path, image_path, out_path, threshold, crf_params = job
    keys, cams = load_seed(seed_path)
    image = read_image(image_path)
    if image.shape[:2] != cams.shape[1:]:
        raise DataError(
            f"{seed_path}: CAM size {cams.shape[1:]} does not match image {image_path} size "
            f"{image.shape[:2]}; seeds must be at full image resolution"
        )
    with named_out_of_memory("dense CRF", [image_path], image.shape[:2],
                             "--workers (each worker holds one image's CRF) or resize the image"):
        mask = refine_seed(image, keys, cams, threshold, **crf_params)
    write_mask(out_path, mask)
    return Path(out_path).stem


def refine_dir(
    seed_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    ids: Iterable[str],
    threshold: float,
    workers: int | None = None,
    progress: bool = True,
    image_ext: str = ".jpg",
    background: str = "threshold",
    bg_power: float = 1.0,
    force: bool = False,
    **crf_params: Any,
) -> dict[str, Any]:
    """CRF-refine ``seed_dir/<id>.npz`` with ``image_dir/<id><image_ext>`` into ``out_dir/<id>.png``.

    ``background`` / ``bg_power``: the unary's background plane (``seed_to_probs``).

    Each PNG (VOC palette, label space) is written atomically; ids whose PNG exists (and reads) are
    skipped, so a killed run resumes where it stopped. ``out_dir`` is stamped (``fsae.stamps``) with the
    seed folder's stamp, ``threshold``, the background form and the CRF parameters: a folder made otherwise
    is refused unless ``force``, which builds the new PNGs beside the old ones and swaps them in at the end
    (``fsae.stamps.stage_output``); another process writing ``out_dir`` is refused. ``workers`` processes (default ``os.cpu_count()``; 1 runs
    in this process) share the ids in chunks; the output does not depend on ``workers``.
    ``crf_params``: ``crf_inference`` keywords. Errors name the seed or image file.

    Returns ``{"total", "refined", "skipped", "out_dir", "warnings"}``: ``warnings``, degenerate masks
    (``fsae.masks_check.mask_warnings``, also printed on stderr with ``progress``).
    """
    _check_crf_params(crf_params)
    seed_to_probs(np.zeros(0, np.int64), np.zeros((0, 1, 1), np.float32), threshold, background, bg_power)  # check
    _densecrf()  # fail before any work when the package is missing
    ids = [str(i) for i in ids]
    if not ids:
        raise DataError("no image ids to refine; check the image list")
    seed_dir, image_dir, out_dir = Path(seed_dir), Path(image_dir), Path(out_dir)
    stamp = make_stamp("crf", {"seeds": folder_digest(seed_dir)},
                       {"threshold": float(threshold), "background": background, "bg_power": float(bg_power),
                        **CRF_DEFAULTS, **crf_params})
    # the ids' part of the folder: shards of one list (``fsae crf --shard``) write side by side (fsae.lock)
    with stage_output(out_dir, stamp, force, ("*.png",), read_mask, part=ids_part(ids)) as target:
        todo = [i for i in ids if not (target / f"{i}.png").is_file()]
        jobs = [
            (str(seed_dir / f"{i}.npz"), str(image_dir / f"{i}{image_ext}"), str(target / f"{i}.png"),
             float(threshold), dict(crf_params, background=background, bg_power=float(bg_power)))
            for i in todo
        ]
        map_jobs(_refine_one, jobs, workers, desc="crf", progress=progress)
    warnings = say_warnings(mask_warnings(out_dir, ids, seed_labels(seed_dir, ids)), progress)
    return {"total": len(ids), "refined": len(jobs), "skipped": len(ids) - len(jobs), "out_dir": str(out_dir),
            "warnings": warnings}
