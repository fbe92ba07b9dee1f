"""Parity of a backend against the float64 reference: the logic behind the tests and `fastres check`.

A Case describes one call of the fused op. `parity_errors(case, backend, dtype, device)` runs
it on a backend (outputs poisoned with NaN first), runs the reference in float64 on the same
already-rounded inputs, and returns the relative error ||a - b|| / ||b|| of the output, every
gradient and the running statistics. `check_parity` asserts they are under the docs/spec.md bound
(the unit tests use it); `run_check` runs a fixed set of cases over every available backend
and is what `fastres check` prints.

This module imports only fastres.reference, the public op and the NaN-poisoning switch, so a
bug in a backend or in shared op code cannot hide on both sides of a comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

import fastres
from fastres import _alloc
from fastres.conventions import conv_padding, cudnn_conv_tf32_set, rel_err
from fastres.reference import conv1d, conv_bn_relu_reference, output_length

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
TF32_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    C_in: int = 4
    C_out: int = 8
    L: int = 16
    K: int = 3
    dilation: int = 1
    stride: int = 1
    padding: str = "causal"
    residual: str = "none"        # "none", "identity" (x itself; needs C_in == C_out, stride 1),
                                  # or "tensor" (an independent tensor, e.g. a projection's output)
    norm: str = "train"           # "train", "eval" or "none"
    bias: bool = True
    affine: bool = True
    relu_before_add: bool = False
    momentum: Optional[float] = 0.1

    @property
    def L_out(self) -> int:
        return output_length(self.L, self.K, self.dilation, self.stride, self.padding)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs, rounded to `dtype` and returned in float64 (the masters)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = {
        "x": rnd(case.B, case.C_in, case.L),
        # He-like scale keeps conv outputs O(1) whatever C_in and K are.
        "weight": rnd(case.C_out, case.C_in, case.K) / (case.C_in * case.K) ** 0.5,
        "grad_out": rnd(case.B, case.C_out, case.L_out),
    }
    if case.bias:
        inputs["bias"] = rnd(case.C_out) * 0.5
    if case.norm != "none":
        inputs["running_mean"] = rnd(case.C_out) * 0.3
        inputs["running_var"] = torch.rand(case.C_out, generator=g, dtype=torch.float64) + 0.5
        if case.affine:
            inputs["bn_weight"] = torch.rand(case.C_out, generator=g, dtype=torch.float64) + 0.5
            inputs["bn_bias"] = rnd(case.C_out) * 0.3
    if case.residual == "tensor":
        inputs["residual"] = rnd(case.B, case.C_out, case.L_out)
    for name, t in inputs.items():
        if name not in ("running_mean", "running_var", "bn_weight", "bn_bias"):
            t = t.to(dtype)  # round conv operands to the dtype under test
        inputs[name] = t.to(torch.float64).to(device)
    return inputs


def _run(case: Case, inputs, dtype, param_dtype):
    """The op's arguments for `case` in `dtype`, and the leaves gradients are taken for."""
    cast = lambda name: inputs[name].to(dtype).detach().requires_grad_(True)  # noqa: E731
    x, weight = cast("x"), cast("weight")
    bias = cast("bias") if case.bias else None
    leaves = {"x": x, "weight": weight, "bias": bias}
    rm = rv = gamma = beta = None
    if case.norm != "none":
        rm = inputs["running_mean"].to(param_dtype).clone()
        rv = inputs["running_var"].to(param_dtype).clone()
        if case.affine:
            gamma = inputs["bn_weight"].to(param_dtype).detach().requires_grad_(True)
            beta = inputs["bn_bias"].to(param_dtype).detach().requires_grad_(True)
            leaves.update(bn_weight=gamma, bn_bias=beta)
    residual = None
    if case.residual == "identity":
        residual = x
    elif case.residual == "tensor":
        residual = cast("residual")
        leaves["residual"] = residual
    # A counter as nn.BatchNorm1d keeps it (3 batches seen), for momentum=None.
    num_batches_tracked = torch.tensor(3, device=inputs["x"].device)
    return (x, weight, bias, rm, rv, gamma, beta, residual, num_batches_tracked), leaves


