"""Base CAM methods behind one interface (``fsae.methods.base.Method``), built by name from ``ModelConfig``."""

from __future__ import annotations

from fsae.methods.base import Method, Output
from fsae.methods.cam import CAM
from fsae.methods.eps import EPS
from fsae.methods.mctformer import MCTformerV2
from fsae.methods.ppc import PPC
from fsae.methods.sipe import SIPE

# ``model.method`` -> class. Adding a base method takes: its file here (a ``Method`` subclass), its entry in this
# table, its model fields in ``fsae.config.ModelConfig`` (if it has settings of its own), its protocol in
# ``fsae.protocol.PROTOCOLS`` (how its seeds and pseudo-masks are made and scored), and its recipe YAMLs.
METHODS: dict[str, type[Method]] = {"cam": CAM, "eps": EPS, "ppc": PPC, "sipe": SIPE, "mctformer": MCTformerV2}


def build_method(model_cfg, num_classes: int) -> Method:
    """Build the configured base method (``ModelConfig.method``)."""
    if model_cfg.method not in METHODS:
        raise ValueError(f"unknown method {model_cfg.method!r}; available: {', '.join(METHODS)}")
    return METHODS[model_cfg.method].from_config(model_cfg, num_classes)


__all__ = ["Method", "Output", "METHODS", "CAM", "EPS", "PPC", "SIPE", "MCTformerV2", "build_method"]
