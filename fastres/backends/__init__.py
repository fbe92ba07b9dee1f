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


def select(device: torch.device, dtype: torch.dtype):
    """The backend module that runs the op for tensors on `device` of `dtype`."""
    forced = forced_backend()
    if forced is not None:
        backend = _load(forced)
        if device.type not in backend.DEVICES:
            raise RuntimeError(
                f"fastres backend {forced!r} does not run on {device.type} tensors "
                f"(it runs on: {', '.join(backend.DEVICES)})")
        if dtype not in backend.DTYPES:
            raise RuntimeError(f"fastres backend {forced!r} does not support {dtype}")
        return backend
    if os.environ.get("FASTRES_BACKEND"):
        with use_backend(os.environ["FASTRES_BACKEND"]):
            return select(device, dtype)
    for name in _PREFERENCE.get(device.type, ["reference"]):
        backend = _load(name)
        if backend.unavailable_reason() is None and dtype in backend.DTYPES \
                and device.type in backend.DEVICES:
            return backend
    raise RuntimeError(f"no fastres backend runs {dtype} on {device.type}")
