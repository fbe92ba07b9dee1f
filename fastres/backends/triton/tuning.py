"""Measured tile choice for the conv GEMMs (opt-in: FASTRES_TRITON_TUNE=1).

The tiles of tiling.gemm_config are a model of the H100, not a measurement. With tuning
on, the first call of each (GEMM, C_in, C_out, K, dtype, length bucket, stride, TMA) key
times the heuristic config and its neighbours (tiling.candidate_configs), interleaved
with fastres.timing.measure (the one timer), and keeps the fastest for the rest of the process.
Tile choices are not written to disk: fastres keeps one cache of choices (the dispatcher's),
and a backend does not reach it (backends never import the dispatcher). Tuning is an opt-in
for experiments; the tiles that win belong in tiling.gemm_config's model.

Side effects: only kernels without any are timed: the forward's statistics pass without
its fused finalize (it writes per-tile partials), dgrad and wgrad (they write their
outputs and partials completely). The running statistics and the batch counter move in
the statistics pass's finalize, which only the real launch after the choice runs, so
tuning a call moves them exactly once.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch

from .tiling import GemmConfig

_CHOSEN: Dict[str, GemmConfig] = {}


def enabled() -> bool:
    return os.environ.get("FASTRES_TRITON_TUNE") == "1"


def key(kind: str, C_in: int, C_out: int, K: int, L: int, dtype: torch.dtype, stride: int,
        tma: bool) -> str:
    bucket = 1 << max(int(L) - 1, 0).bit_length()  # the next power of two
    return (f"{kind}|Cin{C_in}|Cout{C_out}|K{K}|L{bucket}|{str(dtype).replace('torch.', '')}"
            f"|s{stride}|tma{int(tma)}")


def choose(tuning_key: str, candidates: List[GemmConfig], run: Callable[[GemmConfig], None],
           device: torch.device) -> GemmConfig:
    """The config to use: candidates[0] (the heuristic) unless tuning is on, else the
    fastest candidate, timed once per key; `run(config)` launches the kernel with it."""
    if not enabled() or len(candidates) == 1:
        return candidates[0]
    if tuning_key not in _CHOSEN:
        from ...timing import TIMING, measure
        results = measure({repr(c): (lambda c=c: run(c)) for c in candidates}, device,
                          TIMING["quick"])
        timed = [(results[repr(c)].median_s, i) for i, c in enumerate(candidates)
                 if not isinstance(results[repr(c)], Exception)]
        if not timed:  # every candidate failed: the heuristic's error is the one to see
            return candidates[0]
        _CHOSEN[tuning_key] = candidates[min(timed)[1]]
    return _CHOSEN[tuning_key]