def _call(fn, case, args):
    x, weight, bias, rm, rv, gamma, beta, residual, num_batches_tracked = args
    return fn(x, weight, bias, rm, rv, gamma, beta, training=case.norm == "train",
              momentum=case.momentum, stride=case.stride, dilation=case.dilation,
              padding=case.padding, residual=residual, relu_before_add=case.relu_before_add,
              norm=None if case.norm == "none" else "batch",
              num_batches_tracked=num_batches_tracked)


def run_backend(case: Case, inputs, dtype, backend: Optional[str]):
    args, leaves = _run(case, inputs, dtype, torch.float32 if dtype != torch.float64 else dtype)
    with _alloc.poisoned(), (fastres.use_backend(backend) if backend else contextlib.nullcontext()):
        out = _call(fastres.conv_bn_relu, case, args)
        names = [n for n, t in leaves.items() if t is not None]
        grads = torch.autograd.grad(out, [leaves[n] for n in names],
                                    inputs["grad_out"].to(dtype), allow_unused=True)
    return out, dict(zip(names, grads)), args[3], args[4]


def run_reference(case: Case, inputs):
    args, leaves = _run(case, inputs, torch.float64, torch.float64)
    out = _call(conv_bn_relu_reference, case, args)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], inputs["grad_out"],
                                allow_unused=True)
    return out, dict(zip(names, grads)), args[3], args[4]


def sum_term_scales(case: Case, inputs) -> Dict[str, float]:
    """The scale each per-channel-sum gradient is judged against: ||sum of |terms| ||.

    grad_bias = sum grad_y, grad_bn_weight = sum g * x-hat and grad_bn_bias = sum g over
    (batch, length) per channel. Where the terms cancel, a float32 sum cannot be accurate to
    1e-5 of the result itself (plain PyTorch is not: a channel whose gamma gradient cancels
    274-fold misses by 1.1e-5), and where they cancel completely (the conv bias under
    training-mode batch norm, zero in exact arithmetic) the result is pure rounding. So these
    are judged against the size of what they sum, which equals their own size when nothing
    cancels. Computed here in float64 from the inputs, as docs/spec.md defines the stage.
    """
    f64 = {k: v.to(torch.float64) for k, v in inputs.items()}
    y = conv1d(f64["x"], f64["weight"], f64.get("bias"), stride=case.stride,
               dilation=case.dilation, padding=case.padding)
    z = y
    if case.norm != "none":
        if case.norm == "train":
            var, mean = torch.var_mean(y, dim=(0, 2), unbiased=False)
        else:
            mean, var = f64["running_mean"], f64["running_var"]
        invstd = torch.rsqrt(var + 1e-5)
        xhat = (y - mean[:, None]) * invstd[:, None]
        gamma = f64.get("bn_weight", torch.ones_like(mean))
        z = xhat * gamma[:, None] + f64.get("bn_bias", torch.zeros_like(mean))[:, None]
    h = torch.relu(z) if case.relu_before_add else z
    residual = {"none": 0.0, "identity": f64["x"], "tensor": f64.get("residual")}[case.residual]
    g = f64["grad_out"] * (h + residual > 0)
    if case.relu_before_add:
        g = g * (z > 0)
    scales = {}
    grad_y = g
    if case.norm != "none":
        scales["bn_weight"] = (g * xhat).abs().sum((0, 2)).norm().item()
        scales["bn_bias"] = g.abs().sum((0, 2)).norm().item()
        grad_y = g * (gamma * invstd)[:, None]
        if case.norm == "train":
            n = g.shape[0] * g.shape[2]
            grad_y = (g - g.mean((0, 2))[:, None]
                      - xhat * (g * xhat).sum((0, 2))[:, None] / n) * (gamma * invstd)[:, None]
    scales["bias"] = grad_y.abs().sum((0, 2)).norm().item()
    if case.norm == "train" and weights_touching_data(case) == 2:
        # Training BN makes each output channel's weight gradient orthogonal to its weights
        # (the normalized output does not depend on their scale). With two weights reading
        # data that leaves one direction: a single sum, which can cancel to any degree, and
        # plain float32 PyTorch misses 1e-5 of it on about one draw in 500 (B=3, L=16,
        # C_in=1, K=2). There it is judged, as the per-channel sums, against the size of
        # what it sums: sum |grad_y| * |x| over each weight's (batch, position) terms.
        probe = torch.zeros_like(f64["weight"], requires_grad=True)
        with torch.enable_grad():
            y_abs = conv1d(f64["x"].abs(), probe, None, stride=case.stride,
                           dilation=case.dilation, padding=case.padding)
            (terms,) = torch.autograd.grad(y_abs, probe, grad_y.abs())
        scales["weight"] = terms.norm().item()
    return scales


