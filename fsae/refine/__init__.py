"""Pseudo-mask refinement of CAM seeds: dense CRF (``crf``)."""

from fsae.refine.crf import crf_inference, refine_dir, refine_seed, seed_to_probs

__all__ = ["crf_inference", "refine_dir", "refine_seed", "seed_to_probs"]
