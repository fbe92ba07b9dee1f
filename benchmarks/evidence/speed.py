"""Sections 5 (timings against eager and torch.compile) and 8 (launch overhead, CUDA graphs).

Section 5 compares, on identical work, eager PyTorch (cuDNN), torch.compile of it (default
mode; max-autotune with --max-autotune), fastres at its default dispatch ("fastres") and
fastres forced onto each kernel backend ("fastres[triton]", "fastres[cuda]"):
    op      one causal conv -> BN -> ReLU + residual stage (fastres.bench.op's stage),
            B=32, L=4096, K=3, C = 64, 128, 256, dilation 1 and 16
    block   fastres.TemporalBlock(C, C, 3, dilation=4), B=32, L=4096, C = 64, 128, 256,
            against the same weights in plain PyTorch (fastres.unfuse)
    tcn     fastres.TemporalConvNet(32, [128] * 8, 3), B=32, L=4096, the same way
in bf16 and float32 (TF32 convs: PyTorch's default), as a train step (forward, backward;
modules also an SGD step) and an eval forward. Per row: device time (CUDA events), host
time per call, and the ratios to eager and to the best torch.compile measured. Workloads
run most informative first, each only while the budget lasts; every torch.compile is a
fresh compile (Dynamo reset per workload), its time shown apart from the medians.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

import fastres
from fastres.bench import timing
from fastres.bench._modules import step_call
from fastres.bench.op import OpCase, _Stage
from fastres.bench.formatting import fmt_seconds, fmt_x

from .context import SPENT, Context, forced, time_candidates
from .environment import tf32_settings
from .results import Section, error_text


@dataclasses.dataclass(frozen=True)
class Workload:
    suite: str          # "op", "block" or "tcn"
    C: int
    dilation: int
    dtype: str          # "bfloat16" or "float32"
    mode: str           # "train" or "eval"
    B: int
    L: int
    compile_modes: Tuple[str, ...] = ("default",)

    @property
    def label(self) -> str:
        what = {"op": f"op C{self.C} d{self.dilation}",
                "block": f"TemporalBlock C{self.C} d{self.dilation}",
                "tcn": f"TCN {TCN_LEVELS}x{self.C}"}[self.suite]
        return f"{what} B{self.B} L{self.L} {self.dtype} {self.mode}"


TCN_LEVELS, TCN_INPUTS, K = 8, 32, 3
# (channels, dilations, block dilation, B, L, TCN channels) on a GPU and in the smoke run.
SIZES = {"gpu": ((64, 128, 256), (1, 16), 4, 32, 4096, 128),
         "smoke": ((16,), (1, 8), 2, 2, 64, 8)}


def plan(ctx: Context) -> List[Workload]:
    """Every workload, most informative first: the goals' rows (bf16 blocks, the op's
    dilation pairs, the TCN), then eval ops, then float32, then max-autotune extras."""
    channels, dilations, block_d, B, L, tcn_c = SIZES["smoke" if ctx.smoke else "gpu"]

    def w(suite, C, d, dtype, mode, **kw):
        return Workload(suite, C, d, dtype, mode, B, L, **kw)

    order: List[Workload] = []
    # The smoke run exercises every path once: bf16 only.
    for dtype in ("bfloat16",) if ctx.smoke else ("bfloat16", "float32"):
        order += [w("block", C, block_d, dtype, mode) for mode in ("train", "eval")
                  for C in channels]
        order += [w("op", C, d, dtype, "train") for C in channels for d in dilations]
        order += [w("tcn", tcn_c, 1, dtype, mode) for mode in ("train", "eval")]
        order += [w("op", C, d, dtype, "eval") for C in channels for d in dilations]
    if ctx.max_autotune:
        order += [w("block", C, block_d, "bfloat16", mode, compile_modes=("max-autotune",))
                  for mode in ("train", "eval") for C in channels if C <= 128]
    return order


# --------------------------------------------------------------------------- candidates


def _op_candidates(ctx: Context, work: Workload) -> Dict[str, Callable[[], object]]:
    stage = _Stage(OpCase(work.B, work.C, work.L, K, work.dilation, work.dtype, work.mode),
                   ctx.device)
    calls = {"eager": stage.call(stage.eager)}
    for mode in work.compile_modes:
        calls[compile_name(mode)] = stage.call(ctx.compile(stage.eager, mode))
    calls["fastres"] = stage.call(stage.fused)
    for backend in ctx.kernel_backends(for_timing=True):
        calls[f"fastres[{backend}]"] = stage.call(forced(stage.fused, backend))
    return calls


def build_module(work: Workload) -> torch.nn.Module:
    if work.suite == "tcn":
        return fastres.TemporalConvNet(TCN_INPUTS, [work.C] * TCN_LEVELS, kernel_size=K,
                                       dropout=0.0)
    return fastres.TemporalBlock(work.C, work.C, K, dilation=work.dilation, dropout=0.0)


def module_call(model: torch.nn.Module, forward: Callable, mode: str,
                inputs: timing.Rotating) -> Callable[[], object]:
    """A train step (forward, MSE loss, backward, SGD with momentum) or an eval forward, as
    the block and model suites run them."""
    return step_call(model, forward, mode == "train", inputs)


def module_inputs(ctx: Context, shape, target_shape, dtype: torch.dtype) -> timing.Rotating:
    """(x, target) sets, as many as keep the inputs from all sitting in the cache."""
    g = torch.Generator().manual_seed(1)
    one_set = 2 * int(torch.tensor(shape).prod()) * dtype.itemsize
    return timing.Rotating([
        (torch.randn(*shape, generator=g).to(ctx.device, dtype),
         torch.randn(*target_shape, generator=g).to(ctx.device, dtype))
        for _ in range(timing.rotation_count(one_set, ctx.device))])


def _module_candidates(ctx: Context, work: Workload) -> Dict[str, Callable[[], object]]:
    dtype = getattr(torch, work.dtype)
    torch.manual_seed(0)
    fused = build_module(work).to(ctx.device, dtype).train(work.mode == "train")
    c_in = TCN_INPUTS if work.suite == "tcn" else work.C
    inputs = module_inputs(ctx, (work.B, c_in, work.L), (work.B, work.C, work.L), dtype)

    def plain():
        """The same weights in plain PyTorch, in the same train/eval mode."""
        return fastres.unfuse(copy.deepcopy(fused)).train(work.mode == "train")

    calls = {}
    model = plain()
    calls["eager"] = module_call(model, model, work.mode, inputs)
    for mode in work.compile_modes:
        model = plain()  # its train/eval mode is set before Dynamo guards on it
        calls[compile_name(mode)] = module_call(model, ctx.compile(model, mode), work.mode, inputs)
    model = copy.deepcopy(fused)
    calls["fastres"] = module_call(model, model, work.mode, inputs)
    for backend in ctx.kernel_backends(for_timing=True):
        model = copy.deepcopy(fused)
        calls[f"fastres[{backend}]"] = module_call(model, forced(model, backend), work.mode,
                                                   inputs)
    return calls


def compile_name(mode: str) -> str:
    return "compile" if mode == "default" else f"compile[{mode}]"


def candidates(ctx: Context, work: Workload) -> Dict[str, Callable[[], object]]:
    return _op_candidates(ctx, work) if work.suite == "op" else _module_candidates(ctx, work)


# --------------------------------------------------------------------------- section 5


def ratios(results: Dict[str, Dict[str, object]]) -> None:
    """Add vs_eager and vs_compile (the best compile measured) to every measured row."""
    ok = {name: r for name, r in results.items() if r["status"] == "ok"}
    eager = ok.get("eager", {}).get("device_s")
    compiled = [r["device_s"] for name, r in ok.items() if name.startswith("compile")]
    best_compile = min(compiled) if compiled else None
    for name, row in ok.items():
        row["vs_eager"] = eager / row["device_s"] if eager else None
        row["vs_compile"] = best_compile / row["device_s"] if best_compile else None
        if name.startswith("compile"):
            row["compile_s"] = max(0.0, row["first_call_s"] - row["device_s"])


def run_timings(ctx: Context, section: Section) -> None:
    rows = section.data["rows"] = []
    section.data["note"] = ("device_s: median per call, CUDA events on a GPU; host_s: "
                            "the Python call alone; vs_*: baseline device time / this one")
    section.data["tf32"] = tf32_settings()
    if ctx.cuda:
        section.notes.append(
            "float32 rows: convs in TF32 wherever the switch applies, PyTorch's default for "
            "convs (cuDNN under eager and compile, fastres's Triton kernels; the cuda backend "
            "always computes strict float32): " + ", ".join(
                f"{k}={v}" for k, v in section.data["tf32"].items() if k != "note"))
    table = section.table("", ["workload", "impl", "device", "host", "spread", "vs eager",
                               "vs compile", "compile time"])
    for work in ctx.progress(plan(ctx), "timings"):
        if ctx.budget.spent():
            section.skip(work.label + (" (max-autotune)" if "max-autotune" in work.compile_modes
                                       else ""), SPENT)
            continue
        torch._dynamo.reset()  # a fresh compile per workload (see fastres.bench.runner)
        try:
            results = time_candidates(ctx, candidates(ctx, work))
        except Exception as exc:  # noqa: BLE001 - building the inputs can fail (memory)
            results = {"all": {"status": "error", "error": error_text(exc)}}
        ratios(results)
        for impl, result in results.items():
            row = dict(dataclasses.asdict(work), workload=work.label, impl=impl, **result)
            rows.append(row)
            if result["status"] != "ok":
                table.add(work.label, impl, "error: " + result["error"][:80], "", "", "", "", "")
                continue
            table.add(work.label, impl, fmt_seconds(result["device_s"]),
                      fmt_seconds(result["host_s"]), f"{result['spread']:.0%}",
                      fmt_x(result["vs_eager"]), fmt_x(result["vs_compile"]),
                      fmt_seconds(result.get("compile_s")))
        if ctx.cuda:
            torch.cuda.empty_cache()
        ctx.flush()
    failed = [f"{r['workload']} {r['impl']}" for r in rows if r["status"] != "ok"]
    if failed:
        section.notes.append(f"{len(failed)} timing row(s) FAILED: " + "; ".join(failed))
    if not ctx.max_autotune:
        section.skip("torch.compile mode max-autotune",
                     "not requested: its compile alone takes minutes per workload, more than "
                     "this run's 9 minutes allow next to everything else; run "
                     "`gpu_evidence.py --only timings --max-autotune` for it")


def warm_timings(ctx: Context, section: Section) -> None:
    """Pay the compiles of section 5 up front, in parallel: each shard calls every
    candidate of its share of the workloads once (fastres's Triton kernels, torch.compile's
    graphs), which leaves them in Triton's and inductor's on-disk caches, so that the timed
    run, one process alone on the device, compiles nothing. Nothing here is timed."""
    warmed = section.data["warmed"] = []
    for index, work in enumerate(plan(ctx)):
        if not ctx.mine(index):
            continue
        if ctx.budget.spent():
            section.skip(f"warm {work.label}", SPENT)
            continue
        torch._dynamo.reset()
        try:
            calls = candidates(ctx, work)
        except Exception as exc:  # noqa: BLE001 - the timed run records it as a row
            warmed.append({"workload": work.label, "impl": "all", "error": error_text(exc)})
            continue
        for impl, call in calls.items():
            if impl == "eager":
                continue
            try:
                call()
                ctx.synchronize()
                warmed.append({"workload": work.label, "impl": impl, "error": None})
            except Exception as exc:  # noqa: BLE001 - the timed run records it as a row
                warmed.append({"workload": work.label, "impl": impl, "error": error_text(exc)})
        ctx.flush()


# --------------------------------------------------------------------------- section 8

LAUNCH_BATCHES = (1, 2, 4, 8)
LAUNCH_LENGTH = 256


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Tuple[Callable[[], None], torch.Tensor]:
    """Capture fn in a CUDA graph (after warm-up on a side stream, as torch's docs do);
    return the replay and the output tensor the graph writes."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _launch_models(ctx: Context):
    c = 8 if ctx.smoke else 128
    return [(f"TemporalBlock({c},{c},k3,d4)", c,
             lambda: fastres.TemporalBlock(c, c, K, dilation=4, dropout=0.0)),
            (f"TCN {TCN_LEVELS if not ctx.smoke else 2}x{c}", TCN_INPUTS,
             lambda: fastres.TemporalConvNet(TCN_INPUTS, [c] * (2 if ctx.smoke else TCN_LEVELS),
                                             kernel_size=K, dropout=0.0))]


def run_launch_overhead(ctx: Context, section: Section) -> None:
    """Small shapes in eval, float32: plain launches against CUDA-graph replay."""
    rows = section.data["rows"] = []
    if not ctx.cuda:
        section.skip("CUDA-graph replay", "skipped: no GPU")
    table = section.table("", ["model", "B", "impl", "device", "host", "vs eager",
                               "graph output = plain output"])
    batches = LAUNCH_BATCHES if ctx.cuda else (1, 8)
    for name, c_in, build in _launch_models(ctx):
        for batch in batches:
            if ctx.budget.spent():
                section.skip(f"{name} B{batch}", SPENT)
                continue
            torch.manual_seed(0)
            fused = build().to(ctx.device).eval()
            plain = fastres.unfuse(copy.deepcopy(fused))
            x = torch.randn(batch, c_in, LAUNCH_LENGTH, device=ctx.device)
            calls, matches = {}, {}
            for impl, model in (("eager", plain), ("fastres", fused)):
                run = lambda model=model: model(x)  # noqa: E731
                calls[impl] = torch.no_grad()(run)
                if ctx.cuda:
                    try:
                        with torch.no_grad():
                            replay, graph_out = cuda_graph(run)
                            replay()
                            matches[impl + "+graph"] = bool(torch.equal(graph_out, run()))
                        calls[impl + "+graph"] = replay
                    except Exception as exc:  # noqa: BLE001 - capture can fail: record it
                        section.skip(f"{name} B{batch} {impl}+graph",
                                     "capture failed: " + error_text(exc))
            results = time_candidates(ctx, calls)
            ratios(results)
            for impl, result in results.items():
                rows.append(dict(model=name, B=batch, L=LAUNCH_LENGTH, dtype="float32",
                                 impl=impl, graph_matches_plain=matches.get(impl), **result))
                if result["status"] != "ok":
                    table.add(name, batch, impl, "error: " + result["error"][:80], "", "", "")
                    continue
                table.add(name, batch, impl, fmt_seconds(result["device_s"]),
                          fmt_seconds(result["host_s"]), fmt_x(result["vs_eager"]),
                          {True: "yes", False: "NO", None: "-"}[matches.get(impl)])
            ctx.flush()
