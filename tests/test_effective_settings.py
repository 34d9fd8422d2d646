"""The VOC / COCO recipes run what the base repositories' code effectively runs (issue 29).

Each test builds the base code's behaviour from a plainly written reference (torch's own SGD called the way
the base code calls it, the base code's arithmetic written out) and checks fsae's recipe and code against it.
The comment on each check names the upstream file:line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fsae.config import load_config
from fsae.train import build_optimizer

REPO = Path(__file__).resolve().parents[1]


class _TwoGroups(nn.Module):
    """A backbone layer and a new layer, as the methods' ``param_groups`` give them."""

    def __init__(self):
        super().__init__()
        self.old, self.new = nn.Linear(2, 2), nn.Linear(2, 2)

    def param_groups(self):
        return [{"params": list(self.old.parameters()), "new": False},
                {"params": list(self.new.parameters()), "new": True}]


# recipe -> the base repository's PolyOptimizer line, which calls torch.optim.SGD(params, lr, weight_decay)
POLY_SGD = {
    "voc/cam.yaml": "irn misc/torchutils.py:12",
    "coco/cam.yaml": "irn misc/torchutils.py:12",
    "voc/sipe.yaml": "SIPE tool/torchutils.py:14",
    "voc/sipe_fsae.yaml": "SIPE tool/torchutils.py:14",
    "coco/sipe.yaml": "SIPE tool/torchutils.py:14",
    "coco/sipe_fsae.yaml": "SIPE tool/torchutils.py:14",
    "voc/ppc_eps.yaml": "usr922/wseg esp util/torchutils.py:7",
    "voc/ppc_eps_fsae.yaml": "usr922/wseg esp util/torchutils.py:7",
    "coco/ppc_eps.yaml": "EPS util/torchutils.py:7",
    "coco/ppc_eps_fsae.yaml": "EPS util/torchutils.py:7",
    "voc/ppc_eps_fsae_authors.yaml": "obeychoi0120/wseg ssl util/torchutils.py:6",
    "coco/ppc_eps_fsae_authors.yaml": "obeychoi0120/wseg ssl util/torchutils.py:6",
}


@pytest.mark.parametrize("recipe", sorted(POLY_SGD))
def test_sgd_momentum_is_the_base_code_s_positional_weight_decay(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    model = _TwoGroups()
    wd = cfg.optim.weight_decay
    # The base code: PolyOptimizer(groups with their weight_decay, lr, weight_decay) -> SGD(params, lr, weight_decay),
    # torch's third positional argument being momentum (POLY_SGD[recipe]).
    base = torch.optim.SGD([{"params": g["params"], "weight_decay": wd} for g in model.param_groups()],
                           cfg.optim.lr, wd)
    ours = build_optimizer(model, cfg.optim)
    assert [g["momentum"] for g in ours.param_groups] == [g["momentum"] for g in base.param_groups], POLY_SGD[recipe]
    assert [g["weight_decay"] for g in ours.param_groups] == [g["weight_decay"] for g in base.param_groups]
    assert [g["nesterov"] for g in ours.param_groups] == [g["nesterov"] for g in base.param_groups]
