"""PSA AffinityNet (Ahn & Kwak, CVPR 2018) for semantic pseudo-masks, the refinement MCTformer uses:
seeds -> affinity labels -> AffinityNet on ResNet-38 -> random walk.

- ``aff_labels``: CRF posteriors of the CAMs under a low and a high background power, their label map.
- ``affinity``: PSA's pair window, the feature affinity ``exp(-mean L1)``, the pair labels.
- ``network``: ResNet-38 + PSA's ``f8_3 / f8_4 / f8_5 / f9`` head.
- ``train``: training crops and the training loop.
- ``walk``: the dense affinity matrix, the random walk, the pseudo-mask.
- ``pipeline``: ``run_psa(run_dir, cfg, image_dir)``, the ``fsae psa`` stage.
"""

from fsae.refine.psa.aff_labels import aff_label_scores, affinity_label_map, crf_with_alpha, make_aff_labels
from fsae.refine.psa.affinity import pair_affinity, pair_window, psa_affinity_labels
from fsae.refine.psa.config import PSAConfig, load_psa_config
from fsae.refine.psa.network import AffinityNet
from fsae.refine.psa.pipeline import make_psa_masks, run_psa
from fsae.refine.psa.train import train_psa
from fsae.refine.psa.walk import dense_affinity, psa_mask

__all__ = [
    "AffinityNet", "PSAConfig", "aff_label_scores", "affinity_label_map", "crf_with_alpha", "dense_affinity",
    "load_psa_config", "make_aff_labels", "make_psa_masks", "pair_affinity", "pair_window", "psa_affinity_labels",
    "psa_mask", "run_psa", "train_psa",
]
