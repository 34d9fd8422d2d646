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
    if model_cfg.method in ("eps", "ppc"):  # EPS, and PPC on EPS (fsae/methods/eps.py, ppc.py)
        from fsae.methods.eps import EPS, backbone_options
        from fsae.methods.ppc import PPC

        kwargs = dict(backbone=model_cfg.backbone, output_stride=model_cfg.output_stride, weights=model_cfg.weights,
                      tau=model_cfg.eps.tau, alpha=model_cfg.eps.alpha, **backbone_options(model_cfg))
        if model_cfg.method == "eps":
            return EPS(num_classes, **kwargs)
        return PPC(num_classes, ppc=model_cfg.ppc, **kwargs)
    if model_cfg.method == "sipe":  # fsae/methods/sipe.py
        from fsae.methods.sipe import SIPE

        s = model_cfg.sipe
        return SIPE(num_classes, backbone=model_cfg.backbone, weights=model_cfg.weights,
                    side_channels=s.side_channels, channels=s.channels, freeze_bn=s.freeze_bn,
                    freeze_low_stages=s.freeze_low_stages, score_map=s.score_map,
                    score_scale=model_cfg.score_scale)
    if model_cfg.method == "mctformer":  # MCTformer V2, fsae/methods/mctformer.py
        from fsae.methods.mctformer import MCTformerV2

        m = model_cfg.mct
        return MCTformerV2(num_classes, backbone=model_cfg.backbone, weights=model_cfg.weights,
                           img_size=m.img_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                           drop_path=m.drop_path, attention_layers=m.attention_layers,
                           patch_refine=m.patch_refine, background=model_cfg.background,
                           score_scale=model_cfg.score_scale, background_logit=model_cfg.background_logit)
    raise ValueError(f"unknown method {model_cfg.method!r}; available: cam, eps, ppc, sipe, mctformer")


__all__ = ["Method", "Output", "CAM", "build_method"]
