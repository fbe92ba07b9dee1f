"""The one timer: every part of fastres that times anything uses `measure`.

The dispatcher (choosing a backend per call or per module), the Triton tile tuner and the
benchmark suites all time candidate implementations of the same work, so all of them use
this loop, and a fix to how fastres times reaches every number it reports or acts on.
It imports nothing of fastres (the ground floor: the library and the bench both build on it).

`measure` times a group of candidates together:

- the first call of each candidate is timed on its own (`first_call_s`): for a
  torch.compile'd candidate it contains the compilation, which is therefore reported
  separately and never mixed into the steady-state numbers;
- warm-up calls follow, then the number of calls per timed block is calibrated so
  that a block lasts at least `min_block_s` (clock resolution and launch jitter
  become negligible);
- rounds interleave the candidates, rotating their order every round, so a slow
  drift of the machine (other jobs, clocks, thermals) hits all of them alike
  instead of whichever ran last (interleaved A/B order);
- each round contributes one sample (block time / calls); the statistics are the
  median and the interquartile range of the samples.

Blocks are timed with CUDA events on a GPU and with time.perf_counter (the clock
torch.utils.benchmark uses) on the CPU. torch.utils.benchmark.Timer and
triton.testing.do_bench each time one function in isolation, so they cannot interleave
candidates, and Timer.timeit runs its own warm-up calls before every block (for a
half-second RNN step that would triple the cost of each sample); the loop here does the
same clock work with interleaving and a single warm-up.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Dict, List

import torch


@dataclasses.dataclass
class TimingConfig:
    """How hard `measure` tries. The presets below match the bench sizes."""

    min_rounds: int = 5          # samples per candidate, at least
    max_rounds: int = 30         # ... and at most
    max_time_s: float = 2.0      # stop adding rounds once the group has run this long
    min_block_s: float = 0.01    # one timed block lasts at least this long
    warmup_s: float = 0.05       # warm-up time per candidate after its first call
    min_warmup_calls: int = 2
    min_block_calls: int = 1     # calls per timed block, at least


TIMING = {
    "quick": TimingConfig(min_rounds=3, max_rounds=3, max_time_s=0.05, min_block_s=0.0,
                          warmup_s=0.0, min_warmup_calls=1),
    "default": TimingConfig(min_rounds=5, max_rounds=25, max_time_s=0.6, min_block_s=0.01,
                            warmup_s=0.02, min_warmup_calls=1),
    "full": TimingConfig(min_rounds=10, max_rounds=50, max_time_s=3.0, min_block_s=0.002,
                         warmup_s=0.1),
}


@dataclasses.dataclass
class Stats:
    """Per-call seconds of one candidate: one sample per round."""

    times_s: List[float]
    number: int                  # calls per timed block
    first_call_s: float          # the very first call (compilation included, if any)

    def quartiles(self) -> List[float]:
        """[p25, median, p75], interpolated between samples (as numpy's default)."""
        t = self.times_s
        return statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else t * 3

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half within 5%)."""
        p25, median, p75 = self.quartiles()
        return (p75 - p25) / median

    def to_json(self) -> Dict[str, object]:
        p25, median, p75 = self.quartiles()
        return {"median_s": median, "p25_s": p25, "p75_s": p75, "min_s": min(self.times_s),
                "spread": self.spread, "rounds": len(self.times_s), **dataclasses.asdict(self)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], object], device: torch.device, number: int) -> float:
    """Seconds per call of `fn` over a block of `number` back-to-back calls (1: one call,
    synchronized on both sides)."""
    if device.type == "cuda" and number > 1:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def measure(candidates: Dict[str, Callable[[], object]], device: torch.device,
            config: TimingConfig = TimingConfig()) -> Dict[str, object]:
    """Time every candidate, interleaved; return name -> Stats, or the exception it raised."""
    results: Dict[str, object] = {}
    for name, fn in candidates.items():
        try:
            first, warm = _time_block(fn, device, 1), []
            while len(warm) < config.min_warmup_calls or sum(warm) < config.warmup_s:
                warm.append(_time_block(fn, device, 1))
            number = max(config.min_block_calls,
                         math.ceil(config.min_block_s / max(min(warm), 1e-7)))
            results[name] = Stats([], number, first)
        except Exception as exc:  # noqa: BLE001 - one broken candidate must not sink the group
            results[name] = exc
    names = [name for name in candidates if isinstance(results[name], Stats)]
    started = time.perf_counter()
    for round_index in range(config.max_rounds):
        if round_index >= config.min_rounds and time.perf_counter() - started > config.max_time_s:
            break
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            stats = results[name]
            if isinstance(stats, Stats):
                try:
                    stats.times_s.append(_time_block(candidates[name], device, stats.number))
                except Exception as exc:  # noqa: BLE001
                    results[name] = exc
    return results
