"""TensorBoard logging of the training rows (``train.tensorboard``): ``RUN_DIR/tb/events.out.tfevents.*``.

The training loop writes each ``metrics.csv`` row (loss terms, learning rate, pseudo-label ratios and
accuracy: the paper's Fig. 6) as ``train/<column>`` scalars, and each held-out seed evaluation as
``val/<key>`` (``miou``, ``fpr``, ``fnr``, ``threshold``, ``coverage``), all against the training step.
Values are the same numbers as the CSV rows (float32 in the event file). Watch a run with
``tensorboard --logdir runs/``.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path

import torch

from fsae.errors import FsaeError

SKIP_KEYS = ("step", "epoch")  # the x axis, not curves


def open_writer(log_dir: str | os.PathLike, enabled: bool = True, purge_step: int | None = None):
    """A ``SummaryWriter`` on ``log_dir``, or None when disabled or not the rank-0 process.

    ``purge_step``: on resume, the step of the checkpoint; events a killed run wrote after it are
    hidden, so the curves continue without a duplicated stretch.
    """
    if not enabled:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FsaeError(f"TensorBoard logging needs the 'tensorboard' package ({exc}); `pip install tensorboard` "
                        f"or set train.tensorboard=false") from exc
    return SummaryWriter(log_dir=str(Path(log_dir)), purge_step=purge_step)


def log_scalars(writer, prefix: str, row: dict, step: int, flush: bool = False) -> None:
    """Each finite number of ``row`` as the scalar ``<prefix>/<key>`` at ``step`` (lists, None, NaN skipped)."""
    if writer is None:
        return
    for key, value in row.items():
        if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, Real):
            continue
        value = float(value)
        if math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    if flush:
        writer.flush()


def close_writer(writer) -> None:
    if writer is not None:
        writer.close()


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
