"""Base CAM methods behind one interface (``fsae.methods.base.Method``)."""

from __future__ import annotations

from fsae.methods.base import Method, Output
from fsae.methods.cam import CAM


def build_method(model_cfg, num_classes: int) -> Method:
    """Build the configured base method (``ModelConfig.method``)."""
    if model_cfg.method == "cam":
        return CAM(
            num_classes,
            backbone=model_cfg.backbone,
            output_stride=model_cfg.output_stride,
            weights=model_cfg.weights,
            background=model_cfg.background,
            score_scale=model_cfg.score_scale,
            background_logit=model_cfg.background_logit,
            **({"width": model_cfg.width, "depth": model_cfg.depth} if model_cfg.backbone == "tinycnn" else {}),
        )
    raise ValueError(f"unknown method {model_cfg.method!r}; available: cam")


__all__ = ["Method", "Output", "CAM", "build_method"]
