"""How each base method turns a trained network into seeds, pseudo-masks and scores: one place per method.

A ``Protocol`` is what the method's own repository does after training, stage by stage:

- ``resize``: how an inference scale ``s`` rescales the image. ``"pil_bicubic"``: the uint8 image, PIL
  bicubic, to ``round(H * s)`` x ``round(W * s)`` (IRN ``misc/imutils.py:19-22``, SIPE ``tool/imutils.py:19``,
  MCTformer ``datasets.py:140-146``, PPC/EPS ``contrast_infer.py:82-84``). ``"bilinear"``: the normalised
  tensor, bilinear, ``floor(H * s)`` (fsae's earlier behaviour; faster, one batch for all scales).
- ``upsample``: how a network CAM reaches the image size. ``"strided_up"``: bilinear to the next multiple
  of ``upsample_stride`` (IRN's ``get_strided_up_size``), then the top-left ``H x W`` crop (IRN
  ``step/make_cam.py:33,42-44``); ``"direct"``: bilinear straight to ``H x W`` (SIPE ``make_cam.py:57``,
  MCTformer ``engine.py:174``, PPC ``contrast_infer.py:111``).
- ``normalise``: ``"max"``: ``cam / (max + 1e-5)`` (IRN ``make_cam.py:49-52``, SIPE, PPC
  ``contrast_infer.py:202``); ``"minmax"``: ``(cam - min) / (max - min + 1e-8)`` (MCTformer ``engine.py:198``).
- ``strided_cam``: also store the stride-4 CAM the IRN random walk starts from (IRN ``make_cam.py:32,38-49``).
- ``background``: the background plane of seeds and CRF pseudo-masks. ``"threshold"``: the constant
  ``threshold``; ``"own"``: the method's own plane (SIPE's IS-CAM background), plain argmax;
  ``"power"``: ``(1 - max_c cam_c) ** bg_power`` (PSA / EPS / PPC ``_crf_with_alpha``,
  ``contrast_infer.py:154-158``; MCTformer ``engine.py:224-229``).
- ``crf_iterations``: mean-field iterations of the dense CRF (PSA 10; the FSAE
  authors' scripts ``--crf_t 5``, obeychoi0120/wseg@ssl ``script/voc_ppc1.sh:56``, ``script/coco_eps.sh:50-51``).
- ``eval_mode``: ``"fixed"``: score ``threshold`` only (IRN ``step/eval_cam.py:14``, ``cam_eval_thres``
  0.15; halbielee/EPS ``script/coco_eps.sh:43``, ``voc12_eps.sh:41`` ``--thr 0.20``, scored on the saved PNGs
  without CRF by ``evaluate_png.py``, ``coco_eps.sh:51-56``); ``"sweep"``: every threshold of ``sweep`` and the
  best (obeychoi0120/wseg@ssl ``eval.py:155-156``: ``i / 100`` for ``i < --max_th``; the authors' scripts pass
  ``--max_th 50``, 0.00..0.49, ``script/voc_ppc1.sh:86``, ``voc_eps.sh:64``, and ``--max_th 30``, 0.00..0.29,
  ``script/coco_eps.sh:63``; eval.py's own default 60 is not what they ran); ``"first_drop"``: the sweep in order, stopping at the first threshold
  that does not improve (MCTformer ``evaluation.py:139-148``); ``"argmax"``: the seed's own background,
  no threshold (SIPE ``eval_cam.py:18-21``).
- ``eval_split``: the ids scored (Tables 1 and 5-10: VOC ``train``, 1,464 images, even when ``seeds/``
  also holds ``train_aug`` seeds; IRN ``run_sample.py:21``, SIPE ``eval_cam.py:49``, MCTformer ``run.sh``,
  PPC ``script_contrast.sh``: ``DATA=train``).

``PROTOCOLS`` holds one entry per method (picked by ``model.method``) and further named entries a recipe
picks with ``eval.protocol`` (``eps_wseg`` / ``eps_wseg_coco``: the FSAE authors' copy of EPS).

A run's recipe may override any field: ``infer.resize`` / ``infer.upsample`` / ``infer.normalise`` and
``eval.threshold`` / ``eval.sweep`` / ``eval.mode`` / ``eval.split`` / ``eval.background`` /
``eval.bg_power`` / ``eval.crf_iterations`` (``None`` = the method's protocol); CLI flags override both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fsae.errors import ConfigError

RESIZE_MODES = ("pil_bicubic", "bilinear")
UPSAMPLE_MODES = ("strided_up", "direct")
NORMALISE_MODES = ("max", "minmax")
BACKGROUND_FORMS = ("threshold", "own", "power")
EVAL_MODES = ("fixed", "sweep", "first_drop", "argmax")


@dataclass(frozen=True)
class Protocol:
    method: str
    resize: str = "pil_bicubic"
    upsample: str = "direct"
    upsample_stride: int = 16
    normalise: str = "max"
    strided_cam: bool = False
    background: str = "threshold"
    bg_power: float = 1.0
    crf_iterations: int = 10
    threshold: float = 0.25
    sweep: tuple[float, float, float] = (0.0, 0.59, 0.01)  # start, stop (included), step
    eval_mode: str = "sweep"
    eval_split: str = "train"

    def __post_init__(self):
        for name, allowed in (("resize", RESIZE_MODES), ("upsample", UPSAMPLE_MODES),
                              ("normalise", NORMALISE_MODES), ("background", BACKGROUND_FORMS),
                              ("eval_mode", EVAL_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"protocol of {self.method!r}: {name} must be one of {allowed}, "
                                  f"got {getattr(self, name)!r}")
        if len(self.sweep) != 3 or self.sweep[2] <= 0 or self.sweep[1] < self.sweep[0]:
            raise ConfigError(f"protocol of {self.method!r}: sweep must be [start, stop, step] with step > 0 "
                              f"and stop >= start, got {list(self.sweep)}")

    def thresholds(self) -> list[float]:
        """The thresholds this protocol scores, in order (one for ``fixed`` and ``argmax``)."""
        from fsae.evaluate import default_thresholds

        if self.eval_mode in ("fixed", "argmax"):
            return [float(self.threshold)]
        return default_thresholds(*self.sweep)


# The base repositories' own protocols (module docstring cites the files).
PROTOCOLS: dict[str, Protocol] = {
    # IRN (jiwoon-ahn/irn): plain CAM, fixed cam_eval_thres 0.15 on VOC train; CRF as PSA's (conf
    # thresholds live in the IRN stage's own config).
    "cam": Protocol("cam", resize="pil_bicubic", upsample="strided_up", upsample_stride=16, normalise="max",
                    strided_cam=True, background="threshold", threshold=0.15, eval_mode="fixed"),
    # SIPE (chenqi1126/SIPE): IS-CAM with its own background, argmax; pseudo-masks via its IRN variant.
    "sipe": Protocol("sipe", resize="pil_bicubic", upsample="direct", normalise="max", background="own",
                     threshold=0.0, eval_mode="argmax"),
    # MCTformer V2 (xulianuwa/MCTformer@9606597): min-max seeds, sweep 0.00..0.59 until the first drop;
    # its PSA step uses (1 - max)^alpha backgrounds (low/high alpha, fsae psa).
    "mctformer": Protocol("mctformer", resize="pil_bicubic", upsample="direct", normalise="minmax",
                          background="threshold", sweep=(0.0, 0.59, 0.01), eval_mode="first_drop"),
    # PPC on EPS (usr922/wseg esp; the FSAE authors' obeychoi0120/wseg@ssl script/voc_ppc1.sh): threshold 0.22
    # seeds (:50), CRF pseudo-masks on (1 - max)^8 with 5 iterations (:56-57), sweep 0.00..0.49 (:86 --max_th 50).
    "ppc": Protocol("ppc", resize="pil_bicubic", upsample="direct", normalise="max", background="power",
                    bg_power=8.0, crf_iterations=5, threshold=0.22, sweep=(0.0, 0.49, 0.01), eval_mode="sweep"),
    # EPS (halbielee/EPS): seeds at the fixed --thr 0.20 (script/coco_eps.sh:43, voc12_eps.sh:41) saved as PNGs and
    # scored as they are, no CRF (coco_eps.sh:51-56 evaluate_png.py). Its scripts make no CRF masks: `fsae crf`
    # keeps the CRF of the FSAE authors' copy below, (1 - max)^8 with 5 iterations (fsae's choice, as before).
    "eps": Protocol("eps", resize="pil_bicubic", upsample="direct", normalise="max", background="power",
                    bg_power=8.0, crf_iterations=5, threshold=0.20, sweep=(0.0, 0.59, 0.01), eval_mode="fixed"),
    # The FSAE authors' copy of EPS (obeychoi0120/wseg@ssl), what fsae called EPS's protocol before issue 29.
    # VOC (script/voc_eps.sh): --thr 0.20 (:44), CRF t 5 on alpha 8 (:50-51), sweep 0.00..0.49 (:64).
    "eps_wseg": Protocol("eps", resize="pil_bicubic", upsample="direct", normalise="max", background="power",
                         bg_power=8.0, crf_iterations=5, threshold=0.20, sweep=(0.0, 0.49, 0.01), eval_mode="sweep"),
    # COCO (script/coco_eps.sh): --thr 0.22 (:44), CRF t 5 on alpha 8 (:50-51), sweep 0.00..0.29 (:63 --max_th 30).
    "eps_wseg_coco": Protocol("eps", resize="pil_bicubic", upsample="direct", normalise="max", background="power",
                              bg_power=8.0, crf_iterations=5, threshold=0.22, sweep=(0.0, 0.29, 0.01),
                              eval_mode="sweep"),
}
METHOD_PROTOCOLS = ("cam", "sipe", "mctformer", "ppc", "eps")  # the entries model.method picks

# Recipe fields (section, field) -> Protocol field.
_INFER_FIELDS = {"resize": "resize", "upsample": "upsample", "normalise": "normalise"}
_EVAL_FIELDS = {"threshold": "threshold", "sweep": "sweep", "mode": "eval_mode", "split": "eval_split",
                "background": "background", "bg_power": "bg_power", "crf_iterations": "crf_iterations"}


def method_protocol(method: str) -> Protocol:
    if method not in METHOD_PROTOCOLS:
        raise ConfigError(f"model.method {method!r} has no protocol; known: {sorted(METHOD_PROTOCOLS)}")
    return PROTOCOLS[method]


def named_protocol(cfg) -> Protocol:
    """``eval.protocol``'s entry when the recipe names one (ConfigError naming the field when unknown), else
    the entry of ``model.method``."""
    name = getattr(cfg.eval, "protocol", None)
    if name is None:
        return method_protocol(cfg.model.method)
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol {name!r} is not a protocol; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def resolve_protocol(cfg, **flags) -> Protocol:
    """The run's protocol: ``eval.protocol``'s or the method's (``cfg.model.method``), then the recipe's non-None ``infer.*`` /
    ``eval.*`` fields (module docstring), then the non-None ``flags`` (Protocol field names)."""
    changes = {}
    for section, mapping in ((cfg.infer, _INFER_FIELDS), (cfg.eval, _EVAL_FIELDS)):
        for key, target in mapping.items():
            value = getattr(section, key, None)
            if value is not None:
                changes[target] = tuple(value) if target == "sweep" else value
    unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(Protocol)})
    if unknown:
        raise ConfigError(f"unknown protocol field(s) {unknown}")
    changes.update({k: (tuple(v) if k == "sweep" else v) for k, v in flags.items() if v is not None})
    return dataclasses.replace(named_protocol(cfg), **changes)


def protocol_ids(cfg, protocol: Protocol | None = None) -> list[str] | None:
    """The ids the protocol scores (its ``eval_split`` of the run's data set), or None when that split is
    not on this machine."""
    from fsae.data import build_dataset
    from fsae.errors import DataError

    try:
        return list(build_dataset(cfg.data, (protocol or resolve_protocol(cfg)).eval_split).ids)
    except DataError:
        return None
