"""Which backend runs each stage of a model, and why; and measuring them all up front.

    report = fastres.explain(model, x)      # run once (state restored), report per stage
    print(report)                           # module, call, backend, reason
    fastres.autotune(model, x)              # the same, measuring every stage now

The default dispatch measures each call signature on first use (backends/autotune.py);
`autotune` makes that happen before the first real step, so the first training step is not
slower, and `explain` shows the outcome. Both run the model on the given inputs with its
state restored afterwards: buffers (running statistics, num_batches_tracked), parameter
gradients and the random number generators end as they began.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional

import torch
from torch import nn

from . import backends
from .backends import autotune as _autotune


@dataclasses.dataclass
class StageDecision:
    """One stage call: where it is in the model, its signature, the backend and why."""

    module: str                    # the stage's conv ("network.0.conv1"); "" for a bare op call
    call: Optional[backends.Call]  # None where the stage did not reach the op
    backend: str
    reason: str

    def describe_call(self) -> str:
        c = self.call
        if c is None:
            return "-"
        res = "+res" if c.has_residual else ""
        grad = " grad" if c.needs_grad else ""
        return (f"{str(c.dtype).replace('torch.', '')} B{c.batch} {c.c_in}->{c.c_out} "
                f"L{c.length} K{c.kernel_size} d{c.dilation} s{c.stride} {c.norm}{res}{grad}")


class DispatchReport(List[StageDecision]):
    """The decisions of one model run, in call order (forward stages; see explain)."""

    def __str__(self) -> str:
        from .bench.formatting import text_table
        rows = [[d.module or "<op>", d.describe_call(), d.backend, d.reason] for d in self]
        return text_table(["stage", "call", "backend", "why"], rows)

    def backends_used(self) -> List[str]:
        return sorted({d.backend for d in self})


@contextlib.contextmanager
def _state_restored(model: nn.Module):
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    devices = sorted({b.device.index or 0 for b in model.buffers() if b.is_cuda} |
                     {p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            for p, g in grads.items():
                p.grad = g


def _run_once(model: nn.Module, inputs, backward: Optional[bool]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if backward is None:
        backward = model.training and bool(params) and torch.is_grad_enabled()
    with torch.set_grad_enabled(backward):  # no backward: an inference call, under no_grad
        out = model(*inputs)
    if backward:
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs],
                            allow_unused=True)


def explain(model: nn.Module, *example_inputs, backward: Optional[bool] = None
            ) -> DispatchReport:
    """Run `model` once on `example_inputs` and report, for every fused stage and bare op call,
    which backend ran it and why (forced, measured with the times, cached from an earlier
    measurement, the static rule, or eager because no fused backend runs it).

    backward: also run a backward (default: when the model is training and has parameters
    that require grad), so the decisions are those of a training step; without, the model
    runs under no_grad, as inference does. The model's state is restored afterwards.
    """
    names = {module: name for name, module in model.named_modules()}
    with _state_restored(model), backends.recording() as log:
        _run_once(model, example_inputs, backward)
    return DispatchReport(StageDecision(names.get(stage, ""), call, d.backend, d.reason)
                          for stage, call, d in log)


def autotune(model: nn.Module, *example_inputs, backward: Optional[bool] = None
             ) -> DispatchReport:
    """Measure every stage of `model` now (what the first call of each signature would do),
    even where FASTRES_DISPATCH=static; return the report of `explain`. The choices persist
    (backends/autotune.py) unless FASTRES_DISPATCH_CACHE=0."""
    with _autotune.measuring():
        return explain(model, *example_inputs, backward=backward)
