"""TemporalConvNet.forward's whole-sequence fast path: the whole stack by the C++ stream
kernel from a fresh zero state, where that measured faster than the layered blocks.

Not streaming: it reuses the stream's fold (plan.py) and kernel for small-batch inference.
Registered with fastres.nn.temporal (register_whole_network_path) when fastres.stream is
imported.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _alloc
from ..nn.temporal import TemporalBlock, TemporalConvNet, register_whole_network_path
from .core import cpp_unavailable as _cpp_unavailable
from .errors import StreamError
from .fold import Snapshot as _Snapshot
from .plan import Plan as _Plan

# whole_sequence tries the stacked kernel only for batches up to this size and inputs up to
# this many steps in total: it wins through fewer calls and passes over small activations,
# and the first call of each signature pays for timing both paths.
WHOLE_SEQUENCE_MAX_BATCH = 8
WHOLE_SEQUENCE_MAX_STEPS = 1 << 16
# The stacked kernel must measure at least this much faster to be chosen.
WHOLE_SEQUENCE_MIN_GAIN = 1.1
_CACHE_ATTR = "_fastres_whole_sequence"


class _WholeSequenceCache:
    """What whole_sequence keeps on a TemporalConvNet: the folded plan (None where the model
    cannot stream) with the snapshot it was folded from, and the measured winner per input
    signature. Copies and pickles of the module start empty."""

    def __init__(self):
        self.snapshot: Optional[_Snapshot] = None
        self.plan: Optional[_Plan] = None
        self.choices: Dict[Tuple, bool] = {}   # signature -> the stacked kernel is faster

    def plan_for(self, model: TemporalConvNet) -> Optional[_Plan]:
        """The plan of the model as it is now (refolded if anything changed)."""
        if self.snapshot is None or not self.snapshot.matches(model):
            layout = self.plan.layout if self.plan is not None else None
            self.snapshot, self.plan = _Snapshot(model), None
            try:
                self.plan = _Plan(model)
            except StreamError:
                pass   # (a BN in training mode, ...): the layered path runs
            if (self.plan.layout if self.plan is not None else None) != layout:
                self.choices = {}   # timings hold for the same layers only
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


@register_whole_network_path
def whole_sequence(model: TemporalConvNet, x: Tensor) -> Optional[Tensor]:
    """TemporalConvNet.forward's fast path: model(x) by the C++ stream kernel, or None where
    the layered path (model.network(x)) should run.

    The kernel runs where it gives the layered output: an eval-mode network of fused
    TemporalBlocks on the CPU, no gradient needed, a batch of at most
    WHOLE_SEQUENCE_MAX_BATCH, the extension built, not under tracing or torch.compile. Its
    folded weights are checked against the model's current values on every call. The
    first call of each signature (B, L rounded up to a power of two, dtype, torch's thread
    count) times both paths, checks included, with a few interleaved calls and keeps the
    winner on the module: where it has been measured, this never runs the slower path.
    (Rounding L keeps inputs of varying length from paying for a measurement each.)
    """
    if not _may_run_stacked(model, x):
        return None
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_CACHE_ATTR] = _WholeSequenceCache()
    signature = (x.shape[0], 1 << (x.shape[2] - 1).bit_length(), x.dtype,
                 torch.get_num_threads())
    faster = cache.choices.get(signature)
    if faster is None:
        plan = cache.plan_for(model)
        if not _plan_takes(plan, x):
            return None
        faster = cache.choices[signature] = _stacked_is_faster(model, cache, x)
    return _run_stacked(model, cache, x) if faster else None


def _may_run_stacked(model: TemporalConvNet, x: Tensor) -> bool:
    if model.training or not isinstance(x, Tensor) or x.dim() != 3 or x.device.type != "cpu" \
            or not 1 <= x.shape[0] <= WHOLE_SEQUENCE_MAX_BATCH \
            or not 1 <= x.shape[0] * x.shape[2] <= WHOLE_SEQUENCE_MAX_STEPS \
            or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                           for p in model.parameters())):
        return False
    # Plain twins (fastres.unfuse) stay plain PyTorch.
    return all(type(block) is TemporalBlock for block in model.network) \
        and _cpp_unavailable() is None


def _plan_takes(plan: Optional[_Plan], x: Tensor) -> bool:
    return plan is not None and plan.device.type == "cpu" and x.dtype == plan.dtype \
        and x.shape[1] == plan.c_in


def _run_stacked(model: TemporalConvNet, cache: _WholeSequenceCache,
                 x: Tensor) -> Optional[Tensor]:
    """The stacked forward with the model as it is now; None where it no longer streams."""
    plan = cache.plan_for(model)
    return _stacked_forward(plan, x) if _plan_takes(plan, x) else None


def _stacked_is_faster(model: TemporalConvNet, cache: _WholeSequenceCache, x: Tensor) -> bool:
    """A few interleaved timed calls of both paths (fastres.bench.timing.measure)."""
    from ..bench import timing
    config = timing.TimingConfig(min_rounds=5, max_rounds=5, max_time_s=0.0, min_block_s=0.0,
                                 warmup_s=0.0, min_warmup_calls=1)
    with torch.no_grad():
        stats = timing.measure({"stacked": lambda: _run_stacked(model, cache, x),
                                "layered": lambda: model.network(x)}, x.device, config)
    if any(isinstance(s, Exception) for s in stats.values()):
        return False
    return stats["stacked"].median_s * WHOLE_SEQUENCE_MIN_GAIN < stats["layered"].median_s
