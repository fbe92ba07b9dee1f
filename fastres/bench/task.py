"""What a suite builds (Tasks) and reads (Settings): the shapes every suite module shares,
apart from the loop that runs them (runner.py), which imports the suites."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import timing


@dataclasses.dataclass
class Settings:
    size: str                           # "quick", "default" or "full"
    device: torch.device
    dtypes: List[torch.dtype]
    only: List[str]                     # suite names, in SUITES order
    compile_mode: Optional[str]         # torch.compile mode of the op suite's compiled stage
                                        # ("default", "max-autotune"); None: left out
    model_compile_mode: Optional[str] = None   # the same for whole blocks / models

    def to_json(self) -> Dict[str, object]:
        return {"size": self.size, "device": str(self.device),
                "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
                "only": list(self.only), "compile_mode": self.compile_mode,
                "model_compile_mode": self.model_compile_mode}


@dataclasses.dataclass
class Task:
    """One group of candidates timed together (interleaved) on identical work."""

    suite: str
    name: str                                   # stable id, unique within the suite
    case: Dict[str, object]                     # JSON-able description of the work
    impls: List[str]                            # candidate names, in display order
    make: Callable[[str], Callable[[], object]]  # impl -> a no-argument call doing the work
    compiled: Sequence[str] = ()                # impls built with torch.compile
    baseline: Optional[str] = None              # speedup = baseline median / impl median
    flops: Optional[float] = None               # per call, for TFLOP/s
    bytes: Optional[float] = None               # minimum traffic per call, for GB/s
    items: Optional[int] = None                 # e.g. sequences per call, for items/s
    memory: bool = False                        # also measure peak memory per impl
    timing: Optional[timing.TimingConfig] = None  # overrides the size's timing preset


def compile_fn(fn: Callable, mode: Optional[str]) -> Callable:
    """torch.compile as the benchmarks use it: the whole graph, in `mode`."""
    return torch.compile(fn, fullgraph=True, mode=None if mode in (None, "default") else mode)
