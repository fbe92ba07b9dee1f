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


def tracing() -> Optional[str]:
    """Why code is being traced rather than run (compile, jit), or None."""
    if torch.compiler.is_compiling():
        return "under torch.compile tracing"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "under torch.jit tracing"
    return None


def why_not_measure() -> Optional[str]:
    """None where measuring is safe now, else the reason it is not."""
    traced = tracing()
    if traced is not None:
        return traced
    if functorch_active():
        return "inside a torch.func transform"
    if torch._C._current_graph_task_id() != -1:
        return "inside a backward pass (activation checkpointing recomputes there)"
    if torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        return "under saved-tensor hooks (activation checkpointing)"
    if os.environ.get("FASTRES_DISPATCH", "measure") == "static":
        return "FASTRES_DISPATCH=static"
    return None
