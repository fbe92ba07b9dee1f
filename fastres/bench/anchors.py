"""anchors suite: fastres against the other tools a CPU user has, eval inference and training.

Per row (a module at one input shape, eval mode, under no_grad), on identical inputs and the
same weights, timed interleaved in one process:

    plain              fastres.unfuse(model): the same weights in plain PyTorch (baseline)
    fastres            the fused model at its default dispatch
    fastres-onednn     the fused model's whole forward through its oneDNN program
                       (fastres/backends/onednn.py: channels-last, BN folded, weights
                       prepacked, ReLU and residual as post-ops), stale check included
    compiled           torch.compile(plain, fullgraph=True), default mode
    compiled-freezing  the same with torch._inductor.config.freezing = True (BN folded,
                       weights as constants), as inductor's CPU inference recipe
    onnxruntime        the plain model exported with torch.onnx (dynamo) and run by an ONNX
                       Runtime CPU session with torch's thread count (float32 only: ONNX
                       Runtime's CPU provider has no bfloat16 convolution)

Training rows (float32: the same modules in training mode, one SGD step each: forward, MSE
loss, backward, step) time plain, fastres, compiled and

    fastres-onednn-train  the fused model's train step through its oneDNN training program
                          (fastres/backends/onednn_train.py: oneDNN convs on (B, L, C)
                          rows, BN, residual and ReLU fused in C++), at its default conv
                          layout

Compilation and export happen on each candidate's first call and are reported apart
("compile" column: first call minus the median). Rows are the ones issue 22 quotes: a
64- and a 128-channel TemporalBlock, two TemporalConvNets (small-batch latency and a
6x32 stack) and a 1D ResNet-18; FLOPs per call are counted by torch's FlopCounterMode.
"""
from __future__ import annotations

import copy
import io
import itertools
from typing import Callable, List, Optional

import torch
from torch import nn

import fastres
from fastres.backends import onednn, onednn_train

from . import _modules
from .task import Settings, Task, compile_fn
from .timing import TIMING, TimingConfig

NAME = "anchors"
TITLE = "Anchors: fastres vs torch.compile (+freezing) vs onnxruntime, eval and train"

IMPLS = ("plain", "fastres", "fastres-onednn", "compiled", "compiled-freezing", "onnxruntime")
COMPILED = ("compiled", "compiled-freezing", "onnxruntime")
TRAIN_IMPLS = ("plain", "fastres", "fastres-onednn-train", "compiled")
TRAIN_DTYPES = (torch.float32,)  # the training program is built for float32

# (label, constructor, (B, C_in, L)) per size.
_ROWS = {
    "quick": [
        ("TemporalBlock(16,16,k3,d2) B2 L128",
         lambda: fastres.TemporalBlock(16, 16, 3, dilation=2, dropout=0.0), (2, 16, 128)),
        ("ResNet1d([1,1,1,1],3 in,w8-64) B2 L128",
         lambda: fastres.ResNet1d((1, 1, 1, 1), 3, 5, widths=(8, 16, 32, 64)), (2, 3, 128)),
    ],
    "default": [
        ("TemporalBlock(64,64,k3,d4) B16 L1024",
         lambda: fastres.TemporalBlock(64, 64, 3, dilation=4, dropout=0.0), (16, 64, 1024)),
        ("TemporalBlock(128,128,k3,d8) B8 L2048",
         lambda: fastres.TemporalBlock(128, 128, 3, dilation=8, dropout=0.0), (8, 128, 2048)),
        ("TemporalConvNet(64,[64]x8) B1 L256",
         lambda: fastres.TemporalConvNet(64, [64] * 8, kernel_size=3, dropout=0.0),
         (1, 64, 256)),
        ("TemporalConvNet(16,[32]x6) B8 L1024",
         lambda: fastres.TemporalConvNet(16, [32] * 6, kernel_size=3, dropout=0.0),
         (8, 16, 1024)),
        ("ResNet1d([2,2,2,2],12 in) B4 L1024",
         lambda: fastres.ResNet1d((2, 2, 2, 2), 12, 10), (4, 12, 1024)),
    ],
}


