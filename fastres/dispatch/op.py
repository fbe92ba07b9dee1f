"""The op level: which backend runs one call of fastres.conv_bn_relu.

    1. a backend forced with use_backend(name) (this thread) or FASTRES_BACKEND;
    2. this process's choice for the call signature (Call's fields), one dict lookup;
    3. a final choice an earlier process stored (cache.py);
    4. where measuring is safe (measure.py) and the caller can make runs: each candidate
       (eager and the fused backends that run the call here) is probed for correctness on
       this geometry (probe.py), the ones that pass are timed (measure.py), and the winner
       is kept; eager wins unless a fused backend beats it by the margin;
    5. otherwise the static rule (static_choice), not remembered, so the signature is
       measured once a call comes where measuring is safe.
Under torch.compile the choice is made at trace time from what does not vary between
compiled calls (trace_time_choice): shapes may be symbolic there.

Trust, then time: a candidate runs a call signature only once it computed that geometry
right. PyTorch's own kernels can be wrong where nobody looked: on x86 CPUs with AVX-512,
torch 2.11-2.14's oneDNN float32 conv1d weight gradient is unrelated to the true one for
strided convs with wide padding (benchmarks/upstream_conv1d_wgrad.py reproduces it). So
before a candidate (eager included) is timed for a new signature, the checker says whether
it computes a small call of the same geometry within docs/spec.md's bound against the
float64 reference; one that does not is left out, with the answer as its reason. The
checker is fastres.parity.probe, the one user of the reference besides the tests and the
bench; fastres/__init__.py hands it over (`checker`): the parity harness runs the
op's backends, so this package cannot import it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .. import backends
from ..backends import Call
from ..conventions import HALF_DTYPES
from .cache import cache
from .choice import FORCED, RULE, STATIC, Choice, module_measuring, record, recording
from .measure import bounded_extent, measure, why_not_measure

# The fused backends the default tries per device type, most preferred first. "composite"
# is never a default: it exists to be compared against.
PREFERENCE: Dict[str, List[str]] = {"cuda": ["triton", "cuda"], "cpu": ["cpp"]}
# Shortest output length at which the C++ forward beats oneDNN in the static rule.
CPP_MIN_LENGTH = 512
_forced = threading.local()  # .name, .reason: use_backend's, on this thread
# The correctness checker: checker(call, backend) is None where `backend` may be trusted with
# `call`, else why not (see the module docstring; set by fastres/__init__.py).
checker: Callable[[Call, str], Optional[str]] = None


@contextlib.contextmanager
def use_backend(name: str, reason: str = "forced") -> Iterator[None]:
    """Run fastres ops called inside the block (on this thread) on backend `name`.

    Raises at once if the backend cannot run on this machine. The backward of a call made
    inside the block runs on the same backend, wherever autograd runs it. `reason` is what
    fastres.explain reports for the calls.
    """
    unavailable = backends.unavailable_reason(name)
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
        if backends.unavailable_reason(forced) is not None:
            raise RuntimeError(f"FASTRES_BACKEND={forced!r} is not available: "
                               f"{backends.unavailable_reason(forced)}")
    return forced


def fused_backends(device_type: str, dtype: torch.dtype) -> List[str]:
    """The fused backends the default tries for `dtype` on `device_type` that run here."""
    return [n for n in PREFERENCE.get(device_type, []) if backends.get(n).unavailable_reason()
            is None and dtype in backends.get(n).dtypes]


def candidates(call: Call) -> List[str]:
    """eager, then the fused backends that can run `call` here, in preference order."""
    return ["eager"] + [name for name in PREFERENCE.get(call.device_type, [])
                        if backends.get(name).supports(call) is None]


def static_choice(call: Call, why: str = "") -> Choice:
    """The rule used where nothing was measured for `call`.

    CPU: the C++ kernels for forward-only float32 calls at stride 1 on at least
      CPP_MIN_LENGTH outputs, where they measured faster than oneDNN on every shape tried
      (benchmarks/results/cpu-2026-11-23-cpp-default.md); for 16-bit inputs always, because
      plain PyTorch rounds the conv output to 16 bits before batch norm and misses the
      1e-2 gradient bound, and of the float32-accumulating paths the C++ kernels are the
      fastest. Everything else runs eager.
    CUDA: Triton, then the CUDA extension.
    """
    suffix = f" ({why})" if why else ""
    fused = candidates(call)[1:]
    if not fused:
        return Choice("op", "eager", "no fused backend runs this call here", RULE)
    if call.device_type == "cpu" and call.dtype not in HALF_DTYPES and (
            call.needs_grad or call.stride != 1 or call.length_out < CPP_MIN_LENGTH):
        return Choice("op", "eager", "static rule: on CPU, float32 training, strided and "
                      f"short (< {CPP_MIN_LENGTH} outputs) calls run eager" + suffix, STATIC)
    return Choice("op", fused[0], "static rule" + suffix, STATIC)


def trace_time_choice(device_type: str, dtype: torch.dtype) -> str:
    """The backend a call runs on inside a torch.compile graph: fixed per graph, chosen from
    what cannot be symbolic (lengths and batch sizes can be). On CPU eager for float32,
    whose PyTorch ops inductor then compiles itself, and the C++ kernels for 16 bits
    (float32 accumulation, docs/spec.md); on CUDA the first fused backend that runs."""
    fused = fused_backends(device_type, dtype)
    return forced_backend() or ("eager" if not fused or (
        device_type == "cpu" and dtype not in HALF_DTYPES) else fused[0])


def choose(signature: tuple, make_run: Optional[Callable[[str], Callable[[], object]]] = None
           ) -> Choice:
    """The backend that runs the call whose Call fields are `signature` (see the module
    docstring). make_run(name) returns one run of backend `name` on private copies of a
    bounded slice of the call's inputs; without it nothing is measured."""
    forced, memory = forced_backend(), cache().memory
    if forced is not None:
        reason = backends.get(forced).supports(Call(*signature))
        if reason is not None:
            raise RuntimeError(f"fastres backend {forced!r} cannot run this call: {reason}")
        choice = Choice("op", forced, getattr(_forced, "reason", None) or "forced", FORCED)
    elif (choice := memory.get(signature)) is None:
        choice = _decide(Call(*signature), make_run)
        if choice.source != STATIC:  # (a static choice waits for a measurement)
            memory[signature] = choice
    record(None, signature, choice)
    return choice


