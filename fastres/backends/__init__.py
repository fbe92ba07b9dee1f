"""What exists: every backend fastres knows, as objects, and which of them run here.

Backends never import each other, and nothing here decides which one runs a call: that is
fastres/dispatch/. A kernel backend's module is imported on first use (its class's `load`),
so a missing compiler or Triton costs nothing until that backend is asked for.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..conventions import NORM_LAYER, triton_interpreting
from .base import Backend, Call, KernelBackend
from .eager import EagerBackend

__all__ = ["Backend", "Call", "KernelBackend", "ModuleProgram", "all_backends",
           "available_backends", "get", "module_programs", "names", "register",
           "register_module_program", "unavailable_reason"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class CompositeBackend(KernelBackend):
    name = "composite"
    devices = ("cpu", "cuda")
    dtypes = _FLOATS + (torch.float64,)
    description = ("PyTorch ops inside the custom op, with the analytic backward every fused "
                   "backend reproduces")
    activations = "all"
    layer_norm = True

    def load(self):
        from . import composite
        return composite


class TritonBackend(KernelBackend):
    name = "triton"
    dtypes = _FLOATS
    description = "Triton kernels: implicit-GEMM conv with the BN/ReLU/residual epilogues"
    counts_batches = True     # the training forward's finalize increments the counter
    adds_grad_x = True        # dgrad adds a block's shortcut gradient in its epilogue
    saves_mask_bits = True    # training and residual stages save the final mask as bits
    own_saved_dtype = True    # float16 x-hat in 16-bit training
    streams = True            # fastres/backends/triton/stream_step.py
    activations = "all"       # triton/activation.py
    layer_norm = True         # where a tile holds every channel: C_out up to
                              # triton/tiling.py's LAYER_NORM_MAX_CHANNELS

    @property
    def devices(self):
        # Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), for tests.
        return ("cuda", "cpu") if triton_interpreting() else ("cuda",)

    def supports(self, call: Call) -> Optional[str]:
        reason = super().supports(call)
        if reason is None and call.norm == NORM_LAYER:
            reason = self.module.layer_norm_refusal(call.c_out)
        return reason

    def load(self):
        from . import triton
        return triton


class CppBackend(KernelBackend):
    name = "cpp"
    devices = ("cpu",)
    dtypes = _FLOATS + (torch.float64,)
    description = "C++ CPU kernels (csrc/cpu): BLAS conv tiles with fused epilogues"
    activations = "all"
    layer_norm = True

    def load(self):
        from . import cpp
        return cpp


class CudaBackend(KernelBackend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = _FLOATS
    description = "CUDA C++ kernels (csrc/cuda)"
    activations = "all"
    why_no_layer_norm = ("its conv is cuDNN's and its epilogue kernels walk (batch, channel) "
                         "rows; per-position statistics over the channels are not built")

    def load(self):
        from . import cuda
        return cuda


_REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    EagerBackend(), CompositeBackend(), TritonBackend(), CppBackend(), CudaBackend())}


def names() -> List[str]:
    """Every backend fastres knows, available here or not."""
    return list(_REGISTRY)


def all_backends() -> List[Backend]:
    return list(_REGISTRY.values())


def get(name: str) -> Backend:
    """The backend called `name`; ValueError for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown fastres backend {name!r}; known backends: {names()}") \
            from None


def register(backend: Backend) -> None:
    """Add (or replace) a backend by its name: for tests and out-of-tree kernels."""
    _REGISTRY[backend.name] = backend


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend `name` can run on this machine, else why not."""
    return get(name).unavailable_reason()


def available_backends() -> List[str]:
    """The names of the backends that can run on this machine."""
    return [b.name for b in _REGISTRY.values() if b.unavailable_reason() is None]


class ModuleProgram:
    """A way to run a whole fused module at once: every stage and the arithmetic between
    them in one program, where running the stages one by one pays for each stage's layout,
    dispatch and Python. The module level (fastres/dispatch/module.py) times the programs
    offered for a module against its stages, and runs the fastest; a program chooses nothing.

    name: the module level's policy name. device_type, trains: the device it runs on, and
    whether it runs training steps (forward and backward) or inference (eval, no gradient).
    load(): the module that builds programs (imported on first use, as a KernelBackend's).
    """

    name: str
    device_type = "cpu"
    trains = False

    def load(self):
        raise NotImplementedError

    def program_for(self, module: nn.Module):
        """The module's program as the module is now (a callable x -> module(x), with
        unsupported_reason(x)), or None where none can be built for it."""
        return self.load().program_for(module)

    def offered(self, module: nn.Module, x: Tensor, needs_grad: bool) -> bool:
        """Whether the module level may time this program for module(x)."""
        return x.device.type == self.device_type and module.training == self.trains \
            and needs_grad == self.trains and self.program_for(module) is not None

    def run(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        """module(x), or None where the program cannot run this input or the module as it
        is now (a hook, a mode or a weight changed since it was chosen)."""
        program = self.program_for(module)
        if program is None or program.unsupported_reason(x) is not None:
            return None
        return program(x)


class OneDNNProgram(ModuleProgram):
    name = "onednn"

    def load(self):  # eval: packed weights, fused post-ops
        from . import onednn
        return onednn


class OneDNNTrainProgram(ModuleProgram):
    name = "onednn-train"
    trains = True

    def load(self):  # training: channels-last convs, batch norm in C++
        from . import onednn_train
        return onednn_train


_MODULE_PROGRAMS: Dict[str, ModuleProgram] = {p.name: p for p in (
    OneDNNProgram(), OneDNNTrainProgram())}


def module_programs() -> Dict[str, ModuleProgram]:
    """Every whole-module program fastres knows, by name: the registry itself, which the
    module level reads on every call (also under torch.compile, which traces a dict), and
    which only register_module_program changes."""
    return _MODULE_PROGRAMS


def register_module_program(program: ModuleProgram) -> None:
    """Add (or replace) a whole-module program by its name (fastres.stream registers
    TemporalConvNet's stacked kernel: it builds on fastres.nn, which builds on this)."""
    _MODULE_PROGRAMS[program.name] = program
