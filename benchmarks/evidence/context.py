"""The run every section shares: device, sizes, the clock, and how things are timed.

Time: the run has one global deadline (the wrapper's start plus 9 minutes on a GPU). Each
section has a nominal budget; when the run is late, the sections still to come share what
is left in proportion to their nominal budgets (`section_budget`). Sections check their
Budget between items and record what they leave out.

Timing (`time_candidates`): the candidates of one comparison are timed together by
fastres.bench.timing.measure (interleaved rounds; CUDA events on a GPU, perf_counter on the
CPU), then each one's host time per call is taken on its own: the wall time of the Python
call with the device idle before it and no synchronization after it, i.e. the CPU cost of
issuing the work, which is what limits small shapes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastres import backends, dispatch
from fastres.conventions import cudnn_conv_tf32_set
from fastres.bench import timing

from .results import error_text


# --------------------------------------------------------------------------- budgets


def section_budget(nominal_s: float, remaining_s: float, nominal_rest_s: float) -> float:
    """The seconds a section gets: its nominal budget, or its proportional share of what
    is left before the deadline when the sections still to run (itself included, together
    `nominal_rest_s`) no longer fit."""
    if remaining_s <= 0:
        return 0.0
    if remaining_s >= nominal_rest_s:
        return nominal_s
    return remaining_s * nominal_s / nominal_rest_s


class Budget:
    """A section's time: ends at its own budget or at the global deadline, whichever first."""

    def __init__(self, seconds: float, deadline: float):
        self.end = min(time.time() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.time()

    def spent(self, need_s: float = 0.0) -> bool:
        """True when less than `need_s` seconds are left."""
        return self.left() <= need_s


SPENT = "section time budget spent"


# --------------------------------------------------------------------------- the context


@dataclasses.dataclass
class Context:
    device: torch.device
    smoke: bool
    timing: timing.TimingConfig
    host_calls: int                        # host-time samples per candidate
    max_autotune: bool = False             # also time torch.compile(mode="max-autotune")
    budget: Optional[Budget] = None        # the running section's budget
    flush: Callable[[], None] = lambda: None   # write the results so far (throttled)
    # (index, count): this process runs every count-th item of a sharded section, starting
    # at index; the parent merges the shards and then summarizes (correctness.SUMMARIZE).
    shard: Tuple[int, int] = (0, 1)

    def mine(self, index: int) -> bool:
        """Whether item `index` of a sharded section belongs to this process."""
        return index % self.shard[1] == self.shard[0]

    @property
    def whole(self) -> bool:
        """True when this process runs the whole section (not one shard of it)."""
        return self.shard[1] == 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def kernel_backends(self, for_timing: bool = False) -> List[str]:
        """The fused kernel backends that run on this device ("every CUDA backend").

        On a GPU that is triton and cuda. In the smoke run on CPU it is what runs there in
        their place: cpp, and triton in its interpreter except where things are timed (the
        interpreter is a test tool, orders of magnitude slower).
        """
        names = []
        for backend in backends.all_backends():
            if not backend.fused or backend.name == "composite":
                continue
            if backend.unavailable_reason() is not None or self.device.type not in backend.devices:
                continue
            if for_timing and backend.name == "triton" and not self.cuda:
                continue
            names.append(backend.name)
        return names

    def compile(self, fn: Callable, mode: str = "default") -> Callable:
        """torch.compile as the comparison uses it: the whole graph, inductor, `mode`.

        The smoke run compiles with backend="eager" (Dynamo's tracing without code
        generation): it exercises the fullgraph path in a second where inductor's C++
        build on a CPU takes a minute.
        """
        if self.smoke:
            return torch.compile(fn, fullgraph=True, backend="eager")
        return torch.compile(fn, fullgraph=True, mode=None if mode == "default" else mode)

    def synchronize(self) -> None:
        timing.synchronize(self.device)

    def progress(self, items, desc: str):
        """A progress bar over a long loop (on a terminal; silent in logs and tests)."""
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, leave=False, disable=None)


GPU_TIMING = timing.TimingConfig(min_rounds=5, max_rounds=15, max_time_s=0.4, min_block_s=0.005,
                                 warmup_s=0.02, min_warmup_calls=2)
SMOKE_TIMING = timing.TimingConfig(min_rounds=2, max_rounds=2, max_time_s=0.0, min_block_s=0.0,
                                   warmup_s=0.0, min_warmup_calls=1)


# --------------------------------------------------------------------------- timing


def clock_name(device: torch.device) -> str:
    return "CUDA events" if device.type == "cuda" else "perf_counter (CPU)"


def host_seconds(fn: Callable[[], object], device: torch.device, calls: int,
                 max_s: float = 0.1) -> float:
    """Median wall time of the Python call alone: device idle before, no sync after.

    `calls` samples, fewer (at least 3) once they have taken `max_s` with their syncs.
    """
    samples = []
    started = time.perf_counter()
    while len(samples) < calls and (len(samples) < 3 or time.perf_counter() - started < max_s):
        timing.synchronize(device)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    timing.synchronize(device)
    return statistics.median(samples)


def time_candidates(ctx: Context, candidates: Dict[str, Callable[[], object]]
                    ) -> Dict[str, Dict[str, object]]:
    """name -> {status, device_s, spread, rounds, first_call_s, host_s} or {status, error}."""
    measured = timing.measure(candidates, ctx.device, ctx.timing)
    out: Dict[str, Dict[str, object]] = {}
    for name, result in measured.items():
        if isinstance(result, Exception):
            out[name] = {"status": "error", "error": error_text(result)}
            continue
        row = {"status": "ok", "device_s": result.median_s, "spread": result.spread,
               "rounds": len(result.times_s), "first_call_s": result.first_call_s,
               "samples_s": list(result.times_s), "calls_per_sample": result.number}
        try:
            row["host_s"] = host_seconds(candidates[name], ctx.device, ctx.host_calls)
        except Exception as exc:  # noqa: BLE001 - keep the device time
            row["host_s"] = None
            row["host_error"] = error_text(exc)
        out[name] = row
    return out


def forced(fn: Callable, backend: Optional[str]) -> Callable:
    """fn run with fastres forced onto `backend` (None: the default dispatch)."""
    if backend is None:
        return fn

    def run(*args, **kwargs):
        with dispatch.use_backend(backend):
            return fn(*args, **kwargs)
    return run


def tf32_convs(enabled: bool):
    """Set the TF32 mode fastres (and nn.Conv1d) follow for float32 convs; restore it after.
    The new fp32_precision API on torch >= 2.9, allow_tf32 before (conventions)."""
    return cudnn_conv_tf32_set(enabled)
