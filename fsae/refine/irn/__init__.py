"""IRN (Ahn, Cho & Kwak, CVPR 2019) for semantic pseudo-masks: seeds -> IR labels -> class-boundary
network -> random-walk propagation.

- ``ir_labels``: confident foreground / background / ignore from two thresholds + dense CRF.
- ``affinity``: pair directions within a radius, pair labels, affinity from the boundary map, the loss.
- ``network``: frozen torchvision ResNet + the boundary branch.
- ``train``: training crops and the training loop.
- ``walk``: transition matrix, random walk, pseudo-mask.
- ``pipeline``: ``run_irn(run_dir, cfg)``, the ``fsae irn`` stage.

IRN's displacement-field branch (instance segmentation) is not part of it.
"""

from fsae.refine.irn.affinity import affinity_from_boundary, affinity_labels, affinity_loss
from fsae.refine.irn.config import IRNConfig, load_irn_config
from fsae.refine.irn.ir_labels import ir_label, make_ir_labels
from fsae.refine.irn.network import BoundaryNet, boundary_map
from fsae.refine.irn.pipeline import make_pseudo_masks, run_irn
from fsae.refine.irn.train import train_irn
from fsae.refine.irn.walk import propagate, random_walk, transition_matrix

__all__ = [
    "BoundaryNet", "IRNConfig", "affinity_from_boundary", "affinity_labels", "affinity_loss", "boundary_map",
    "ir_label", "load_irn_config", "make_ir_labels", "make_pseudo_masks", "propagate", "random_walk", "run_irn",
    "train_irn", "transition_matrix",
]
