"""TemporalConvNet's whole-stack program: the whole stack by the C++ stream kernel from a
fresh zero state, one candidate ("stack") of the module level's choice
(fastres/dispatch/module.py times it against the blocks; nothing here chooses).

Not streaming: it reuses the stream's fold (plan.py) and kernel for small-batch inference.
Registered as a whole-module program (fastres.backends.register_module_program) when
fastres.stream is imported: this package builds on fastres.nn, which builds on the backends.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _alloc
from ..backends import ModuleProgram, register_module_program
from ..nn.temporal import TemporalBlock, TemporalConvNet, stack_only_reason
from .core import cpp_unavailable as _cpp_unavailable
from .errors import StreamError
from .fold import Snapshot as _Snapshot
from .plan import Plan as _Plan

# The stacked kernel is offered only for batches up to this size and inputs up to this many
# steps in total: it wins through fewer calls and passes over small activations.
WHOLE_SEQUENCE_MAX_BATCH = 8
WHOLE_SEQUENCE_MAX_STEPS = 1 << 16
_CACHE_ATTR = "_fastres_whole_sequence"


class _WholeSequenceCache:
    """What whole_sequence keeps on a TemporalConvNet: the folded plan (None where the model
    cannot stream) with the snapshot it was folded from. Copies and pickles of the module
    start empty."""

    def __init__(self):
        self.snapshot: Optional[_Snapshot] = None
        self.plan: Optional[_Plan] = None

    def plan_for(self, model: TemporalConvNet) -> Optional[_Plan]:
        """The plan of the model as it is now (refolded if anything changed)."""
        if self.snapshot is None or not self.snapshot.matches(model, exact=False):
            self.snapshot, self.plan = _Snapshot(model), None
            try:
                self.plan = _Plan(model)
            except StreamError:
                pass   # (a BN in training mode, ...): the layered path runs
        return self.plan

    def __deepcopy__(self, memo):
        return _WholeSequenceCache()

    def __reduce__(self):
        return (_WholeSequenceCache, ())


def _stacked_forward(plan: _Plan, x: Tensor) -> Tensor:
    """The full causal forward of the plan's stack on x (B, C, L) by one C++ call from a
    fresh zero state (an empty state: nothing kept)."""
    batch = x.shape[0]
    xc = x.to(plan.compute_dtype).contiguous()
    out = _alloc.empty((batch, plan.c_out, x.shape[2]), dtype=plan.compute_dtype,
                       device=x.device)
    empty, no_position = plan.empty_state
    torch.ops.fastres_ext.stream_forward_out.default(
        xc, plan.weights, plan.meta(batch), empty, no_position, empty, out)
    return out.to(x.dtype)


def whole_sequence(model: TemporalConvNet, x: Tensor) -> Optional[Tensor]:
    """model(x) by the C++ stream kernel, or None where that would not give the layered
    output: an eval-mode network of fused TemporalBlocks whose forward is the stack alone,
    on the CPU, no gradient needed, a batch of at most WHOLE_SEQUENCE_MAX_BATCH, the
    extension built, not under tracing. Its folded weights (and every attribute that
    changes the result, a norm's eps included) are checked against the model on every
    call by the rule of fastres/_copies.py (after a partial write through `.data`:
    fastres.forget_weights(model)). The module level never takes it while any module has
    hooks (it skips every module).
    """
    if not _may_run_stacked(model, x):
        return None
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_CACHE_ATTR] = _WholeSequenceCache()
    return _run_stacked(model, cache, x)


class StackProgram(ModuleProgram):
    """whole_sequence as the module level's candidate "stack", offered where it runs
    (never for a training step: the stack holds no batch statistics)."""

    name = "stack"

    def offered(self, module: nn.Module, x: Tensor, needs_grad: bool) -> bool:
        return _may_run_stacked(module, x)

    def run(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        return whole_sequence(module, x)


register_module_program(StackProgram())


def _may_run_stacked(model: TemporalConvNet, x: Tensor) -> bool:
    if not isinstance(model, TemporalConvNet) or model.training or not isinstance(x, Tensor) \
            or x.dim() != 3 or x.device.type != "cpu" \
            or not 1 <= x.shape[0] <= WHOLE_SEQUENCE_MAX_BATCH \
            or not 1 <= x.shape[0] * x.shape[2] <= WHOLE_SEQUENCE_MAX_STEPS \
            or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                           for p in model.parameters())):
        return False
    # Plain twins (fastres.unfuse) stay plain PyTorch; options beyond the stack of blocks
    # (skips, output projection, NLC, ...) are not in the stacked kernel.
    return stack_only_reason(model) is None \
        and all(type(block) is TemporalBlock for block in model.network) \
        and _cpp_unavailable() is None


def _plan_takes(plan: Optional[_Plan], x: Tensor) -> bool:
    return plan is not None and plan.device.type == "cpu" and x.dtype == plan.dtype \
        and x.shape[1] == plan.c_in


def _run_stacked(model: TemporalConvNet, cache: _WholeSequenceCache,
                 x: Tensor) -> Optional[Tensor]:
    """The stacked forward with the model as it is now; None where it no longer streams."""
    plan = cache.plan_for(model)
    return _stacked_forward(plan, x) if _plan_takes(plan, x) else None
