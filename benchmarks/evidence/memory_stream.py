"""Sections 9 (peak memory of a TemporalConvNet train step) and 10 (streaming latency).

Memory: torch.cuda.max_memory_allocated over one train step (forward, loss, backward, SGD
step) after a warm-up step, one implementation at a time (the other's weights and optimizer
state freed), one input set. The CPU has no allocator counter: the smoke run builds and
steps the models and records the numbers as skipped.

Streaming: `s = fastres.stream(model); s.step(x_t)` with x_t (B, C_in), `s.reset()`, on an
eval TemporalConvNet, B=1 and B=64: device and host time per step, plain and replayed from a
CUDA graph. Before timing, the steps are checked against the full forward, and the graph
replay against plain steps (a step whose state lives outside the captured kernels would
replay wrongly); a mismatch is reported instead of a time.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import torch

import fastres
from fastres.bench import timing
from fastres.bench.formatting import fmt_bytes, fmt_seconds, fmt_x
from fastres.conventions import rel_err

from .context import SPENT, Context, time_candidates
from .results import Section, SectionUnavailable, error_text
from .speed import SIZES, TCN_INPUTS, TCN_LEVELS, K, Workload, build_module, module_call, \
    cuda_graph

# --------------------------------------------------------------------------- section 9


def _tcn_work(ctx: Context, dtype: str, mode: str) -> Workload:
    _, _, _, B, L, tcn_c = SIZES["smoke" if ctx.smoke else "gpu"]
    return Workload("tcn", tcn_c, 1, dtype, mode, B, L)


def step_peak(ctx: Context, build: Callable[[], torch.nn.Module], work: Workload
              ) -> Optional[Dict[str, int]]:
    """Peak CUDA memory of one train step of build() (None on the CPU)."""
    dtype = getattr(torch, work.dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(work.B, TCN_INPUTS, work.L, generator=g).to(ctx.device, dtype)
    target = torch.randn(work.B, work.C, work.L, generator=g).to(ctx.device, dtype)
    model = build()
    step = module_call(model, model, "train", timing.Rotating([(x, target)]))
    step()   # warm-up: optimizer state, Triton/cuDNN choices
    return timing.peak_memory_bytes(step, ctx.device)


def run_memory(ctx: Context, section: Section) -> None:
    rows = section.data["rows"] = []
    if not ctx.cuda:
        section.skip("peak memory numbers", "skipped: no GPU (the CUDA caching allocator's "
                     "counters are the measurement; the CPU has none)")
    table = section.table("", ["model", "dtype", "impl", "peak", "peak above start",
                               "vs eager"])
    for dtype in ("bfloat16",) if ctx.smoke else ("bfloat16", "float32"):
        work = _tcn_work(ctx, dtype, "train")
        if ctx.budget.spent():
            section.skip(work.label, SPENT)
            continue
        torch.manual_seed(0)
        fused = build_module(work).to(ctx.device, getattr(torch, dtype))
        builds = {"eager": lambda: fastres.unfuse(copy.deepcopy(fused)),
                  "fastres": lambda: copy.deepcopy(fused)}
        peaks = {}
        for impl, build in builds.items():
            peaks[impl] = step_peak(ctx, build, work)
            if ctx.cuda:
                torch.cuda.empty_cache()
        for impl, peak in peaks.items():
            ratio = (peak["peak_bytes"] / peaks["eager"]["peak_bytes"]
                     if peak and peaks["eager"] else None)
            rows.append({"workload": work.label, "dtype": dtype, "impl": impl,
                         "peak_bytes": peak and peak["peak_bytes"],
                         "peak_above_start_bytes": peak and peak["peak_above_start_bytes"],
                         "vs_eager": ratio})
            table.add(work.label, dtype, impl, fmt_bytes(peak and peak["peak_bytes"]),
                      fmt_bytes(peak and peak["peak_above_start_bytes"]),
                      fmt_x(ratio) if ratio is not None else "-")
        ctx.flush()


# --------------------------------------------------------------------------- section 10

STREAM_BATCHES = (1, 64)
CHECK_STEPS = 16


def stream_matches_forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative error of step-by-step outputs against the full forward over x (B, C, T)."""
    s = fastres.stream(model)
    with torch.no_grad():
        full = model(x)
        steps = torch.stack([s.step(x[..., t]) for t in range(x.shape[-1])], dim=-1)
    return rel_err(steps, full)


