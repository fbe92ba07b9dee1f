"""The one place that picks a backend for the fused op.

A backend is a module exposing

    NAME: str
    DEVICES: tuple of device types it runs on ("cpu", "cuda")
    DTYPES: tuple of torch dtypes it accepts
    unavailable_reason() -> str | None     # None when it can run here
    forward(...), backward(...)            # see fastres/backends/reference.py for the contract

Backends never import each other; this module imports them lazily by name, so a
missing compiler or Triton costs nothing until that backend is asked for.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Dict, Iterator, List, Optional

import torch

# Import path of every backend fastres knows, in no particular order.
_MODULES: Dict[str, str] = {
    "eager": "fastres.backends.eager",
    "reference": "fastres.backends.reference",
    "triton": "fastres.backends.triton",
    "cpp": "fastres.backends.cpp",
    "cuda": "fastres.backends.cuda",
}

# Default preference per device type, fastest first. Triton is absent for CPU tensors:
# TRITON_INTERPRET runs it there, but only for testing (it is orders of magnitude slower).
_PREFERENCE: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "reference"],
    "cpu": ["cpp", "reference"],
}

_forced = threading.local()


def names() -> List[str]:
    """Every backend fastres knows, available here or not."""
    return list(_MODULES)


def _load(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown fastres backend {name!r}; known backends: {names()}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # e.g. a backend module whose dependency is missing
        return _Missing(name, f"cannot import {_MODULES[name]}: {exc}")


class _Missing:
    """Stands in for a backend whose module failed to import."""

    DEVICES = ()
    DTYPES = ()

    def __init__(self, name: str, reason: str):
        self.NAME = name
        self._reason = reason

    def unavailable_reason(self) -> str:
        return self._reason


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend `name` can run on this machine, else why not."""
    return _load(name).unavailable_reason()


def available_backends() -> List[str]:
    """The backends that can run on this machine."""
    return [name for name in _MODULES if unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend `name` for fastres ops called inside the block (this thread).

    Raises RuntimeError at once if the backend cannot run on this machine.
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
    return getattr(_forced, "name", None)


def _requested() -> Optional[str]:
    """The backend forced by use_backend() or, failing that, FASTRES_BACKEND."""
    forced = forced_backend()
    if forced is None and os.environ.get("FASTRES_BACKEND"):
        forced = os.environ["FASTRES_BACKEND"]
        reason = unavailable_reason(forced)
        if reason is not None:
            raise RuntimeError(f"FASTRES_BACKEND={forced!r} is not available: {reason}")
    return forced


# Shortest output length at which the C++ forward beats oneDNN (see use_fused).
CPP_MIN_LENGTH = 512

# Under torch.compile the decision is taken once at trace time (it imports backends,
# which dynamo cannot trace); a later use_backend() around the compiled function does not
# retrace it.
@torch.compiler.assume_constant_result
def use_fused(device: torch.device, dtype: torch.dtype, *, needs_grad: bool, stride: int,
              length_out: int) -> bool:
    """Whether a call runs a fused backend (True) or PyTorch's own kernels ("eager").

    A forced backend is always honoured. By default a fused kernel runs only where it was
    measured faster than eager PyTorch, so the default never makes a user slower:
      CPU:  the C++ backend for forward-only calls at stride 1 on sequences of at least
            CPP_MIN_LENGTH outputs. Its train step (fwd+bwd) ranged 0.84-1.37x eager per
            stage and 0.61-0.87x per block and model (benchmarks/results/
            cpu-2026-11-23-cpp-default.md), and its forward loses to oneDNN on short, wide
            stages (0.5x at C=512, L=32; parity near L=256; 1.2-2.9x from L=1024), as in
            ResNet1d's late stages; everything else stays eager.
            16-bit inputs always take the C++ kernels: plain PyTorch rounds the conv output
            to 16 bits before batch norm, which misses SPEC's 1e-2 gradient bound (2-3e-2),
            and of the paths that meet it the C++ kernels (float32 accumulation) are the
            fastest, 0.6-0.9x plain bf16 on a CPU with fast bf16 convs (the eager path,
            computing in float32, is 0.35-0.7x).
      CUDA: Triton, then the CUDA extension (the default the fused-op issue asks for; not
            yet timed on a GPU: see the README).
    """
    requested = _requested()
    if requested is not None:
        return requested != "eager"
    if device.type == "cpu":
        if unavailable_reason("cpp") is not None or dtype not in _load("cpp").DTYPES:
            return False
        if dtype in (torch.float16, torch.bfloat16):
            return True
        return not needs_grad and stride == 1 and length_out >= CPP_MIN_LENGTH
    return True


def describe_default(device: torch.device, dtype: torch.dtype) -> str:
    """In words, what use_fused and select pick for calls on `device` of `dtype`."""
    if _requested() is not None:
        return f"{_requested()} (forced)"
    if device.type == "cpu":
        if unavailable_reason("cpp") is not None or dtype not in _load("cpp").DTYPES:
            return "eager"
        if dtype in (torch.float16, torch.bfloat16):
            return "cpp"
        return f"cpp for forward-only calls at stride 1 with L_out >= {CPP_MIN_LENGTH}, else eager"
    try:
        return select(device, dtype).NAME
    except RuntimeError:
        return "eager"


def select(device: torch.device, dtype: torch.dtype):
    """The backend module that runs the op for tensors on `device` of `dtype`."""
    forced = _requested()
    if forced == "eager":
        raise RuntimeError("the eager path runs no fused kernel; use_fused() routes it")
    if forced is not None:
        backend = _load(forced)
        if device.type not in backend.DEVICES:
            raise RuntimeError(
                f"fastres backend {forced!r} does not run on {device.type} tensors "
                f"(it runs on: {', '.join(backend.DEVICES)})")
        if dtype not in backend.DTYPES:
            raise RuntimeError(f"fastres backend {forced!r} does not support {dtype}")
        return backend
    for name in _PREFERENCE.get(device.type, ["reference"]):
        backend = _load(name)
        if backend.unavailable_reason() is None and dtype in backend.DTYPES \
                and device.type in backend.DEVICES:
            return backend
    raise RuntimeError(f"no fastres backend runs {dtype} on {device.type}")