def _decide(call: Call, make_run) -> Choice:
    store, names = cache(), candidates(call)
    if names == ["eager"]:
        return Choice("op", "eager", "no fused backend runs this call here", RULE)
    stored = store.stored(call.key(), call.device)
    if stored is not None and stored.name in names:
        return stored
    # A long call is measured on a bounded slice (measure.bounded_extent): a choice already
    # made for that slice's signature (by a module's measurement, say) answers it.
    batch, length = bounded_extent(call.batch, call.length)
    sliced = dataclasses.astuple(dataclasses.replace(call, batch=batch, length=length))
    if sliced in store.memory:
        return store.memory[sliced]
    why = why_not_measure() or (None if make_run else "nothing to measure with")
    if why is not None:
        return static_choice(call, why)
    excluded = {n: failure for n in names if (failure := checker(call, n)) is not None}
    trusted = [n for n in names if n not in excluded]
    if not trusted:
        # Nothing computes this geometry right: say so loudly, and run PyTorch's kernels.
        choice = Choice("op", "eager", "every candidate failed its correctness probe: "
                        + "; ".join(f"{k}: {v}" for k, v in excluded.items()), RULE,
                        excluded=excluded, final=False)
        warnings.warn(f"fastres: {choice.reason} ({call.key()})", RuntimeWarning, stacklevel=4)
        return choice
    # (one trusted candidate is timed too: its choice shows the time.) On a CPU each run
    # follows a call of eager PyTorch on another copy of the inputs, as a stage in a model
    # follows PyTorch's own layers: switching between oneDNN (PyTorch's convs) and the BLAS
    # the C++ kernels use costs both sides tens of microseconds (measured: a oneDNN conv of
    # 167 us takes 248 us when MKL GEMMs run between its calls), which a candidate timed back
    # to back never shows. Not inside a module's measurement, where the stage runs between
    # its module's other layers anyway (and the module level decides on the whole).
    with recording(keep=False):
        runs = {name: make_run(name) for name in trusted}
        if call.device_type == "cpu" and not module_measuring():
            neighbour = make_run("eager")
            runs = {name: (lambda run=run: (neighbour(), run())) for name, run in runs.items()}
        choice = measure("op", runs, "eager" if "eager" in trusted else trusted[0],
                         call.device, call.needs_grad, excluded)
    store.store(call.key(), call.device, choice)
    store.memory[sliced] = choice
    return choice


def describe_default(device: torch.device, dtype: torch.dtype) -> str:
    """In words, what the default picks for calls on `device` of `dtype`."""
    fused, why, forced = fused_backends(device.type, dtype), why_not_measure(), forced_backend()
    rule = fused and (fused[0] if device.type != "cpu" or dtype in HALF_DTYPES else
                      f"{fused[0]} for forward-only calls at stride 1 with L_out >= "
                      f"{CPP_MIN_LENGTH}, else eager")
    return (f"{forced} (forced)" if forced else "eager" if not fused else
            f"the static rule ({why}): {rule}" if why else
            f"the faster of eager and {', '.join(fused)}, each probed for correctness and "
            "measured per call signature on first use")
