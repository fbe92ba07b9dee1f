"""first-call suite: what the first call on a long input costs, dispatch included.

The default dispatch measures on a signature's first call (fastres/dispatch/). On a long
input that must cost a bounded slice's worth of timing, not several full calls: this suite
times the very first inference call of a fresh TemporalConvNet (new modules, nothing
chosen yet in the process) against a plain call of the same network on the same input.

    plain          fastres.unfuse(model)(x), warm
    fastres first  a fresh copy of the fused model, its first call (every choice made in it)
    fastres        the fused model, warm (its choices made)
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch

import fastres

from . import timing
from .task import Settings, Task

NAME = "first-call"
TITLE = "First call on a long input (dispatch included) vs plain"

# (inputs, channels, kernel, batch, length) per size
_SIZES = {"quick": (8, [16] * 2, 3, 1, 1 << 16),
          "default": (8, [32] * 4, 3, 1, 2_000_000),
          "full": (8, [32] * 4, 3, 1, 2_000_000)}


def unavailable_reason(settings: Settings) -> Optional[str]:
    return None


def tasks(settings: Settings) -> List[Task]:
    inputs, channels, k, batch, length = _SIZES[settings.size]
    dtype = settings.dtypes[0]
    name = f"TemporalConvNet({inputs},{channels[0]}x{len(channels)},k{k})-B{batch}-L{length}"

    def make(impl):
        torch.manual_seed(0)
        template = fastres.TemporalConvNet(inputs, channels, kernel_size=k, dropout=0.0)
        template = template.to(device=settings.device, dtype=dtype).eval()
        x = torch.randn(batch, inputs, length, generator=torch.Generator().manual_seed(1)) \
            .to(device=settings.device, dtype=dtype)
        if impl == "plain":
            model = fastres.unfuse(copy.deepcopy(template))
        elif impl == "fastres":
            model = copy.deepcopy(template)
        else:
            def first_call():
                fastres.dispatch.forget()
                with torch.no_grad():
                    return copy.deepcopy(template)(x)
            return first_call

        def call():
            with torch.no_grad():
                return model(x)
        return call
    # one call a sample: a sample of "fastres first" is a first call
    config = timing.TimingConfig(min_rounds=3, max_rounds=3, max_time_s=0.0, min_block_s=0.0,
                                 warmup_s=0.0, min_warmup_calls=1)
    return [Task(suite=NAME, name=name, case={"model": name, "dtype": str(dtype)},
                 impls=["plain", "fastres first", "fastres"], make=make, baseline="plain",
                 items=batch, timing=config)]


def table(rows, summary):
    from .formatting import fmt_seconds, fmt_x
    headers = ["case", "impl", "median", "vs plain"]
    return headers, [[r["task"], r["impl"], fmt_seconds(r["median_s"]), fmt_x(r["speedup"])]
                     for r in rows if r["status"] == "ok"]


def summarize(rows, settings: Settings):
    by = {r["impl"]: r for r in rows if r["status"] == "ok"}
    if "plain" in by and "fastres first" in by:
        return {"first_call_over_plain": by["fastres first"]["median_s"] / by["plain"]["median_s"]}
    return {}


def summary_lines(summary) -> List[str]:
    if "first_call_over_plain" in summary:
        return [f"first fastres call on the long input: {summary['first_call_over_plain']:.2f}x "
                "a plain call (target: at most 1.5x)"]
    return []


def plot(ax, rows, summary):
    from .formatting import bar_chart
    bar_chart(ax, rows, value="speedup", title="first-call: speed vs plain (higher is better)",
              reference_line=1.0)
