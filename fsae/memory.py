"""Out of memory on one image: an ``FsaeError`` naming the image, its size and what to lower.

``torch.cuda.OutOfMemoryError`` ("CUDA out of memory"), the CPU allocator's ``RuntimeError``
("DefaultCPUAllocator: can't allocate memory"), MPS's ("MPS backend out of memory") and numpy's
``MemoryError`` ("Unable to allocate ...") all count; other errors pass through untouched.

This module imports nothing of fsae but the errors (layer 1); it does not import torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from fsae.errors import FsaeError

_MARKS = ("out of memory", "can't allocate memory", "cannot allocate memory", "unable to allocate",
          "not enough memory", "failed to allocate")


class OutOfMemory(FsaeError):
    """A stage ran out of memory on an image."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (module docstring)."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(mark in text for mark in _MARKS)


@contextlib.contextmanager
def named_out_of_memory(stage: str, images: Sequence[str], size: Sequence[int], lower: str) -> Iterator[None]:
    """Turn an allocation failure in the block into ``OutOfMemory``: ``<images>: out of memory in <stage>
    on a HxW image (<first line of the error>); lower <lower>``."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        named = ", ".join(map(str, images[:3])) + (f" (+{len(images) - 3} more)" if len(images) > 3 else "")
        raise OutOfMemory(f"{named}: out of memory in {stage} on a {size[0]}x{size[1]} image ({first}); "
                          f"lower {lower}") from exc
