"""How a stage's network runs on its device: autocast precision, channels-last inputs, DataLoader options.

``precision`` (``train.precision`` / ``infer.precision`` of CAM training and inference, DeepLab, IRN and PSA):
"fp32" runs as it always did, without any context; "bf16" / "fp16" run the network's forward under
``torch.autocast`` and cast its outputs back to fp32, so every loss, softmax, sum over scales and random
walk after it runs in fp32 (docs/precision.md).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fsae.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` "bf16" / "fp16" on ``device``'s type; "fp32": no context at all."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def to_float32(value):
    """Floating tensors of an ``Output`` (or a dict / list / tuple of them) cast to fp32, differentiably."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_float32(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def mixed_forward(model, x: torch.Tensor, *inputs, precision: str = "fp32", channels_last: bool = False):
    """``model(x, *inputs)`` under ``autocast(precision)``, ``x`` in channels-last memory format if asked;
    the outputs come back in fp32 (with their gradient). Shape: whatever ``model`` takes and gives."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if precision == "fp32":
        return model(x, *inputs)
    with autocast(precision, x.device):
        out = model(x, *inputs)
    return to_float32(out)


def grad_scaler(precision: str, device: torch.device):
    """The GradScaler of ``train.precision`` fp16 (None otherwise); ConfigError where fp16 cannot run."""
    if precision != "fp16":
        return None
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ConfigError(f"train.precision fp16: torch has no autocast on {device.type}; use bf16 or fp32")
    return torch.amp.GradScaler(device.type)


def optimizer_step(optimizer, scaler, loss: torch.Tensor) -> None:
    """Backward and step; fp16 (``scaler``): the scaled loss, a step with inf/NaN gradients skipped."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def loader_options(workers: int, device, prefetch: int = 2, persistent: bool = True) -> dict:
    """Keyword arguments of a training ``DataLoader``: pinned host memory when the device is CUDA (faster
    copies to it), and with worker processes, ``prefetch`` batches per worker in flight and (``persistent``)
    workers kept from one epoch to the next instead of started again (torch's defaults: 2, not kept)."""
    options = {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda"}
    if workers > 0:
        options.update(prefetch_factor=prefetch, persistent_workers=persistent)
    return options
