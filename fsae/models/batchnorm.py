"""Frozen BatchNorm: layers that normalise with their running statistics in training too.

``freeze_batch_norm(module)`` turns every BatchNorm layer under ``module`` into ``FrozenStatsBatchNorm``
in place: the same parameters and buffers (state-dict keys unchanged, checkpoints load both ways), the
same ``F.batch_norm`` call in eval mode, and ``train()`` leaves it in eval mode. This is the one way
fsae freezes BN (ResNet-38, SIPE, DeepLab; IRN keeps its whole frozen backbone in eval mode). timm's ``freeze_batch_norm_2d`` was not used: its
``FrozenBatchNorm2d`` computes ``x * scale + shift`` (not bit-identical to ``F.batch_norm``), drops the
``num_batches_tracked`` buffer and freezes the affine parameters, which SIPE trains (docs/decisions.md).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenStatsBatchNorm(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that always runs in eval mode (running statistics, never updated)."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm":
        return super().train(False)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Freeze the statistics of every ``BatchNorm2d`` under ``module`` (in place); returns ``module``.

    The affine parameters keep their ``requires_grad`` (freeze them separately where a recipe does)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm) and type(m) not in (nn.BatchNorm2d, FrozenStatsBatchNorm):
            raise TypeError(f"freeze_batch_norm handles nn.BatchNorm2d, not {type(m).__name__}")
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FrozenStatsBatchNorm  # same object, parameters and buffers: only train() changes
            m.eval()
    return module


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for the BatchNorm layers that train; frozen ones stay."""
    if isinstance(module, _BatchNorm) and not isinstance(module, FrozenStatsBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, sync_batch_norm(child))
    return module
