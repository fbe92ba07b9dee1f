"""The one place that picks the backend a call of the fused op runs on.

Backends are objects (fastres/backends/base.py) registered here by name. Backends never
import each other: each kernel backend's module is imported on first use, so a missing
compiler or Triton costs nothing until that backend is asked for.

How a call is routed (`choose`):
  1. a backend forced with `use_backend(name)` (this thread) or FASTRES_BACKEND;
  2. otherwise the fastest of eager and the fused backends that can run the call, measured
     on this device on the call signature's first use and remembered (backends/autotune.py,
     like cudnn.benchmark), or read from the persistent cache of an earlier process;
  3. where nothing may be measured (under torch.compile tracing, FASTRES_DISPATCH=static),
     the cache or else the static rule (`static_choice`).
The op records the chosen backend's name in the autograd context, so backward runs on the
backend that ran the forward, whichever thread autograd runs it on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..conventions import HALF_DTYPES, triton_interpreting
from . import autotune
from .base import Backend, Call, KernelBackend
from .eager import EagerBackend

__all__ = ["Backend", "Call", "Decision", "all_backends", "available_backends", "candidates",
           "choose", "choose_signature", "describe_default", "forced_backend", "get",
           "is_recording", "names", "not_recording", "record", "recording", "set_recording_stage",
           "static_choice", "unavailable_reason", "use_backend"]

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
def use_backend(name: str, reason: str = "forced") -> Iterator[None]:
    """Run fastres ops called inside the block (on this thread) on backend `name`.

    Raises at once if the backend cannot run on this machine. The backward of a call made
    inside the block runs on the same backend, wherever autograd runs it. `reason` is what
    fastres.explain reports for the calls.
    """
    unavailable = unavailable_reason(name)
    if unavailable is not None:
        raise RuntimeError(f"fastres backend {name!r} is not available: {unavailable}")
    previous = getattr(_forced, "name", None), getattr(_forced, "reason", None)
    _forced.name, _forced.reason = name, reason
    try:
        yield
    finally:
        _forced.name, _forced.reason = previous


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


def candidates(call: Call) -> List[str]:
    """eager, then the fused backends that can run `call` here, in preference order."""
    return ["eager"] + [name for name in _PREFERENCE.get(call.device_type, [])
                        if get(name).supports(call) is None]


_CACHE: Optional[autotune.DispatchCache] = None
# Decisions measured or loaded in this process, by call signature (Call's fields as a tuple):
# the op's hot path is one dict lookup.
_DECIDED: Dict[tuple, Decision] = {}
_recording = threading.local()


def dispatch_cache() -> autotune.DispatchCache:
    """The process's cache of measured choices (FASTRES_DISPATCH_CACHE says where it is kept)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = autotune.DispatchCache(autotune.default_cache_path())
    return _CACHE


def forget_decisions() -> None:
    """Drop every decision this process made or loaded (the next calls choose again)."""
    global _CACHE
    _DECIDED.clear()
    _CACHE = None


def choose(call: Call, make_run: Optional[Callable[[str], Callable[[], object]]] = None
           ) -> Decision:
    """The backend that runs `call`: forced, else measured (make_run gives the candidates' runs
    on the call's inputs; without it, or with FASTRES_DISPATCH=static, nothing is measured)."""
    return choose_signature(dataclasses.astuple(call), make_run)


def choose_signature(signature: tuple, make_run=None) -> Decision:
    """choose() for a call given as the tuple of Call's fields (what the op has at hand)."""
    forced = forced_backend()
    if forced is not None:
        call = Call(*signature)
        reason = get(forced).supports(call)
        if reason is not None:
            raise RuntimeError(f"fastres backend {forced!r} cannot run this call: {reason}")
        return _recorded(signature, Decision(forced, getattr(_forced, "reason", None)
                                             or "forced"))
    decision = _DECIDED.get(signature)
    if decision is None:
        decision = _decide(Call(*signature), make_run)
    return _recorded(signature, decision)


def _decide(call: Call, make_run) -> Decision:
    names = candidates(call)
    if names == ["eager"]:
        return Decision("eager", "no fused backend runs this call here")
    entry = dispatch_cache().lookup(call.key(), call.device)
    if entry is not None and entry["backend"] in names:
        decision = Decision(entry["backend"], "measured earlier: " + autotune.Measurement(
            **entry).reason().split(": ", 1)[1])
    elif make_run is None or not autotune.measuring_enabled():
        return static_choice(call)
    else:
        measurement = autotune.measure(names, make_run, call.device, call.needs_grad)
        dispatch_cache().store(call.key(), call.device, measurement)
        decision = Decision(measurement.backend, measurement.reason())
    _DECIDED[dataclasses.astuple(call)] = decision
    return decision


def _recorded(signature: tuple, decision: Decision) -> Decision:
    log = getattr(_recording, "log", None)
    if log is not None:
        log.append((getattr(_recording, "stage", None), Call(*signature), decision))
    return decision


def is_recording() -> bool:
    return getattr(_recording, "log", None) is not None


def record(stage, signature: Optional[tuple], decision: Decision) -> None:
    """Log a decision taken outside choose() (e.g. a module running a stage unfused)."""
    log = getattr(_recording, "log", None)
    if log is not None:
        log.append((stage, None if signature is None else Call(*signature), decision))


def set_recording_stage(stage) -> None:
    """Name the stage (the caller's conv module) the next recorded decisions belong to."""
    _recording.stage = stage


@contextlib.contextmanager
def not_recording() -> Iterator[None]:
    """Leave the calls made inside the block out of an enclosing recording (measurements)."""
    previous = getattr(_recording, "log", None)
    _recording.log = None
    try:
        yield
    finally:
        _recording.log = previous


@contextlib.contextmanager
def recording() -> Iterator[List]:
    """Collect (stage, call, decision) of every op call made inside the block (this thread);
    stage is what set_recording_stage named (the drop-in modules name their conv), or None."""
    previous = getattr(_recording, "log", None), getattr(_recording, "stage", None)
    _recording.log, _recording.stage = [], None
    try:
        yield _recording.log
    finally:
        _recording.log, _recording.stage = previous


def describe_default(device: torch.device, dtype: torch.dtype) -> str:
    """In words, what the default picks for calls on `device` of `dtype`."""
    forced = forced_backend()
    if forced is not None:
        return f"{forced} (forced)"
    fused = [n for n in _PREFERENCE.get(device.type, [])
             if get(n).unavailable_reason() is None and dtype in get(n).dtypes]
    if not fused:
        return "eager"
    if not autotune.measuring_enabled():
        return "the static rule (FASTRES_DISPATCH=static): " + static_rule_in_words(
            device, dtype, fused[0])
    return (f"the faster of eager and {', '.join(fused)}, measured per call signature on "
            "first use")


def static_rule_in_words(device: torch.device, dtype: torch.dtype, fused: str) -> str:
    if device.type == "cpu" and dtype not in HALF_DTYPES:
        return (f"{fused} for forward-only calls at stride 1 with L_out >= {CPP_MIN_LENGTH}, "
                "else eager")
    return fused
