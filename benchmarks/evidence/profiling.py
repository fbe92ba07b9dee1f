"""Section 6: where the time goes. Per-kernel device time of one TemporalBlock train step.

torch.profiler (CUDA activity) records every kernel of a few steps after warm-up; the table
lists the top kernels by device time per step with their launch counts, and the total
kernel launches per step, for fastres and for the same block in plain PyTorch. On the CPU
(smoke run) the profiler sees operators, not kernels: the rows are aten operators by self
CPU time and the count is of top-level operators.
"""
from __future__ import annotations

import collections
import copy
from typing import Callable, Dict

import torch
from torch.profiler import ProfilerActivity, profile

import fastres

from .context import Context
from .results import Section
from .speed import SIZES, Workload, build_module, module_call, module_inputs

PROFILED_STEPS = 3
TOP = 12


def kernel_profile(ctx: Context, step: Callable[[], object]) -> Dict[str, object]:
    """Kernels (CUDA) or operators (CPU) of PROFILED_STEPS steps, per step."""
    for _ in range(2):   # warm-up: Triton/cuDNN choices, allocator
        step()
    ctx.synchronize()
    activity = ProfilerActivity.CUDA if ctx.cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        ctx.synchronize()
    time_us: Dict[str, float] = collections.defaultdict(float)
    count: Dict[str, int] = collections.defaultdict(int)
    if ctx.cuda:
        unit = "CUDA kernels (and memcpy/memset) on the device"
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in events:
            time_us[e.name] += e.time_range.elapsed_us()
            count[e.name] += 1
        launches = len(events)
    else:
        unit = "aten operators on the CPU (self time); no kernels without a GPU"
        for avg in prof.key_averages():
            time_us[avg.key] += avg.self_cpu_time_total
            count[avg.key] += avg.count
        launches = sum(1 for e in prof.events() if e.cpu_parent is None)
    total = sum(time_us.values())
    top = sorted(time_us, key=time_us.get, reverse=True)
    return {
        "unit": unit, "steps": PROFILED_STEPS,
        "launches_per_step": launches / PROFILED_STEPS,
        "time_per_step_us": total / PROFILED_STEPS,
        "kernels": [{"name": name, "time_per_step_us": time_us[name] / PROFILED_STEPS,
                     "count_per_step": count[name] / PROFILED_STEPS,
                     "share": time_us[name] / total if total else None} for name in top],
    }


def short_name(name: str, limit: int = 90) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."


def run_profile(ctx: Context, section: Section) -> None:
    channels, _, block_d, B, L, _ = SIZES["smoke" if ctx.smoke else "gpu"]
    C = channels[1] if len(channels) > 1 else channels[0]
    work = Workload("block", C, block_d, "bfloat16", "train", B, L)
    section.data["workload"] = work.label
    dtype = torch.bfloat16
    torch.manual_seed(0)
    fused = build_module(work).to(ctx.device, dtype)
    inputs = module_inputs(ctx, (B, C, L), (B, C, L), dtype)
    models = {"fastres": copy.deepcopy(fused), "eager": fastres.unfuse(copy.deepcopy(fused))}
    summary = section.table(f"{work.label}: per train step",
                            ["impl", "kernel launches", "kernel time", "top kernel"])
    profiles: Dict[str, object] = {}
    for impl, model in models.items():
        result = kernel_profile(ctx, module_call(model, model, "train", inputs))
        profiles[impl] = result
        top = result["kernels"][0] if result["kernels"] else {"name": "-"}
        summary.add(impl, f"{result['launches_per_step']:.0f}",
                    f"{result['time_per_step_us']:.0f} us", short_name(top["name"], 60))
    section.data["profiles"] = profiles
    section.notes.append(f"unit: {profiles['fastres']['unit']}; {PROFILED_STEPS} steps after "
                         "2 warm-up steps, per-step averages")
    for impl, result in profiles.items():
        table = section.table(f"{impl}: top {TOP} by time per step",
                              ["kernel", "time/step", "count/step", "share"])
        for k in result["kernels"][:TOP]:
            table.add(short_name(k["name"]), f"{k['time_per_step_us']:.1f} us",
                      f"{k['count_per_step']:g}",
                      f"{k['share']:.1%}" if k["share"] is not None else "-")