def weights_touching_data(case: Case) -> int:
    """C_in times the kernel taps that read at least one real (non-padding) input element:
    the weights of an output channel that the data reaches."""
    pad_left, _ = conv_padding(case.K, case.dilation, case.stride, case.padding)
    L_out = output_length(case.L, case.K, case.dilation, case.stride, case.padding)
    taps = sum(any(0 <= t * case.stride + k * case.dilation - pad_left < case.L
                   for t in range(L_out))
               for k in range(case.K))
    return case.C_in * taps


def parity_errors(case: Case, backend: Optional[str], dtype: torch.dtype, device="cpu",
                  seed: int = 0) -> Dict[str, float]:
    """Relative error of the backend against the float64 reference, by quantity.

    Keys: "out", "grad_<input>" for every input that takes a gradient, and in training
    "running_mean" / "running_var". Raises AssertionError if a shape or dtype is wrong.
    """
    inputs = make_inputs(case, dtype, device, seed)
    out, grads, rm, rv = run_backend(case, inputs, dtype, backend)
    ref_out, ref_grads, ref_rm, ref_rv = run_reference(case, inputs)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref_out.shape, f"output shape {tuple(out.shape)}, expected {tuple(ref_out.shape)}"
    errors = {"out": rel_err(out, ref_out)}
    scales = sum_term_scales(case, inputs)  # for the per-channel sums (see there)
    for name, ref_grad in ref_grads.items():
        got = grads[name]
        assert got is not None, f"no gradient for {name}"
        assert got.shape == ref_grad.shape, f"grad_{name}: {tuple(got.shape)}"
        errors["grad_" + name] = rel_err(got, ref_grad, scales.get(name))
    if case.norm == "train":
        errors["running_mean"] = rel_err(rm, ref_rm)
        errors["running_var"] = rel_err(rv, ref_rv)
    return errors


