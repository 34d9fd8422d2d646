"""Inter-pixel relation (IR) labels from CAM seeds (IRN Sec. 3.2, ``cam_to_ir_label``).

For a seed (``keys`` (K,) in 1..C, ``cams`` (K, H, W) in [0, 1]):

1. confident foreground: argmax over ``[fg_threshold, cams...]`` (a HIGH background score, IRN
   conf_fg_thres = 0.30, so only strong CAM pixels win), refined by a dense CRF on the hard labels;
2. confident background: argmax over ``[bg_threshold, cams...]`` (a LOW background score, conf_bg_thres =
   0.05, so only pixels where every CAM is weak stay background), refined the same way;
3. combined as IRN does: a class where (1) says foreground; 0 where both say background; 255 (ignore)
   where (1) says background and (2) foreground.

A seed with its own background plane (SIPE's IS-CAM, ``background`` in the seed file) takes SIPE's
variant (``cam2ir.py:26-40``): (1) the plain argmax over ``[background, cams...]``, (2) the argmax with
the background plane scaled by 0.5 (``SIPE_BG_SCALE``), each CRF-refined, combined as above; the
thresholds are not used.

The CRF is ``fsae.refine.crf.crf_inference`` with IRN's ``crf_inference_label`` settings: the unary of
a hard label map (``gt_prob`` = 0.7 on the label, the rest spread evenly over the other labels, as
pydensecrf's ``unary_from_labels``), Gaussian ``sxy=3, compat=3``, bilateral ``sxy=50, srgb=5,
compat=10``, 10 iterations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fsae.errors import DataError
from fsae.seeds import check_seed, load_seed
from fsae.io import read_image, write_mask
from fsae.labels import IGNORE_INDEX
from fsae.parallel import map_jobs
from fsae.refine.crf import IRN_LABEL_CRF, CrfParams, crf_inference

def crf_label(image: np.ndarray, index: np.ndarray, n_labels: int, gt_prob: float = 0.7,
              **crf_params: Any) -> np.ndarray:
    """Dense-CRF refinement of a hard label map (IRN's ``crf_inference_label``).

    Shape: image (H, W, 3) uint8, index (H, W) int in 0..n_labels-1 -> (H, W) int64 in 0..n_labels-1.
    Probabilities: ``gt_prob`` on the given label, ``(1 - gt_prob) / (n_labels - 1)`` on each other.
    """
    if n_labels < 2:
        return np.zeros(index.shape, dtype=np.int64)
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    params = CrfParams.from_kwargs(IRN_LABEL_CRF, **crf_params).kwargs()
    probs = np.full((n_labels, *index.shape), (1 - gt_prob) / (n_labels - 1), dtype=np.float32)
    np.put_along_axis(probs, index[None].astype(np.int64), np.float32(gt_prob), axis=0)
    return np.argmax(crf_inference(image, probs, **params), axis=0)


SIPE_BG_SCALE = 0.5  # SIPE cam2ir.py:32, the background plane for the confident background


def ir_label(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, fg_threshold: float = 0.30,
             bg_threshold: float = 0.05, gt_prob: float = 0.7, background: np.ndarray | None = None,
             **crf_params: Any) -> np.ndarray:
    """IR label map of one seed (module docstring).

    Shape: image (H, W, 3) uint8, keys (K,), cams (K, H, W), optional ``background`` (H, W) (SIPE's
    variant) -> (H, W) uint8 in {0, 255} U keys.
    """
    keys, cams = check_seed(keys, cams)
    if np.asarray(image).shape[:2] != cams.shape[1:]:
        raise ValueError(f"image size {np.asarray(image).shape[:2]} does not match CAM size {cams.shape[1:]}")
    if bg_threshold > fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must not exceed fg_threshold {fg_threshold}")
    labels = np.concatenate([[0], keys]).astype(np.uint8)

    def confident(plane: np.ndarray) -> np.ndarray:
        scores = np.concatenate([np.broadcast_to(plane, (1, *cams.shape[1:])).astype(np.float32), cams])
        return labels[crf_label(image, np.argmax(scores, axis=0), len(labels), gt_prob, **crf_params)]

    if background is None:  # IRN cam_to_ir_label.py:27-35: constant background planes
        fg_conf, bg_conf = confident(np.float32(fg_threshold)), confident(np.float32(bg_threshold))
    else:  # SIPE cam2ir.py:26-35: its own background plane, then halved
        background = np.asarray(background, dtype=np.float32).reshape(1, *cams.shape[1:])
        fg_conf, bg_conf = confident(background), confident(background * np.float32(SIPE_BG_SCALE))
    out = fg_conf.copy()
    out[fg_conf == 0] = IGNORE_INDEX
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out


def _ir_label_one(job: tuple[str, str, str, dict[str, Any]]) -> str:
    seed_path, image_path, out_path, params = job
    keys, cams, background = load_seed(seed_path, with_background=True)
    image = read_image(image_path)
    if image.shape[:2] != cams.shape[1:]:
        raise DataError(f"{seed_path}: CAM size {cams.shape[1:]} does not match image {image_path} "
                        f"size {image.shape[:2]}; seeds must be at full image resolution")
    write_mask(out_path, ir_label(image, keys, cams, background=background, **params))
    return Path(out_path).stem


def make_ir_labels(seed_dir: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   ids: Iterable[str], fg_threshold: float = 0.30, bg_threshold: float = 0.05,
                   gt_prob: float = 0.7, workers: int | None = None, progress: bool = True,
                   image_ext: str = ".jpg", **crf_params: Any) -> dict[str, Any]:
    """``seed_dir/<id>.npz`` + ``image_dir/<id><image_ext>`` -> ``out_dir/<id>.png`` IR labels.

    PNGs (VOC palette, label space with 255 = ignore) are written atomically; ids whose PNG exists are
    skipped. ``workers`` processes (default all cores; 1 = in this process); the output does not depend
    on it. Returns ``{"total", "written", "skipped", "out_dir"}``.
    """
    CrfParams.from_kwargs(IRN_LABEL_CRF, **crf_params)  # ValueError for an unknown parameter
    ids = [str(i) for i in ids]
    if not ids:
        raise DataError(f"{seed_dir}: no seeds to turn into IR labels")
    seed_dir, image_dir, out_dir = Path(seed_dir), Path(image_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"fg_threshold": fg_threshold, "bg_threshold": bg_threshold, "gt_prob": gt_prob, **crf_params}
    todo = [i for i in ids if not (out_dir / f"{i}.png").is_file()]
    jobs = [(str(seed_dir / f"{i}.npz"), str(image_dir / f"{i}{image_ext}"), str(out_dir / f"{i}.png"), params)
            for i in todo]
    map_jobs(_ir_label_one, jobs, workers, desc="ir labels", progress=progress)
    return {"total": len(ids), "written": len(jobs), "skipped": len(ids) - len(jobs), "out_dir": str(out_dir)}