# Six candidates of 1-50 ms each, on machines that are often shared: more rounds than the
# default preset, so that each median rests on at least 15 interleaved samples.
_TIMING = TimingConfig(min_rounds=15, max_rounds=40, max_time_s=10.0, min_block_s=0.02,
                       warmup_s=0.2)


def unavailable_reason(settings: Settings) -> Optional[str]:
    if settings.device.type != "cpu":
        return "the anchors are CPU tools (oneDNN, inductor's CPU freezing, ONNX Runtime CPU)"
    return _modules.modules_unavailable()


def _flops(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def _onnxruntime_forward(plain: nn.Module, example: torch.Tensor) -> Callable:
    """An ONNX Runtime session of `plain` (exported once, any batch and length)."""
    import onnxruntime as ort
    if example.dtype != torch.float32:
        raise RuntimeError(f"ONNX Runtime's CPU provider has no {example.dtype} convolution")
    dims = {"x": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}}
    program = torch.onnx.export(plain, (example,), dynamo=True, dynamic_shapes=dims,
                                input_names=["x"], verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buffer.getvalue(), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor):
        return session.run(None, {name: x.numpy()})[0]
    return forward


def _lazy(build_forward: Callable[[torch.Tensor], Callable]) -> Callable:
    """A forward built on its first call (so compile or export time lands in that call)."""
    state = {}

    def forward(x):
        if "fn" not in state:
            state["fn"] = build_forward(x)
        return state["fn"](x)
    return forward


def _entry(model: nn.Module) -> Callable:
    """model(x) behind a code object of its own. Dynamo keeps compiled graphs per code
    object and (inlining nn modules) does not guard on which module instance or inductor
    config compiled them: two torch.compile(model) of the same class share one graph, so
    the frozen candidate would silently run the unfrozen one's (or the reverse)."""
    def call(x):
        return model(x)
    call.__code__ = call.__code__.replace(co_name=f"entry_{next(_ENTRIES)}")
    return call


_ENTRIES = itertools.count()


def _frozen_compile(plain: nn.Module) -> Callable:
    compiled = compile_fn(_entry(plain), "default")

    def first_call(x):
        # freezing is read when inductor compiles (the first call); the compiled graph keeps
        # its frozen constants afterwards.
        with torch._inductor.config.patch(freezing=True):
            compiled(x)
        return compiled
    return _lazy(first_call)


def make_train_call(build: Callable[[], nn.Module], impl: str, shape, dtype: torch.dtype,
                    settings: Settings):
    """One SGD train step of the row's model through `impl` (the suite's training rows)."""
    torch.manual_seed(0)
    model = build().to(dtype=dtype).train()
    if impl == "plain":
        model = fastres.unfuse(model).train()
        forward = model
    elif impl == "fastres":
        forward = model
    elif impl == "fastres-onednn-train":
        _, reason = onednn_train.build_or_reason(model)
        if reason is not None:
            raise RuntimeError(reason)
        forward = lambda x: onednn_train.run(model, x)  # noqa: E731
    elif impl == "compiled":
        model = fastres.unfuse(model).train()
        forward = compile_fn(_entry(model), "default")
    else:
        raise ValueError(f"unknown training impl {impl!r}")
    inputs = _modules._inputs(shape, _out_shape(model, shape), None, dtype, settings.device)
    return _modules.step_call(model, forward, True, inputs)


def _out_shape(model: nn.Module, shape):
    with torch.no_grad():
        return tuple(fastres.unfuse(copy.deepcopy(model)).eval()(
            torch.zeros(shape, dtype=next(model.parameters()).dtype)).shape)