def graph_matches_steps(s, x: torch.Tensor, replay: Callable[[], None], static_x: torch.Tensor,
                        static_out: torch.Tensor) -> bool:
    """Whether replaying the captured step from reset() gives the plain steps' outputs."""
    with torch.no_grad():
        s.reset()
        plain = [s.step(x[..., t]).clone() for t in range(x.shape[-1])]
        s.reset()
        graphed = []
        for t in range(x.shape[-1]):
            static_x.copy_(x[..., t])
            replay()
            graphed.append(static_out.clone())
    return all(torch.equal(a, b) for a, b in zip(plain, graphed))


def run_streaming(ctx: Context, section: Section) -> None:
    if not hasattr(fastres, "stream"):
        raise SectionUnavailable("not available in this build: fastres has no stream() "
                                 "(being built on another branch)")
    rows = section.data["rows"] = []
    if not ctx.cuda:
        section.skip("CUDA-graph capture of step()", "skipped: no GPU")
    work = _tcn_work(ctx, "float32", "eval")
    torch.manual_seed(0)
    model = build_module(work).to(ctx.device).eval()
    section.data["model"] = f"TemporalConvNet({TCN_INPUTS}, [{work.C}] * {TCN_LEVELS}, k{K}), eval"
    table = section.table("", ["B", "impl", "device/step", "host/step", "step = full forward",
                               "graph = plain steps"])
    for batch in STREAM_BATCHES:
        if ctx.budget.spent():
            section.skip(f"B{batch}", SPENT)
            continue
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, TCN_INPUTS, CHECK_STEPS, generator=g).to(ctx.device)
        error = stream_matches_forward(model, x)
        s = fastres.stream(model)
        x_t = x[..., 0].contiguous()
        calls: Dict[str, Callable[[], object]] = {"step": torch.no_grad()(lambda: s.step(x_t))}
        graph_ok: Optional[bool] = None
        if ctx.cuda:
            try:
                static_x = x_t.clone()
                with torch.no_grad():
                    replay, static_out = cuda_graph(lambda: s.step(static_x))
                graph_ok = graph_matches_steps(s, x, replay, static_x, static_out)
                if graph_ok:
                    calls["step+graph"] = replay
                else:
                    section.skip(f"B{batch} step+graph", "graph replay does not reproduce "
                                 "step(): its state is not all in the captured kernels")
            except Exception as exc:  # noqa: BLE001 - capture can fail: record it
                section.skip(f"B{batch} step+graph", "capture failed: " + error_text(exc))
        results = time_candidates(ctx, calls)
        for impl, result in results.items():
            rows.append(dict(B=batch, impl=impl, rel_err_vs_forward=error,
                             graph_matches_plain=graph_ok if impl == "step+graph" else None,
                             **result))
            if result["status"] != "ok":
                table.add(batch, impl, "error: " + result["error"][:80], "", "", "")
                continue
            table.add(batch, impl, fmt_seconds(result["device_s"]),
                      fmt_seconds(result["host_s"]), f"rel err {error:.1e}",
                      {True: "yes", False: "NO", None: "-"}[graph_ok if impl == "step+graph"
                                                            else None])
        ctx.flush()


def step_latency(row: Dict[str, object]) -> Optional[float]:
    """A step's time as the goal counts it: the slower of device and host per step."""
    times: List[float] = [t for t in (row.get("device_s"), row.get("host_s")) if t is not None]
    return max(times) if times else None
