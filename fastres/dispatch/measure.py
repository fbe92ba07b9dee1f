"""Timing candidates against a baseline: the one rule both levels choose by.

The baseline is what a user would run without fastres (eager PyTorch for an op call, the
plain twin for a module). Every candidate is timed with the one timer (fastres/timing.py),
interleaved, on private inputs, and the fastest wins; anything but the baseline must beat
it by a margin, clear of the timing noise (the spread of the round-by-round ratio of the
two: a burst of load that slows both sides of a round cancels in it), so a noisy
measurement cannot make the default slower than PyTorch. Timed in
isolation, a stage's cost leaves out part of what it costs inside a model (allocator and
cache state, the other layers' threads); the margin absorbs that, larger for an op call
with a backward, where it was larger: on a 2-core CPU a BasicBlock stage's C++ train step
measured 6% faster than eager alone and made the block 15% slower. The module level times a
training step whole (every stage's forward and backward, as they run together), so that
error is not in its numbers: its margin is the forward one, for noise alone.

What is measured on a large input is a bounded slice of it (`bounded_extent`): at most
MAX_MEASURED_POSITIONS positions (batch x length), and at most 1/128 of a long input's, but
not below MIN_MEASURED_POSITIONS. A choice between kernels does not depend on how many more
steps the same call has, and the first call on a 2,000,000-step input must cost about one
plain call, not several: a module's measurement runs each of its few candidates about five
times, its stages' measurements about fifteen, on the slice.

Where measuring must not happen (`why_not_measure`): measuring runs every candidate several
times on private copies of the inputs and takes gradients with torch.autograd.grad. That
is safe in a plain forward and nowhere else:
- under torch.compile or torch.jit tracing, the runs would be traced into the graph;
- inside a torch.func transform (grad, vmap), the copies are wrapped tensors and the
  extra runs become part of the transformed function;
- inside a backward pass (reentrant activation checkpointing recomputes the forward there)
  or under saved-tensor hooks (non-reentrant checkpointing packs every saved tensor, and
  recomputes the forward under them in backward), torch.autograd.grad would run inside
  the engine or hand the hooks tensors they never expected;
- with FASTRES_DISPATCH=static, the user asked for no measuring.
Where measuring is unsafe the stored choice, or else the static rule, runs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import timing
from .choice import BUSY_LOAD_PER_CORE, MEASURED, Choice, provenance

MARGIN_FORWARD = 0.05
MARGIN_BACKWARD = 0.15
# Interleaved rounds; each timed block of calls lasts at least 2 ms (clock resolution).
CONFIG = timing.TimingConfig(min_rounds=5, max_rounds=5, max_time_s=0.0, min_block_s=2e-3,
                             warmup_s=0.0, min_warmup_calls=1)
# The module level's rounds: a whole module is timed fewer times than one stage, in blocks
# of two calls at least: a block's first call runs on the caches the candidate before it
# left, and at one call per block (a training step of tens of ms) that was every sample:
# it hid about a third of a 9% win (ResNet1d's training program, benchmarks/NOTES.md).
MODULE_CONFIG = dataclasses.replace(CONFIG, min_rounds=3, max_rounds=3, min_block_calls=2)
# Passes of those rounds at most: a decision too close to call is timed again, the rounds
# pooled (a median of 3 samples is a noisy thing, and most decisions are clear after one).
PASSES = 3
# Measuring times at most this many positions (batch x length) of an input, and at most
# 1/LONG_INPUT_FRACTION of a long one's, but not below MIN_MEASURED_POSITIONS: below that a
# slice no longer sees the caches the whole input runs through. At 4096 positions a
# TemporalBlock(128) B8 L2048 eval input (16384) was measured at B2, where plain took a fifth
# to a sixth of its whole-input time for a quarter of the work, and the fused paths' lead of
# 30-50% on the whole input shrank into the margin (benchmarks/NOTES.md, issue 21, eighth
# session).
MAX_MEASURED_POSITIONS = 1 << 15
MIN_MEASURED_POSITIONS = 1 << 14
LONG_INPUT_FRACTION = 128


def bounded_extent(batch: int, length: int) -> Tuple[int, int]:
    """(batch, length) of the slice of a (batch, C, length) input that measuring times."""
    positions = batch * length
    budget = min(MAX_MEASURED_POSITIONS,
                 max(MIN_MEASURED_POSITIONS, positions // LONG_INPUT_FRACTION))
    if positions <= budget:
        return batch, length
    length = min(length, budget)
    return max(1, min(batch, budget // length)), length


def measure(level: str, runs: Dict[str, Callable[[], object]], baseline: str, device: str,
            with_backward: bool, excluded: Optional[Dict[str, str]] = None,
            config: Optional[timing.TimingConfig] = None) -> Choice:
    """Time `runs` (name -> one call on private inputs; baseline among them) and choose.

    A candidate that raises is left out with the error as its reason (the baseline's error
    propagates: nothing can run then). A decision too close to call for the samples' noise
    is timed again, up to PASSES in all, the rounds pooled; still too close, the baseline
    runs. The choice is final (stored for later processes) only where the machine was quiet
    and the decision stands clear of the timing noise. config: the rounds (CONFIG, read
    when called, unless given).
    """
    need = MARGIN_BACKWARD if with_backward and level == "op" else MARGIN_FORWARD
    excluded, stats = dict(excluded or {}), {}
    for _ in range(PASSES):
        for name, result in timing.measure({n: r for n, r in runs.items() if n not in excluded},
                                           torch.device(device), config or CONFIG).items():
            if isinstance(result, Exception):
                if name == baseline:
                    raise result
                excluded[name] = f"raised {type(result).__name__}: {result}"
                stats.pop(name, None)
            else:  # (the rounds of every pass pooled)
                stats.setdefault(name, timing.Stats([], 1, 0.0)).times_s.extend(result.times_s)
        best, spread, closeness, ratio = _judge(stats, baseline, need)
        if closeness is None or closeness >= spread:
            break
    details = provenance(device)
    load = details["load_per_core"]
    why_not = f"measured under load ({load:.1f} runnable threads a core)" \
        if load is not None and load > BUSY_LOAD_PER_CORE else None
    if closeness is not None and closeness < spread:
        # Too close to call: the baseline runs (a fused path must win clear of the noise,
        # or a noisy moment could make the default slower than plain).
        best = baseline
        why_not = why_not or (f"decided within the timing noise ({closeness:.0%} from the "
                              f"other answer, samples spread {spread:.0%})")
    if why_not:
        details["not_final"] = why_not + "; measured again by the next process"
    return Choice(level, best, "measured", MEASURED, {n: st.median_s for n, st in stats.items()},
                  spread, need, baseline, excluded, details, final=why_not is None, ratio=ratio)


def _judge(stats: Dict[str, timing.Stats], baseline: str, need: float
           ) -> Tuple[str, float, Optional[float], float]:
    """(the winner by the margin, the decision's noise, how far the decision is from
    flipping, relative, None with nothing to compare; the decisive ratio's median, 0.0
    with nothing to compare).

    The decisive comparison is the baseline against the fastest other candidate, judged
    round by round: the rounds interleave the candidates, so a burst of load slows both
    sides of a round alike and their ratio cancels it. The ratio's median decides; its
    interquartile spread (relative) is the noise."""
    times = {name: st.median_s for name, st in stats.items()}
    rival = min((n for n in times if n != baseline), key=times.get, default=None)
    if rival is None:
        return baseline, stats[baseline].spread, None, 0.0
    ratios = timing.Stats([r / b for r, b in zip(stats[rival].times_s, stats[baseline].times_s)],
                          1, 0.0)
    best = rival if ratios.median_s <= 1 - need else baseline
    return best, ratios.spread, abs((1 - need) / ratios.median_s - 1), ratios.median_s


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def why_not_measure() -> Optional[str]:
    """None where measuring is safe now, else the reason it is not."""
    for unsafe, why in (
            (torch.compiler.is_compiling, "under torch.compile tracing"),
            (lambda: torch.jit.is_tracing() or torch.jit.is_scripting(), "under torch.jit tracing"),
            (functorch_active, "inside a torch.func transform"),
            (lambda: torch._C._current_graph_task_id() != -1,
             "inside a backward pass (activation checkpointing recomputes there)"),
            (lambda: torch._C._autograd._top_saved_tensors_default_hooks(True) is not None,
             "under saved-tensor hooks (activation checkpointing)"),
            (lambda: os.environ.get("FASTRES_DISPATCH") == "static", "FASTRES_DISPATCH=static")):
        if unsafe():
            return why
    return None
