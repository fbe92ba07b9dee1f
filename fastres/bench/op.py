"""op suite: one conv -> BN -> ReLU (+ residual add) stage, fused vs eager vs torch.compile.

Candidates, on identical inputs:
    eager          nn.Conv1d-style F.conv1d (cuDNN on GPU, oneDNN on CPU), F.batch_norm,
                   add, F.relu: what a user writes (causal padding as the seed's "chomp":
                   conv with (K-1)*d padding, last (K-1)*d outputs dropped)
    compiled       torch.compile(eager, fullgraph=True), mode max-autotune on GPU
    fastres        fastres.conv_bn_relu with the backend fastres picks by default
    fastres[name]  the same op forced onto each other available backend of the device
                   (the composite backend only in the full matrix; Triton never on CPU,
                   where it would run in its interpreter)

Modes: "eval" = inference forward with running statistics (no autograd);
"train" = forward with batch statistics (running stats updated) + backward to
x, weight, bias, gamma, beta and the residual.

Work per call, for the throughput columns (elements of the activation: n = B*C*L_out):
    FLOPs  eval 2*B*C_out*L_out*C_in*K;  train 3x that (forward, grad_input, grad_weight)
    bytes  the stage's minimum traffic (docs/spec.md "Performance model"), in the input dtype:
           eval   read x, read residual, write out
           train  forward: read x, write y, read y + residual, write out;
                  backward: two passes over grad_out, y and the ReLU mask (1 bit/elt) -- one
                  for the BN reductions, one feeding the conv backward -- read x for
                  grad_weight, write grad_x and grad_residual
           plus the weights: read in the forward; read, and their gradient written, in
           the backward.
GB/s = bytes / median time; "copy %" = that against the measured device copy bandwidth.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import fastres
from fastres import backends
from fastres.conventions import conv_padding, output_length

from . import timing
from .task import Settings, Task, compile_fn

NAME = "op"
TITLE = "One conv -> BN -> ReLU (+add) stage"


@dataclasses.dataclass(frozen=True)
class OpCase:
    B: int
    C: int          # C_in = C_out, as inside a TCN / ResNet stage
    L: int
    K: int
    dilation: int
    dtype: str = "float32"
    mode: str = "train"          # "eval" or "train"
    padding: str = "causal"
    residual: bool = True

    @property
    def L_out(self) -> int:
        return output_length(self.L, self.K, self.dilation, 1,
                             *conv_padding(self.K, self.dilation, 1, self.padding))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def name(self) -> str:
        res = "+res" if self.residual else ""
        return (f"B{self.B}-C{self.C}-L{self.L}-K{self.K}-d{self.dilation}-{self.padding}{res}"
                f"-{self.dtype}-{self.mode}")

    def flops(self) -> float:
        forward = 2.0 * self.B * self.C * self.L_out * self.C * self.K
        return forward if self.mode == "eval" else 3 * forward

    def bytes(self) -> float:
        elt = torch.tensor([], dtype=self.torch_dtype).element_size()
        x = self.B * self.C * self.L * elt
        act = self.B * self.C * self.L_out * elt     # y, out, residual, grad_out, ...
        mask = self.B * self.C * self.L_out / 8
        weights = self.C * self.C * self.K * elt
        res = act if self.residual else 0
        if self.mode == "eval":
            return x + res + act + weights
        forward = x + act + act + res + act
        backward = 2 * (act + act + mask) + x + x + res + 2 * weights
        return forward + backward + weights


# (B, C, L, K, dilation) per size and device; dtypes come from the settings.
_SHAPES = {
    ("quick", "cpu"): [(2, 16, 256, 3, 2)],
    ("default", "cpu"): [(8, 64, 1024, 3, 2), (4, 128, 2048, 5, 8)],
    ("quick", "cuda"): [(4, 64, 1024, 3, 2)],
    ("default", "cuda"): [(16, 128, 4096, 3, 1), (16, 128, 4096, 3, 16), (32, 256, 2048, 5, 4)],
}


# The full matrix: one factor at a time around a TCN-sized base stage.
_FULL = {
    "cuda": (dict(B=16, C=128, L=4096, K=3, dilation=4),
             {"B": [4, 64], "C": [64, 256, 512], "L": [1024, 16384, 65536], "K": [2, 7],
              "dilation": [1, 64]}),
    "cpu": (dict(B=8, C=64, L=1024, K=3, dilation=4),
            {"B": [1, 32], "C": [32, 128, 256], "L": [256, 4096], "K": [2, 5],
             "dilation": [1, 16]}),
}


def _full_shapes(device: str):
    base, sweeps = _FULL[device]
    shapes = [tuple(base.values())]
    for key, values in sweeps.items():
        for value in values:
            shapes.append(tuple(dict(base, **{key: value}).values()))
    return shapes


def cases(settings: Settings) -> List[OpCase]:
    """The matrix. In the full size the shape sweeps run in the first dtype and the other
    dtypes at the base shape (a full product would take hours of max-autotune)."""
    device = "cuda" if settings.device.type == "cuda" else "cpu"
    dtypes = [str(d).replace("torch.", "") for d in settings.dtypes]
    if settings.size == "full":
        shapes = _full_shapes(device)
        pairs = [(dtypes[0], s) for s in shapes] + [(d, shapes[0]) for d in dtypes[1:]]
    else:
        pairs = [(d, s) for d in dtypes for s in _SHAPES[(settings.size, device)]]
    return [OpCase(B, C, L, K, dil, dtype, mode)
            for dtype, (B, C, L, K, dil) in pairs for mode in ("eval", "train")]


def unavailable_reason(settings: Settings) -> Optional[str]:
    return None


def fastres_backends(device: torch.device, dtype: torch.dtype, full: bool) -> Dict[str, str]:
    """impl name -> backend name: "fastres" is the default dispatch (fastres.dispatch:
    a fused kernel or eager per call, measured), then each available backend forced on its own.

    Triton is never benchmarked on CPU tensors: there it runs in its interpreter, a test
    tool orders of magnitude slower. The composite backend is listed on its own only in
    the full matrix (it is plain PyTorch plus a custom-op wrapper).
    """
    impls = {"fastres": "default"}
    for name in backends.available_backends():
        backend = backends.get(name)
        if device.type not in backend.devices or dtype not in backend.dtypes:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        if name == "composite" and not full:
            continue
        impls[f"fastres[{name}]"] = name
    return impls


class _Stage:
    """Parameters and rotating inputs of one OpCase, and the candidate calls over them."""

    def __init__(self, case: OpCase, device: torch.device):
        self.case = case
        dtype, C, K = case.torch_dtype, case.C, case.K
        g = torch.Generator(device="cpu").manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        train = case.mode == "train"
        param = lambda t: t.to(device).requires_grad_(train)  # noqa: E731
        self.weight = param((rnd(C, C, K) / (C * K) ** 0.5).to(dtype))
        self.bias = param((rnd(C) * 0.1).to(dtype))
        self.gamma = param(torch.rand(C, generator=g) + 0.5)
        self.beta = param(rnd(C) * 0.1)
        self.running_mean = (rnd(C) * 0.1).to(device)
        self.running_var = (torch.rand(C, generator=g) + 0.5).to(device)
        shape_in, shape_out = (case.B, C, case.L), (case.B, C, case.L_out)
        one_set = timing.tensor_bytes(torch.empty(shape_in, dtype=dtype)) * (3 if train else 2)
        sets = []
        for _ in range(timing.rotation_count(one_set, device)):
            x = torch.randn(shape_in, generator=g).to(dtype).to(device).requires_grad_(train)
            res = None
            if case.residual:
                res = torch.randn(shape_out, generator=g).to(dtype).to(device).requires_grad_(train)
            grad = torch.randn(shape_out, generator=g).to(dtype).to(device) if train else None
            sets.append((x, res, grad))
        self.inputs = timing.Rotating(sets)
        self.pad_left, _ = conv_padding(K, case.dilation, 1, case.padding)

    # The stage as users write it in PyTorch.
    def eager(self, x, res, weight, bias, gamma, beta, running_mean, running_var):
        case = self.case
        if case.padding == "causal":
            y = F.conv1d(x, weight, bias, padding=self.pad_left, dilation=case.dilation)
            if self.pad_left:
                y = y[:, :, :-self.pad_left]     # the "chomp"
        else:
            y = F.conv1d(x, weight, bias, padding="same", dilation=case.dilation)
        z = F.batch_norm(y, running_mean, running_var, gamma, beta, case.mode == "train", 0.1, 1e-5)
        return F.relu(z + res if res is not None else z)

    def fused(self, x, res, weight, bias, gamma, beta, running_mean, running_var):
        case = self.case
        return fastres.conv_bn_relu(x, weight, bias, running_mean, running_var, gamma, beta,
                                    training=case.mode == "train", dilation=case.dilation,
                                    padding=case.padding, residual=res)

    def call(self, stage):
        """A no-argument call of `stage` on the next input set (forward, or train step)."""
        params = (self.weight, self.bias, self.gamma, self.beta)
        stats = (self.running_mean, self.running_var)
        if self.case.mode == "eval":
            def run_eval():
                x, res, _ = self.inputs()
                with torch.no_grad():
                    return stage(x, res, *params, *stats)
            return run_eval

        def run_train():
            x, res, grad = self.inputs()
            out = stage(x, res, *params, *stats)
            leaves = [x] + ([res] if res is not None else []) + list(params)
            return torch.autograd.grad(out, leaves, grad)
        return run_train


def tasks(settings: Settings) -> List[Task]:
    device = settings.device
    result = []
    for case in cases(settings):
        fused = fastres_backends(device, case.torch_dtype, settings.size == "full")
        impls = ["eager"] + (["compiled"] if settings.compile_mode else []) + list(fused)

        def make(impl, case=case, fused=fused):
            stage = _Stage(case, device)
            if impl == "eager":
                return stage.call(stage.eager)
            if impl == "compiled":
                return stage.call(compile_fn(stage.eager, settings.compile_mode))
            backend = fused[impl]

            def forced(*args):
                with fastres.use_backend(backend):
                    return stage.fused(*args)
            return stage.call(forced if impl != "fastres" else stage.fused)

        result.append(Task(
            suite=NAME, name=case.name, case=dataclasses.asdict(case), impls=impls, make=make,
            compiled=["compiled"], baseline="eager", flops=case.flops(), bytes=case.bytes()))
    return result


def table(rows, summary):
    headers = ["case", "impl", "median", "spread", "vs eager", "GB/s", "TFLOP/s", "copy %",
               "compile"]
    from .formatting import fmt_pct, fmt_seconds, fmt_x, fmt_num
    cells = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["task"], row["impl"], "error: " + (row["error"] or "")[:60]]
                         + [""] * 6)
            continue
        cells.append([row["task"], row["impl"], fmt_seconds(row["median_s"]),
                      fmt_pct(row["spread"]), fmt_x(row["speedup"]), fmt_num(row["gbps"]),
                      fmt_num(row["tflops"], 3), fmt_pct(row["copy_fraction"], 0),
                      fmt_seconds(row["compile_s"])])
    return headers, cells


def plot(ax, rows, summary):
    """Speedup over eager per case and impl (horizontal bars; 1.0 = as fast as eager)."""
    from .formatting import bar_chart
    bar_chart(ax, rows, value="speedup", title="op: speedup over eager PyTorch (higher is better)",
              reference_line=1.0)
