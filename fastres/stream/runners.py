"""The runners: what one Stream keeps per backend around the functional core (core.py).

A runner owns the state and position of `batch` streams and whatever its kernel reuses from
step to step (the meta table, a workspace, a CUDA graph); run(x, out) advances them by
x (B, C_in[, n]) of a direct dtype, writing out (contiguous).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import core
from .plan import Plan


class Runner:
    direct_dtypes: Tuple[torch.dtype, ...] = ()   # input dtypes run without a conversion
    # fast(x, out or None) -> out: the whole step with only the kernel's own checks (raising
    # before it changes anything where x or out do not fit); None where there is none.
    fast: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None

    def __init__(self, plan: Plan, batch: int, state: Tensor, position: Tensor):
        self.plan, self.batch, self.state, self.position = plan, batch, state, position

    def run(self, x: Tensor, out: Tensor) -> None:
        raise NotImplementedError


class CppRunner(Runner):
    """csrc/cpu/stream_cpu.cpp: one op call per step or chunk for the whole stack."""

    direct_dtypes = (torch.float32, torch.float64)

    def __init__(self, plan, batch, state, position):
        super().__init__(plan, batch, state, position)
        self.meta = plan.meta(batch)
        # One step's activations; a chunk's are allocated by the kernel.
        self.workspace = torch.empty(4 * batch * plan.max_c, dtype=plan.compute_dtype)
        # The plan's tensors, the meta table, state and position bound once in C++: a step
        # checks only x and out.
        self.fast = core.cpp_bound_step(plan, self.meta, state, position, self.workspace)

    def run(self, x: Tensor, out: Tensor) -> None:
        self.fast(x, out)


class TorchRunner(Runner):
    """core.step_ref: the same semantics in plain PyTorch."""

    direct_dtypes = (torch.float32, torch.float64)

    def run(self, x: Tensor, out: Tensor) -> None:
        core.step_ref(self.plan, x, self.state, self.position, out=out)


class TritonRunner(Runner):
    """The Triton backend's stream kernel: one launch per step or chunk for the whole stack;
    on CUDA, single steps replay a captured CUDA graph of (launch, position += 1)."""

    direct_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, plan, batch, state, position):
        super().__init__(plan, batch, state, position)
        self.meta = plan.meta(batch)
        self.scratch = torch.empty(batch * plan.c_out, dtype=torch.float32, device=plan.device)
        self.graph = None   # (graph, static input, static output), captured on the first step

    def launch(self, x: Tensor, out: Tensor, state: Tensor, position: Tensor) -> None:
        core.step_triton(self.plan, x, state, position, out, self.meta, self.scratch)

    def run(self, x: Tensor, out: Tensor) -> None:
        if not x.is_cuda:   # the interpreter, in tests
            self.launch(x, out, self.state, self.position)
            return
        with torch.cuda.device(x.device):   # Triton and graphs run on the current device
            if x.dim() == 3:
                self.launch(x, out, self.state, self.position)
                return
            graph, static_x, static_out = self.graph or self._capture(x, out)
            static_x.copy_(x)
            graph.replay()
            out.copy_(static_out)

    def _capture(self, x: Tensor, out: Tensor):
        static_x, static_out = torch.zeros_like(x), torch.empty_like(out)
        # Warm up (compile) on a scratch copy of the state, so capturing changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.launch(static_x, static_out, self.state.clone(), self.position.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.launch(static_x, static_out, self.state, self.position)
        self.graph = (graph, static_x, static_out)
        return self.graph


RUNNERS = {"cpp": CppRunner, "torch": TorchRunner, "triton": TritonRunner}