def make_call(build: Callable[[], nn.Module], impl: str, shape, dtype: torch.dtype,
              settings: Settings):
    torch.manual_seed(0)
    fused = build().to(dtype=dtype).eval()
    plain = fastres.unfuse(copy.deepcopy(fused)).eval()
    if impl == "plain":
        forward = plain
    elif impl == "fastres":
        forward = fused
    elif impl == "fastres-onednn":
        _, reason = onednn.build_or_reason(fused)
        if reason is not None:
            raise RuntimeError(reason)
        forward = lambda x: onednn.run(fused, x)  # noqa: E731
    elif impl == "compiled":
        forward = compile_fn(_entry(plain), "default")
    elif impl == "compiled-freezing":
        forward = _frozen_compile(plain)
    elif impl == "onnxruntime":
        forward = _lazy(lambda x: _onnxruntime_forward(plain, x))
    else:
        raise ValueError(f"unknown impl {impl!r}")
    inputs = _modules._inputs(shape, shape, None, dtype, settings.device)
    return _modules.step_call(fused, forward, False, inputs)


def tasks(settings: Settings) -> List[Task]:
    rows = _ROWS["quick" if settings.size == "quick" else "default"]
    result = []
    for dtype in settings.dtypes:
        dname = str(dtype).replace("torch.", "")
        for label, build, shape in rows:
            def make(impl, build=build, shape=shape, dtype=dtype):
                return make_call(build, impl, shape, dtype, settings)
            torch.manual_seed(0)
            flops = _flops(fastres.unfuse(build()).eval(), torch.randn(shape))
            result.append(Task(
                suite=NAME, name=f"{label}-{dname}", impls=list(IMPLS), make=make,
                case={"model": label, "input": list(shape), "dtype": dname, "mode": "infer"},
                compiled=list(COMPILED), baseline="plain", flops=flops, items=shape[0],
                timing=TIMING["quick"] if settings.size == "quick" else _TIMING))
            if dtype not in TRAIN_DTYPES:
                continue

            def make_train(impl, build=build, shape=shape, dtype=dtype):
                return make_train_call(build, impl, shape, dtype, settings)
            result.append(Task(
                suite=NAME, name=f"{label}-{dname}-train", impls=list(TRAIN_IMPLS),
                make=make_train,
                case={"model": label, "input": list(shape), "dtype": dname, "mode": "train"},
                compiled=["compiled"], baseline="plain", flops=3 * flops,  # + dgrad, wgrad items=shape[0],
                timing=TIMING["quick"] if settings.size == "quick" else _TIMING))
    return result


def summarize(rows, settings: Settings):
    """Per dtype and mode: each impl's geometric-mean speedup over plain across the rows."""
    import math
    summary = {}
    groups = sorted({(r["case"]["dtype"], r["case"].get("mode", "infer")) for r in rows})
    for dname, mode in groups:
        mine = [r for r in rows if r["case"]["dtype"] == dname
                and r["case"].get("mode", "infer") == mode]
        geo = {}
        for impl in IMPLS if mode == "infer" else TRAIN_IMPLS:
            ups = [r["speedup"] for r in mine if r["impl"] == impl and r["speedup"]]
            if ups:
                geo[impl] = math.exp(sum(map(math.log, ups)) / len(ups))
        summary[dname if mode == "infer" else f"{dname} train"] = {"geomean_speedup": geo}
    return summary


def summary_lines(summary) -> List[str]:
    lines = []
    for dname, s in summary.items():
        parts = ", ".join(f"{impl} {x:.2f}x" for impl, x in s["geomean_speedup"].items())
        lines.append(f"{dname}: geometric-mean speedup over plain: {parts}")
    return lines


def table(rows, summary):
    from .formatting import fmt_num, fmt_pct, fmt_seconds, fmt_x
    headers = ["case", "impl", "median", "spread", "vs plain", "GFLOP/s", "compile"]
    cells = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["task"], row["impl"], "error: " + (row["error"] or "")[:70]]
                         + [""] * 4)
            continue
        cells.append([row["task"], row["impl"], fmt_seconds(row["median_s"]),
                      fmt_pct(row["spread"]), fmt_x(row["speedup"]),
                      fmt_num(None if row["tflops"] is None else row["tflops"] * 1e3, 4),
                      fmt_seconds(row["compile_s"])])
    return headers, cells


def plot(ax, rows, summary):
    _modules.plot(ax, rows, "anchors: speedup over plain PyTorch, eval and train (higher is better)")
