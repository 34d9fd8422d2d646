"""PSA's affinity labels from CAM seeds (Ahn & Kwak, CVPR 2018, Sec. 3.2; ``infer_cls.py``,
``voc12/data.py`` ``VOC12AffDataset``).

For a seed (``keys`` (K,) in 1..C, ``cams`` (K, H, W) in [0, 1]) and each of two background powers:

1. background score ``(1 - max_k cams_k)^alpha`` in front of the CAMs (``_crf_with_alpha``);
2. PSA's dense CRF on these scores (``fsae.refine.crf.crf_inference`` with PSA's ``crf_inference``
   settings: unary ``-log(clip(score, 1e-5))`` of the unnormalised scores, Gaussian ``sxy=3, compat=3``,
   bilateral ``sxy=80, srgb=13, compat=10``, 10 iterations): the posterior (K+1, H, W).

The low power (``la``, alpha 4) gives a strong background, so its foreground is confident; the high
power (``ha``, alpha 32) a weak one, so its background is confident. Both posteriors are stored
(``aff_labels/<id>.npz``: ``keys``, ``la``, ``ha`` float16), because PSA crops, flips and 8 x 8
average-pools the *scores* before it takes the argmax (``affinity_label_map``), per training crop.

This module is free of torch imports: it runs in the CRF worker processes (``fsae.parallel.map_jobs``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fsae.errors import DataError
from fsae.io import atomic_write, read_image
from fsae.labels import IGNORE_INDEX
from fsae.parallel import map_jobs
from fsae.refine.crf import CRF_DEFAULTS, crf_inference
from fsae.seeds import check_seed, load_seed

NO_SCORE = 1e-5  # voc12/data.py:222: pooled scores all below this = outside the image (padding) -> ignore


def crf_with_alpha(image: np.ndarray, cams: np.ndarray, alpha: float, **crf_params: Any) -> np.ndarray:
    """PSA's ``_crf_with_alpha`` (infer_cls.py:90-102): CRF posterior over ``[background, cams...]``.

    Shape: image (H, W, 3) uint8, cams (K, H, W) in [0, 1] -> (K+1, H, W) float32, summing to 1 over K+1.
    With K = 0 the posterior is all background.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape[0] == 0:
        return np.ones((1, *cams.shape[1:]), dtype=np.float32)
    background = np.power(1 - cams.max(axis=0, keepdims=True), alpha)
    return crf_inference(image, np.concatenate([background, cams]), **{**CRF_DEFAULTS, **crf_params})


def affinity_label_map(la: np.ndarray, ha: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The label map of PSA's affinity labels from the two (cropped, pooled) posteriors (voc12/data.py:222-229).

    Shape: la, ha (K+1, h, w) scores over ``[background, keys...]``, keys (K,) -> (h, w) uint8 in the label
    space: the class where ``la`` says foreground; 0 where ``ha`` says background (it wins over ``la``);
    255 where ``la`` says background and ``ha`` foreground, and where every score is below 1e-5 (padding).
    """
    labels = np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)
    la_arg, ha_arg = la.argmax(axis=0), ha.argmax(axis=0)
    out = labels[la_arg]
    out[la_arg == 0] = IGNORE_INDEX
    out[ha_arg == 0] = 0
    out[np.maximum(la.max(axis=0), ha.max(axis=0)) < NO_SCORE] = IGNORE_INDEX
    return out


def aff_label_scores(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, low_alpha: float = 4.0,
                     high_alpha: float = 32.0, **crf_params: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ``la`` and ``ha`` posteriors of one seed. Shape: -> two (K+1, H, W) float32."""
    keys, cams = check_seed(keys, cams)
    if np.asarray(image).shape[:2] != cams.shape[1:]:
        raise ValueError(f"image size {np.asarray(image).shape[:2]} does not match CAM size {cams.shape[1:]}")
    return crf_with_alpha(image, cams, low_alpha, **crf_params), crf_with_alpha(image, cams, high_alpha, **crf_params)


def save_aff_label(path: str | os.PathLike, keys: np.ndarray, la: np.ndarray, ha: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=np.asarray(keys, np.int64), la=la.astype(np.float16), ha=ha.astype(np.float16))

    return atomic_write(path, write)


def load_aff_label(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``keys`` (K,) int64, ``la``, ``ha`` (K+1, H, W) float32 of an ``aff_labels/<id>.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: affinity label file not found; run `fsae psa` (step labels) first")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, la, ha = data["keys"], data["la"].astype(np.float32), data["ha"].astype(np.float32)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read affinity labels ({exc}); delete it and rerun `fsae psa`") from exc
    if la.shape != ha.shape or la.ndim != 3 or la.shape[0] != len(keys) + 1:
        raise DataError(f"{path}: 'la' {la.shape} and 'ha' {ha.shape} must both be (K+1, H, W) with "
                        f"K = len(keys) = {len(keys)}; delete it and rerun `fsae psa`")
    return keys.astype(np.int64), la, ha


def _aff_label_one(job: tuple[str, str, str, dict[str, Any]]) -> str:
    seed_path, image_path, out_path, params = job
    keys, cams = load_seed(seed_path)
    image = read_image(image_path)
    if image.shape[:2] != cams.shape[1:]:
        raise DataError(f"{seed_path}: CAM size {cams.shape[1:]} does not match image {image_path} "
                        f"size {image.shape[:2]}; seeds must be at full image resolution")
    la, ha = aff_label_scores(image, keys, cams, **params)
    save_aff_label(out_path, keys, la, ha)
    return Path(out_path).stem


def make_aff_labels(seed_dir: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    ids: Iterable[str], low_alpha: float = 4.0, high_alpha: float = 32.0,
                    workers: int | None = None, progress: bool = True, image_ext: str = ".jpg",
                    **crf_params: Any) -> None:
    """``seed_dir/<id>.npz`` + ``image_dir/<id><image_ext>`` -> ``out_dir/<id>.npz`` for every id given.

    Each file is written atomically; ``workers`` processes (default all cores; 1 = in this process),
    the output does not depend on it.
    """
    unknown = sorted(set(crf_params) - set(CRF_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown CRF parameter(s) {unknown}; valid: {sorted(CRF_DEFAULTS)}")
    seed_dir, image_dir, out_dir = Path(seed_dir), Path(image_dir), Path(out_dir)
    params = {"low_alpha": low_alpha, "high_alpha": high_alpha, **crf_params}
    jobs = [(str(seed_dir / f"{i}.npz"), str(image_dir / f"{i}{image_ext}"), str(out_dir / f"{i}.npz"), params)
            for i in ids]
    map_jobs(_aff_label_one, jobs, workers, desc="psa aff labels", progress=progress)
