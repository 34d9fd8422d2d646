"""IRN (Ahn, Cho & Kwak, CVPR 2019) for semantic pseudo-masks: seeds -> IR labels -> class-boundary
network -> random-walk propagation.

- ``ir_labels``: confident foreground / background / ignore from two thresholds + dense CRF.
- ``affinity``: affinity from the boundary map (the pairs, pair labels, loss, walk and training loop it
  shares with PSA are ``fsae.refine.affinity``).
- ``network``: frozen torchvision ResNet + the boundary branch.
- ``train``: training crops and the training step.
- ``walk``: the boundary map's affinity matrix, the walk's start, pseudo-mask.
- ``pipeline``: ``run_irn(run_dir, cfg)``, the ``fsae irn`` stage.

IRN's displacement-field branch (instance segmentation) is not part of it.
"""

from fsae.refine.irn.affinity import affinity_from_boundary
from fsae.refine.irn.config import IRNConfig, load_irn_config
from fsae.refine.irn.ir_labels import ir_label, make_ir_labels
from fsae.refine.irn.network import BoundaryNet, boundary_map
from fsae.refine.irn.pipeline import make_pseudo_masks, run_irn
from fsae.refine.irn.train import train_irn
from fsae.refine.irn.walk import propagate

__all__ = [
    "BoundaryNet", "IRNConfig", "affinity_from_boundary", "boundary_map", "ir_label", "load_irn_config",
    "make_ir_labels", "make_pseudo_masks", "propagate", "run_irn", "train_irn",
]
