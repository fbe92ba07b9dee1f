"""Where measuring must not happen, and why.

Measuring runs every candidate several times on private copies of the inputs and takes
gradients with torch.autograd.grad. That is safe in a plain forward and nowhere else:
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

import os
from typing import Optional

import torch


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
