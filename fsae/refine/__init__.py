"""Pseudo-mask refinement of CAM seeds: dense CRF (``crf``), and two random walks, IRN (``irn``) and PSA
(``psa``), which share their pairs, pair labels, loss, walk and training loop (``affinity``)."""

from fsae.refine.crf import crf_inference, refine_dir, refine_seed, seed_to_probs

__all__ = ["crf_inference", "refine_dir", "refine_seed", "seed_to_probs"]