def nonfinite_errors(case: Case, backend: Optional[str], dtype: torch.dtype, device="cpu",
                     seed: int = 0) -> Dict[str, float]:
    """NaN propagation against the reference, as errors a bound can judge: 0.0 where the
    backend's NaN positions in the output equal the reference's and every gradient the
    reference has a NaN in has one too; inf where not (a NaN swallowed, or invented)."""
    inputs = make_inputs(case, dtype, device, seed)
    inputs["x"][0, 0, case.L // 2] = float("nan")
    out, grads, _, _ = run_backend(case, inputs, dtype, backend)
    ref_out, ref_grads, _, _ = run_reference(case, inputs)
    same = torch.equal(torch.isnan(out).cpu(), torch.isnan(ref_out).cpu())
    errors = {"out NaN positions": 0.0 if same else float("inf")}
    for name, ref_grad in ref_grads.items():
        kept = torch.isfinite(ref_grad).all() or not torch.isfinite(grads[name]).all()
        errors[f"grad_{name} keeps NaN"] = 0.0 if kept else float("inf")
    return errors


def check_parity(case: Case, backend: Optional[str], dtype: torch.dtype, device="cpu",
                 seed: int = 0, tol: Optional[float] = None) -> Dict[str, float]:
    """Assert the backend matches the float64 reference; return the errors by name."""
    tol = TOLERANCE[dtype] if tol is None else tol
    errors = parity_errors(case, backend, dtype, device, seed)
    failed = {k: v for k, v in errors.items() if not v < tol}
    assert not failed, f"{backend} {dtype} {case}: over {tol:g}: {failed}"
    return errors


# --------------------------------------------------------------------------- fastres check

# The fixed configurations `fastres check` runs: every norm mode, both padding modes, both
# residual kinds, stride, dilation longer than the sequence, no bias / no affine, the
# locuslab ReLU placement and momentum=None, plus one case big enough to span several tiles.
CHECK_CASES: Dict[str, Case] = {
    "train": Case(B=4, C_in=8, C_out=16, L=64, K=3, dilation=2),
    "train+res": Case(B=3, C_in=5, C_out=7, L=19, K=2, dilation=3, residual="tensor"),
    "train+id,relu2": Case(C_in=8, C_out=8, L=32, dilation=2, residual="identity",
                           relu_before_add=True),
    "train,nobias,noaffine,cma": Case(bias=False, affine=False, momentum=None),
    "eval+res,same": Case(padding="same", K=4, dilation=2, residual="tensor", norm="eval"),
    "train,same,s2": Case(padding="same", K=3, stride=2, L=21),
    "none,s3,relu2": Case(K=5, stride=3, L=20, norm="none", relu_before_add=True),
    "train,rf>L": Case(B=1, L=9, K=7, dilation=4, residual="tensor"),
    "train+res,big": Case(B=4, C_in=32, C_out=32, L=256, K=3, dilation=8, residual="tensor"),
    # 4 values per channel: batch norm's backward nearly cancels, 16-bit rounding shows.
    "train,4/channel": Case(B=2, C_in=6, C_out=8, L=2, K=2, residual="tensor"),
}

# Cases run with a NaN planted in x (see nonfinite_errors): it must reach the output where
# the reference has it, and never vanish from a gradient.
NONFINITE_CASES: Dict[str, Case] = {
    "NaN in x,eval+res": Case(norm="eval", residual="tensor", relu_before_add=True),
    "NaN in x,train": Case(norm="train", L=24, dilation=2),
}


@dataclasses.dataclass
class CheckResult:
    backend: str
    dtype: str            # "float32", "tf32" (CUDA float32 with TF32 convs), "bfloat16", ...
    case: str             # a key of CHECK_CASES
    errors: Dict[str, float]
    tol: float
    seed: Optional[int] = None    # the inputs' seed (parity_errors(..., seed=) repeats them)
    error: Optional[str] = None   # an exception message, when the case did not run

    @property
    def worst(self) -> str:
        return max(self.errors, key=self.errors.get) if self.errors else ""

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else float("inf")

    @property
    def passed(self) -> bool:
        return self.error is None and self.max_error < self.tol


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_plan(device: str, backend_names: Optional[Sequence[str]] = None,
               cases: Optional[Dict[str, Case]] = None):
    """(backend, dtype label, dtype, tf32, case name, case) for every check to run on `device`."""
    from fastres import backends

    cases = CHECK_CASES if cases is None else cases
    names = backends.available_backends() if backend_names is None else list(backend_names)
    plan = []
    for name in names:
        backend = backends.get(name)
        if backend.unavailable_reason() is not None or device not in backend.devices:
            continue
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            if dtype not in backend.dtypes or (dtype == torch.float64 and device == "cuda"):
                continue
            modes = [False, True] if (device == "cuda" and dtype == torch.float32) else [False]
            for tf32 in modes:
                label = "tf32" if tf32 else _dtype_name(dtype)
                for case_name, case in cases.items():
                    plan.append((name, label, dtype, tf32, case_name, case))
    return plan


def run_check(device: str = "cpu", backend_names: Optional[Sequence[str]] = None,
              cases: Optional[Dict[str, Case]] = None,
              progress: Optional[Callable[[Iterable], Iterable]] = None,
              seed: Optional[int] = None) -> List[CheckResult]:
    """Every available backend on `device` against the reference over `cases` (CHECK_CASES,
    and NONFINITE_CASES when `cases` is not given).

    Each case draws fresh inputs: from `seed` (repeatable) or a random one; the result
    records it. A case that raises is a failure carrying the exception message, not a crash.
    """
    if cases is None:
        cases = {**CHECK_CASES, **NONFINITE_CASES}
    plan = check_plan(device, backend_names, cases)
    base = random.randrange(2**31) if seed is None else seed
    results = []
    for i, (name, label, dtype, tf32, case_name, case) in enumerate((progress or iter)(plan)):
        tol = TF32_TOLERANCE if tf32 else TOLERANCE[dtype]
        case_seed = (base + i) % 2**31
        measure = nonfinite_errors if case_name in NONFINITE_CASES else parity_errors
        try:
            with cudnn_conv_tf32_set(tf32):
                errors = measure(case, name, dtype, device, case_seed)
            results.append(CheckResult(name, label, case_name, errors, tol, seed=case_seed))
        except Exception as exc:  # noqa: BLE001 - report the failure and go on
            results.append(CheckResult(name, label, case_name, {}, tol, seed=case_seed,
                                       error=f"{type(exc).__name__}: {exc}"))
    return results
