"""Which backend runs each stage of a model, and why; and measuring them all up front.

    report = fastres.explain(model, x)      # run once (state restored), report the choices
    print(report)                           # level, module, call, what runs, why
    fastres.autotune(model, x)              # the same, measuring every choice now

Two levels choose (fastres/dispatch/): the outermost fused module (how its stages run) and
each op call (which backend). `autotune` makes their measurements happen before the first
real step, so the first training step is not slower, and `explain` shows the outcome. Both
run the model on the given inputs with its state restored afterwards: buffers (running
statistics, num_batches_tracked), parameter gradients and the random number generators end
as they began.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

import torch
from torch import nn

from . import dispatch
from .backends import Call


@dataclasses.dataclass
class StageDecision:
    """One choice: where in the model, the call (None for a module-level choice), what runs
    and why."""

    module: str                    # "network.0.conv1" (a stage), "network" (a module), "" (op)
    call: Optional[Call]
    backend: str                   # the backend (op level) or "policy: NAME" (module level)
    reason: str
    level: str = "op"


class DispatchReport(List[StageDecision]):
    """The choices of one model run, in the order they were made."""

    def __str__(self) -> str:
        rows = [["level", "where", "call", "runs"]] + [
            [d.level, d.module or ("(model)" if d.level == "module" else "<op>"),
             d.call.describe() if d.call else "(whole module)" if d.level == "module" else "-",
             d.backend] for d in self]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + why
                         for row, why in zip(rows, ["why"] + [d.reason for d in self]))


def explain(model: nn.Module, *example_inputs, backward: Optional[bool] = None
            ) -> DispatchReport:
    """Run `model` once on `example_inputs` and report every choice made: per outermost
    fused module, how its stages run (plain, stages, one backend, the whole-stack kernel)
    and why; per stage that reached the op, which backend ran it and why (forced, measured
    with the times and the margin, stored by an earlier process, the static rule, hooks).

    backward: also run a backward (default: when the model is training and has parameters
    that require grad), so the choices are those of a training step; without, the model
    runs under no_grad, as inference does. The model's state is restored afterwards.
    """
    names = {module: name for name, module in model.named_modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    if backward is None:
        backward = model.training and bool(params) and torch.is_grad_enabled()
    with dispatch.module.state_restored(model), dispatch.recording() as log:
        with torch.set_grad_enabled(backward):  # no backward: an inference call, under no_grad
            out = model(*example_inputs)
        if backward:
            outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs],
                                allow_unused=True)
    return DispatchReport(
        StageDecision(names.get(where, ""), call, f"policy: {choice.name}" if choice.level ==
                      "module" else choice.name, choice.why(), choice.level)
        for where, call, choice in log)


def autotune(model: nn.Module, *example_inputs, backward: Optional[bool] = None
             ) -> DispatchReport:
    """Measure every choice of `model` now (what the first call of each signature would
    do), even where FASTRES_DISPATCH=static; return the report of `explain`. Final choices
    persist (fastres/dispatch/cache.py) unless FASTRES_DISPATCH_CACHE=0."""
    static = os.environ.pop("FASTRES_DISPATCH", None)
    try:
        return explain(model, *example_inputs, backward=backward)
    finally:
        if static is not None:
            os.environ["FASTRES_DISPATCH"] = static
