"""The one place that picks the backend a call of the fused op runs on.

Backends are objects (fastres/backends/base.py) registered here by name. Backends never
import each other: each kernel backend's module is imported on first use, so a missing
compiler or Triton costs nothing until that backend is asked for.

How a call is routed (`choose`):
  1. a backend forced with `use_backend(name)` (this thread) or FASTRES_BACKEND;
  2. otherwise the dispatch policy: the static rule below (`static_choice`). The op records
     the chosen backend's name in the autograd context, so backward runs on the backend
     that ran the forward, whichever thread autograd runs it on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Dict, Iterator, List, Optional

import torch

from ..conventions import HALF_DTYPES, triton_interpreting
from .base import Backend, Call, KernelBackend
from .eager import EagerBackend

__all__ = ["Backend", "Call", "Decision", "all_backends", "available_backends", "choose",
           "describe_default", "forced_backend", "get", "names", "static_choice",
           "unavailable_reason", "use_backend"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

_REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    EagerBackend(),
    KernelBackend("composite", "fastres.backends.composite", ("cpu", "cuda"),
                  _FLOATS + (torch.float64,),
                  "PyTorch ops inside the custom op, with the analytic backward every fused "
                  "backend reproduces"),
    # Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), for tests.
    KernelBackend("triton", "fastres.backends.triton",
                  ("cuda", "cpu") if triton_interpreting() else ("cuda",), _FLOATS,
                  "Triton kernels: implicit-GEMM conv with the BN/ReLU/residual epilogues"),
    KernelBackend("cpp", "fastres.backends.cpp", ("cpu",), _FLOATS + (torch.float64,),
                  "C++ CPU kernels (csrc/cpu): BLAS conv tiles with fused epilogues"),
    KernelBackend("cuda", "fastres.backends.cuda", ("cuda",), _FLOATS,
                  "CUDA C++ kernels (csrc/cuda)"),
)}

# The fused backends the default tries per device type, most preferred first. "composite"
# is never a default: it exists to be compared against.
_PREFERENCE: Dict[str, List[str]] = {"cuda": ["triton", "cuda"], "cpu": ["cpp"]}


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


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend `name` can run on this machine, else why not."""
    return get(name).unavailable_reason()


def available_backends() -> List[str]:
    """The names of the backends that can run on this machine."""
    return [b.name for b in _REGISTRY.values() if b.unavailable_reason() is None]


# ----------------------------------------------------------------------------- forcing

_forced = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastres ops called inside the block (on this thread) on backend `name`.

    Raises at once if the backend cannot run on this machine. The backward of a call made
    inside the block runs on the same backend, wherever autograd runs it.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastres backend {name!r} is not available: {reason}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def forced_backend() -> Optional[str]:
    """The backend use_backend() or, failing that, FASTRES_BACKEND forces; None if none."""
    forced = getattr(_forced, "name", None)
    if forced is None and os.environ.get("FASTRES_BACKEND"):
        forced = os.environ["FASTRES_BACKEND"]
        reason = unavailable_reason(forced)
        if reason is not None:
            raise RuntimeError(f"FASTRES_BACKEND={forced!r} is not available: {reason}")
    return forced


# ----------------------------------------------------------------------------- choosing


@dataclasses.dataclass(frozen=True)
class Decision:
    """The backend a call runs on, and why (what `fastres.explain` reports)."""

    backend: str
    reason: str


# Shortest output length at which the C++ forward beats oneDNN in the static rule.
CPP_MIN_LENGTH = 512


def static_choice(call: Call) -> Decision:
    """The rule used when nothing was measured for `call`.

    CPU: the C++ kernels for forward-only float32 calls at stride 1 on at least
      CPP_MIN_LENGTH outputs, where they measured faster than oneDNN on every shape tried
      (benchmarks/results/cpu-2026-11-23-cpp-default.md); for 16-bit inputs always, because
      plain PyTorch rounds the conv output to 16 bits before batch norm and misses the
      1e-2 gradient bound, and of the float32-accumulating paths the C++ kernels are the
      fastest. Everything else runs eager.
    CUDA: Triton, then the CUDA extension.
    """
    fused = [get(n) for n in _PREFERENCE.get(call.device_type, [])]
    runnable = [b for b in fused if b.supports(call) is None]
    if not runnable:
        return Decision("eager", "no fused backend runs this call here")
    best = runnable[0]
    if call.device_type == "cpu" and call.dtype not in HALF_DTYPES:
        if call.needs_grad or call.stride != 1 or call.length_out < CPP_MIN_LENGTH:
            return Decision("eager", "static rule: on CPU, float32 training, strided and "
                            f"short (< {CPP_MIN_LENGTH} outputs) calls run eager")
    return Decision(best.name, "static rule")


def choose(call: Call) -> Decision:
    """The backend that runs `call`: forced, else the dispatch policy."""
    forced = forced_backend()
    if forced is not None:
        reason = get(forced).supports(call)
        if reason is not None:
            raise RuntimeError(f"fastres backend {forced!r} cannot run this call: {reason}")
        return Decision(forced, "forced")
    return static_choice(call)


def describe_default(device: torch.device, dtype: torch.dtype) -> str:
    """In words, what the default picks for calls on `device` of `dtype`."""
    forced = forced_backend()
    if forced is not None:
        return f"{forced} (forced)"
    fused = [n for n in _PREFERENCE.get(device.type, [])
             if get(n).unavailable_reason() is None and dtype in get(n).dtypes]
    if not fused:
        return "eager"
    if device.type == "cpu" and dtype not in HALF_DTYPES:
        return (f"{fused[0]} for forward-only calls at stride 1 with L_out >= "
                f"{CPP_MIN_LENGTH}, else eager")
    return fused[0]
