"""Output allocation shared by the backends, with a poison switch for tests.

Backends allocate every tensor they return through `empty`. With poisoning on
(tests turn it on), new tensors are filled with NaN, so an element a kernel
forgets to write shows up as NaN instead of as stale memory that happens to be 0.
"""
from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("FASTRES_POISON", "") == "1"


def empty(shape, *, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned(enabled: bool = True):
    """Fill every backend output with NaN before the kernel writes it."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous
