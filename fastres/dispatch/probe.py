"""Trust, then time: a candidate runs a call signature only once it computed that geometry
right.

PyTorch's own kernels can be wrong where nobody looked: on x86 CPUs with AVX-512, torch
2.11-2.14's oneDNN float32 conv1d weight gradient is unrelated to the true one for strided
convs with wide padding (benchmarks/upstream_conv1d_wgrad.py reproduces it). So before the
op level times a candidate backend (eager included) for a new signature, it asks the
checker whether that backend computes a small call of the same geometry within
docs/spec.md's bound against the float64 reference; one that does not is left out, with the
answer as its reason.

The checker is fastres.parity.probe, the one user of the reference besides the tests and
the bench; fastres/__init__.py hands it over here (the parity harness runs the op's
backends, so this package cannot import it).
"""
from __future__ import annotations

from typing import Callable, Optional

from ..backends import Call

_checker: Optional[Callable[[Call, str], Optional[str]]] = None


def register(checker: Callable[[Call, str], Optional[str]]) -> None:
    global _checker
    _checker = checker


def check(call: Call, backend: str) -> Optional[str]:
    """None where `backend` may be trusted with `call`, else why not."""
    if _checker is None:
        raise RuntimeError("fastres.dispatch has no correctness checker (import fastres)")
    return _checker(call, backend)
