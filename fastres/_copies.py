"""Copies of a module's tensors that a fast path computed from, and the one rule that says
whether they still hold.

The oneDNN eval program (packed, BN-folded weights) and TemporalConvNet's whole-stack path
(a folded stack) both run from values they took from the module once, and must never return
what stale values give. What `WeightCopies.unchanged` compares on every call, and why:
- the tensors themselves: the same data pointer and shape (a new Parameter, `.data`
  assignment, `load_state_dict` into new storage all move them);
- version counters: every in-place write PyTorch sees (an optimizer step,
  `load_state_dict`, `nn.init`, `with torch.no_grad(): w.mul_(2)`) bumps one. A bump does
  not decide alone: an op declared to mutate a tensor bumps it without a write
  (fastres::conv_bn_relu bumps the running statistics also in eval), so the tensors whose
  counters moved are compared in full with their copies;
- a probe of PROBES values of every tensor (its first and last PROBES // 2; all of a smaller
  one): a write *through* `.data` or a NumPy view leaves the counter alone, and comparing
  every value on every call cost 1.6-2.6 ms of a ResNet1d's 16 ms forward and about an
  eighth of a small TemporalConvNet's call (benchmarks/NOTES.md). Whole-tensor writes through
  `.data` (hand-written EMA updates, re-initialisation, copies from another model) change
  the probe; a partial one may not: write under torch.no_grad() without `.data`, as
  torch.optim, load_state_dict and nn.init do, or call `forget_weights(model)` after it.
`equal` compares every value, for where a call is rare (`Stream.stale()`).
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor, nn

from ._ext import direct, same_values

PROBES = 64
# module -> how many times forget_weights named it (or a module above it)
_GENERATION: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def forget_weights(model: nn.Module) -> None:
    """Make every fast path re-read `model`'s weights (and those of every module inside it)
    on its next call: the oneDNN program re-packs, the whole-stack path refolds. Needed only
    after writing part of a tensor through `.data` or a NumPy view, which leaves its version
    counter alone (see fastres/_copies.py)."""
    for module in model.modules():
        _GENERATION[module] = _GENERATION.get(module, 0) + 1


class WeightCopies:
    """Copies of `tensors` as they are now, owned by a fast path built from `module`."""

    def __init__(self, module: nn.Module, tensors: Sequence[Tensor]):
        self._module = weakref.ref(module)
        self._generation = _GENERATION.get(module, 0)
        with torch.no_grad():
            self._copies = [t.detach().clone() for t in tensors]
        # (version counter, data pointer, element count) per tensor; the compiled check
        # moves a counter here once its tensor proved unchanged.
        self._marks = torch.tensor([[t._version, t.data_ptr(), t.numel()] for t in tensors],
                                   dtype=torch.int64).reshape(-1, 3)

    def equal(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` hold exactly the copied values (every byte compared)."""
        return self._current() and same_values(list(tensors), self._copies)

    def unchanged(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` (the same list, read from the module again) still hold the
        copied values, by the module docstring's rule."""
        if not self._current() or len(tensors) != len(self._copies):
            return False
        compiled = direct("stream_unchanged")
        if compiled is not None:
            return compiled(tensors, self._copies, self._marks, PROBES)
        half = PROBES // 2
        for t, copy, mark in zip(tensors, self._copies, self._marks.tolist()):
            if [t.data_ptr(), t.numel()] != mark[1:] or t.dtype != copy.dtype \
                    or t.shape != copy.shape:
                return False
            small = t.numel() <= PROBES or not t.is_contiguous()
            if t._version != mark[0] or small:
                if not same_values([t], [copy]):
                    return False
            elif not same_values([t.view(-1)[:half], t.view(-1)[-half:]],
                                 [copy.view(-1)[:half], copy.view(-1)[-half:]]):
                return False
        self._marks[:, 0] = torch.tensor([t._version for t in tensors])
        return True

    def _current(self) -> bool:
        module = self._module()
        return module is not None and _GENERATION.get(module, 0) == self._generation
