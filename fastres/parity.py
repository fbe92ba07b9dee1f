"""Parity of a backend against the float64 reference: the logic behind the tests and `fastres check`.

A Case describes one call of the fused op. `parity_errors(case, backend, dtype, device)` runs
it on a backend (outputs poisoned with NaN first), runs the reference in float64 on the same
already-rounded inputs, and returns the relative error ||a - b|| / ||b|| of the output, every
gradient and the running statistics. `check_parity` asserts they are under the docs/spec.md bound
(the unit tests use it); `run_check` runs a fixed set of cases over every available backend
and is what `fastres check` prints.

`probe(call, backend)` is the same comparison on a small call of one signature's geometry:
the dispatcher trusts a backend with a call signature only once its probe passed.
`check_upstream` judges PyTorch's own conv1d kernels the same way, over a grid of
geometries (`fastres check` prints those that are wrong here).

This module imports only fastres.reference, the op (its public function, and `run_backend`
for a probe, which must not ask the dispatcher) and the NaN-poisoning switch, so a bug in a
backend or in shared op code cannot hide on both sides of a comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import random
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastres import _alloc
from fastres.backends import Call, get as get_backend
from fastres.dispatch import use_backend
from fastres.conventions import (NORM_TRAIN, conv_padding, cudnn_conv_tf32,
                                 cudnn_conv_tf32_set, rel_err)
from fastres.ops import conv_bn_relu
from fastres.ops.conv_bn_relu import run_backend as run_validated
from fastres.reference import (activation_function, conv1d, conv_bn_relu_reference,
                               output_length)

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
    norm: str = "train"           # "train", "eval", "none", or "layer" (over channels)
    bias: bool = True
    affine: bool = True
    relu_before_add: bool = False
    momentum: Optional[float] = 0.1
    activation: str = "relu"      # docs/spec.md, "Activation"

    @property
    def L_out(self) -> int:
        return output_length(self.L, self.K, self.dilation, self.stride, self.padding)

    def __str__(self) -> str:
        # (ReLU, the default, is left out: test ids stay as they were before activations)
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if f.name != "activation" or self.activation != "relu")


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
        if case.norm != "layer":  # (layer norm keeps no running statistics)
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
              norm={"none": None, "layer": "layer"}.get(case.norm, "batch"),
              num_batches_tracked=num_batches_tracked,
              **({} if case.activation == "relu" else {"activation": case.activation}))


def run_backend(case: Case, inputs, dtype, backend: Optional[str]):
    args, leaves = _run(case, inputs, dtype, torch.float32 if dtype != torch.float64 else dtype)
    with _alloc.poisoned(), (use_backend(backend) if backend else contextlib.nullcontext()):
        out = _call(conv_bn_relu, case, args)
        names = [n for n, t in leaves.items() if t is not None]
        grads = torch.autograd.grad(out, [leaves[n] for n in names],
                                    inputs["grad_out"].to(dtype), allow_unused=True)
    return out, dict(zip(names, grads)), args[3], args[4]


def _reference(case: Case, inputs, gradients: bool):
    """run_reference's results, and the scales the per-channel sums are judged against."""
    return (run_reference(case, inputs, gradients),
            sum_term_scales(case, inputs) if gradients else {})


def run_reference(case: Case, inputs, gradients: bool = True):
    args, leaves = _run(case, inputs, torch.float64, torch.float64)
    with torch.enable_grad() if gradients else torch.no_grad():
        out = _call(conv_bn_relu_reference, case, args)
    if not gradients:
        return out, {}, args[3], args[4]
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
    if case.norm == "layer":  # over the channels of each position
        var, mean = torch.var_mean(y, dim=1, unbiased=False)
        invstd = torch.rsqrt(var + 1e-5)
        xhat = (y - mean[:, None]) * invstd[:, None]
        gamma = f64.get("bn_weight", torch.ones(y.shape[1], dtype=y.dtype, device=y.device))
        z = xhat * gamma[:, None] + f64.get("bn_bias", torch.zeros_like(gamma))[:, None]
    elif case.norm != "none":
        if case.norm == "train":
            var, mean = torch.var_mean(y, dim=(0, 2), unbiased=False)
        else:
            mean, var = f64["running_mean"], f64["running_var"]
        invstd = torch.rsqrt(var + 1e-5)
        xhat = (y - mean[:, None]) * invstd[:, None]
        gamma = f64.get("bn_weight", torch.ones_like(mean))
        z = xhat * gamma[:, None] + f64.get("bn_bias", torch.zeros_like(mean))[:, None]
    act = activation_function(case.activation)
    h = act(z) if case.relu_before_add else z
    residual = {"none": 0.0, "identity": f64["x"], "tensor": f64.get("residual")}[case.residual]
    g = f64["grad_out"] * _derivative(act, h + residual)
    if case.relu_before_add:
        g = g * _derivative(act, z)
    scales = {}
    grad_y = g
    if case.norm != "none":
        scales["bn_weight"] = (g * xhat).abs().sum((0, 2)).norm().item()
        scales["bn_bias"] = g.abs().sum((0, 2)).norm().item()
        if case.norm == "layer":
            gg = g * gamma[:, None]
            grad_y = (gg - gg.mean(1, keepdim=True)
                      - xhat * (gg * xhat).mean(1, keepdim=True)) * invstd[:, None]
        else:
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


def _derivative(act, z: torch.Tensor) -> torch.Tensor:
    """d act / dz elementwise at z (float64), by autograd through the reference's act."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(act(leaf).sum(), leaf)
    return grad


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
    return _errors_against_reference(case, inputs, dtype, run_backend(case, inputs, dtype,
                                                                      backend))


def _errors_against_reference(case: Case, inputs, dtype, got, gradients: bool = True,
                              reference=None) -> Dict[str, float]:
    """parity_errors of a run's (out, grads, running mean, running var); `reference`, when
    given, is _reference(case, inputs, gradients) computed before."""
    out, grads, rm, rv = got
    (ref_out, ref_grads, ref_rm, ref_rv), scales = reference or _reference(case, inputs,
                                                                           gradients)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref_out.shape, f"output shape {tuple(out.shape)}, expected {tuple(ref_out.shape)}"
    errors = {"out": rel_err(out, ref_out)}
    for name, ref_grad in ref_grads.items():
        got_grad = grads[name]
        assert got_grad is not None, f"no gradient for {name}"
        assert got_grad.shape == ref_grad.shape, f"grad_{name}: {tuple(got_grad.shape)}"
        errors["grad_" + name] = rel_err(got_grad, ref_grad, scales.get(name))
    if case.norm == "train":
        errors["running_mean"] = rel_err(rm, ref_rm, running_mean_scale(case, inputs))
        errors["running_var"] = rel_err(rv, ref_rv)
    return errors


def running_mean_scale(case: Case, inputs) -> float:
    """The scale a training call's new running mean is judged against, as the per-channel
    sums are (sum_term_scales): ||(1 - m) |old| + m mean|y| ||, y the conv output. The two
    terms can cancel (a channel whose batch mean has the opposite sign of its running mean),
    and then a float32 mean over few values misses 1e-5 of the result itself, plain
    PyTorch's included (4e-5 at one channel of 15 values); where nothing cancels this is the
    result's own size. m is the momentum, or 1/(batches seen + 1) for momentum=None."""
    f64 = {k: v.to(torch.float64) for k, v in inputs.items()}
    y = conv1d(f64["x"], f64["weight"], f64.get("bias"), stride=case.stride,
               dilation=case.dilation, padding=case.padding)
    m = case.momentum if case.momentum is not None else 1.0 / (3 + 1)  # (_run's counter)
    return ((1 - m) * f64["running_mean"].abs() + m * y.abs().mean((0, 2))).norm().item()


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


# --------------------------------------------------------------------------- probes

# A probe keeps what decides a kernel's code path: the geometry (kernel size, dilation,
# stride, padding, length), the norm mode, bias, residual and ReLU placement, dtype, device
# and whether gradients are taken. It shrinks only the batch and the channels: SIMD kernels
# (oneDNN's 16-float blocks, the C++ tiles, Triton's tiles of 16 or more) run whole channel
# blocks and a remainder, so a probe keeps one whole block and the same remainder.
PROBE_BATCH = 2
# The fewest values a channel's batch statistics are taken over in a training probe.
PROBE_MIN_NORM_COUNT = 8
PROBE_CHANNEL_BLOCK = 16


PROBE_MAX_LENGTH = 4096


def probe_channels(channels: int) -> int:
    """The channel count a probe uses for a call's `channels`."""
    block = PROBE_CHANNEL_BLOCK
    return channels if channels <= 2 * block else block + channels % block


def probe_case(call: Call) -> Case:
    """The small Case standing for `call`: its geometry, a batch of at most PROBE_BATCH (in
    training, enough for PROBE_MIN_NORM_COUNT values a channel) and probe_channels
    channels; the residual is an independent tensor of the output's shape."""
    paddings = {mode: conv_padding(call.kernel_size, call.dilation, call.stride, mode)
                for mode in ("causal", "same")}
    padding = next((mode for mode, pads in paddings.items()
                    if pads == (call.pad_left, call.pad_right)), None)
    if padding is None:
        raise ValueError(f"padding ({call.pad_left}, {call.pad_right}) is neither causal nor "
                         f"same for K={call.kernel_size}, dilation={call.dilation}, "
                         f"stride={call.stride}")
    # A long call's probe keeps PROBE_MAX_LENGTH steps (more than any kernel's tile, and at
    # least the padded kernel's span): the first call on a 2M-step input must stay cheap.
    span = (call.kernel_size - 1) * call.dilation + 1
    length = min(call.length, max(PROBE_MAX_LENGTH, 2 * span))
    batch = min(call.batch, PROBE_BATCH)
    if call.norm == NORM_TRAIN:
        # Batch statistics over a handful of values are ill-conditioned: over 2 values a
        # channel normalizes to +-1 whatever the input, its input gradient is ~eps/var, and
        # every float32 kernel is 1e-3 off float64 there. The batch is not geometry (no
        # kernel cuts work by it differently), so a probe takes enough samples to hold
        # PROBE_MIN_NORM_COUNT values a channel.
        batch = max(batch, -(-PROBE_MIN_NORM_COUNT // max(1, call.length_out)))
    return Case(B=batch, C_in=probe_channels(call.c_in),
                C_out=probe_channels(call.c_out), L=length, K=call.kernel_size,
                dilation=call.dilation, stride=call.stride, padding=padding,
                residual="tensor" if call.has_residual else "none", norm=call.norm,
                bias=call.has_bias, relu_before_add=call.relu_before_add, momentum=0.1,
                activation=call.activation)


def probe_bound(call: Call) -> float:
    """docs/spec.md's bound for the call's dtype (and, for CUDA float32, for the TF32 setting
    its convs run under now)."""
    if call.dtype == torch.float32 and call.device_type == "cuda" and cudnn_conv_tf32():
        return TF32_TOLERANCE
    return TOLERANCE[call.dtype]


def _run_probe(case: Case, inputs, call: Call, backend: str):
    """(out, grads, running mean, running var) of `backend` on the probe: straight on the
    backend (ops' run_backend: the call is valid, and nothing asks the dispatcher), outputs
    poisoned, gradients of every input when the call takes gradients."""
    dtype = call.dtype
    args, leaves = _run(case, inputs, dtype, torch.float32 if dtype != torch.float64 else dtype)
    x, weight, bias, rm, rv, gamma, beta, residual, _ = args
    with _alloc.poisoned(), torch.set_grad_enabled(call.needs_grad):
        out = run_validated(
            backend, x, weight, bias, gamma, beta, rm, rv, residual, stride=call.stride,
            dilation=call.dilation, pad_left=call.pad_left, pad_right=call.pad_right,
            norm=call.norm, eps=1e-5, momentum_factor=0.1 if call.norm == NORM_TRAIN else 0.0,
            relu_before_add=call.relu_before_add, needs_grad=call.needs_grad,
            activation=call.activation)
        grads = {}
        if call.needs_grad:
            names = [n for n, t in leaves.items() if t is not None]
            grads = dict(zip(names, torch.autograd.grad(
                out, [leaves[n] for n in names], inputs["grad_out"].to(dtype),
                allow_unused=True)))
    return out.detach(), grads, rm, rv


def probe_errors(call: Call, backend: str, seed: int) -> Dict[str, float]:
    """parity_errors of `backend` on the probe of `call` (inputs drawn from `seed`)."""
    case = probe_case(call)
    inputs, reference = _probe_reference(case, call.dtype, call.device, call.needs_grad, seed)
    return _errors_against_reference(case, inputs, call.dtype,
                                     _run_probe(case, inputs, call, backend),
                                     gradients=call.needs_grad, reference=reference)


# The dispatcher probes every candidate of a new signature in turn: they share the inputs
# and the float64 reference, which cost about as much as a backend's run.
_PROBE_SEED_BASE = random.randrange(2**31)


def probe_seed(call: Call) -> int:
    """The seed of `call`'s probe inputs: fresh in every process, shared by its candidates."""
    return (_PROBE_SEED_BASE + zlib.crc32(call.key().encode())) % 2**31


@functools.lru_cache(maxsize=4)
def _probe_reference(case: Case, dtype: torch.dtype, device: str, gradients: bool, seed: int):
    inputs = make_inputs(case, dtype, device, seed)
    return inputs, _reference(case, inputs, gradients)


def probe(call: Call, backend: str, seed: Optional[int] = None) -> Optional[str]:
    """None if `backend` computes `call`'s geometry within docs/spec.md's bound, else why not.

    The probe is `call` shrunk to a small batch and few channels (probe_case), on random
    inputs (from `seed`, else probe_seed: fresh in each process), outputs poisoned, run on
    `backend` directly; its output, every gradient (when the call takes gradients) and the
    running statistics (in training) are compared with the float64 reference. A failure is
    confirmed on a second draw before it is reported, so one draw that lands near a ReLU
    kink does not exclude a backend; a backend that raises fails with the exception.
    """
    unsupported = get_backend(backend).supports(call)  # (which also loads its kernels)
    if unsupported is not None:
        return f"cannot run it here: {unsupported}"
    seed = probe_seed(call) if seed is None else seed
    bound = probe_bound(call)
    worst = None
    for attempt in range(2):
        try:
            errors = probe_errors(call, backend, (seed + attempt) % 2**31)
        except Exception as exc:  # noqa: BLE001 - a backend that raises is not trusted
            return f"probe raised {type(exc).__name__}: {exc}"
        failed = {k: v for k, v in errors.items() if not v < bound}
        if not failed:
            return None
        name = max(failed, key=failed.get)
        if worst is None:
            worst = (name, failed[name])
    case = probe_case(call)
    return (f"{worst[0]} off by {worst[1]:.2g} (bound {bound:.0e}) against float64 on a "
            f"probe of B={case.B}, C_in={case.C_in}, C_out={case.C_out} (seed {seed})")


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
    # Strided, widely dilated: where PyTorch's CPU float32 weight gradient is wrong (issue
    # 26; the eager backend routes around it): its reproducer, and a causal twin.
    "train,same,s2,d8": Case(B=2, C_in=3, C_out=19, L=64, K=5, dilation=8, stride=2,
                             padding="same"),
    "train+res,s2,d8": Case(B=3, C_in=16, C_out=19, L=100, K=3, dilation=8, stride=2,
                            residual="tensor"),
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
    # The seed of a first draw that missed the bound, where the case was drawn again (see
    # run_check); None where the first draw passed.
    redrawn_from: Optional[int] = None

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
    A case that misses its bound is drawn once more, and fails only if that draw misses too
    (the result keeps the first seed as redrawn_from): one draw can put a pre-ReLU value
    within the dtype's rounding of 0, where the backend's correctly rounded arithmetic and
    the float64 reference fall on either side, and that one flipped mask moves every
    gradient of a small case by a few 1e-2 in 16 bits (1 draw in about 150 of the strided
    residual case, for cpp and composite alike); a wrong kernel misses on every draw.
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
                result = CheckResult(name, label, case_name, errors, tol, seed=case_seed)
                if not result.passed and measure is parity_errors:
                    again = (case_seed + len(plan)) % 2**31  # a seed no other case draws
                    result = CheckResult(name, label, case_name,
                                         measure(case, name, dtype, device, again), tol,
                                         seed=again, redrawn_from=case_seed)
            results.append(result)
        except Exception as exc:  # noqa: BLE001 - report the failure and go on
            results.append(CheckResult(name, label, case_name, {}, tol, seed=case_seed,
                                       error=f"{type(exc).__name__}: {exc}"))
    return results


# --------------------------------------------------------------------------- PyTorch's kernels

# PyTorch's own conv1d (what the eager backend and plain models run) is judged as the
# backends are: `fastres check` prints a wrong upstream kernel as such, apart from the
# backends' pass/fail. The grid holds the geometries where oneDNN's float32 weight gradient
# was found wrong (stride >= 2 with wide padding: issue 26, benchmarks/upstream_conv1d_wgrad.py)
# and their neighbours: both paddings users write ("same" and a causal conv's (K-1)*d on
# both sides, chomped), K 3/5/7, dilation 1-16, stride 1-3, two lengths.


@dataclasses.dataclass(frozen=True)
class Conv1dCase:
    """One F.conv1d call (symmetric zero padding, as users write it)."""

    B: int
    C_in: int
    C_out: int
    L: int
    K: int
    dilation: int
    stride: int
    padding: int

    @property
    def L_out(self) -> int:
        return (self.L + 2 * self.padding - self.dilation * (self.K - 1) - 1) // self.stride + 1

    def __str__(self) -> str:
        return (f"F.conv1d(x {self.B}x{self.C_in}x{self.L}, weight {self.C_out}x{self.C_in}x"
                f"{self.K}, stride={self.stride}, dilation={self.dilation}, "
                f"padding={self.padding})")


UPSTREAM_CASES: List[Conv1dCase] = [
    Conv1dCase(2, 3, 19, length, k, d, s, pad)
    for k, d, s, length in itertools.product((3, 5, 7), (1, 4, 8, 16), (1, 2, 3), (64, 100))
    for pad in dict.fromkeys(((k - 1) * d // 2, (k - 1) * d))
]

# What each compared quantity is, in the words `fastres check` prints.
UPSTREAM_QUANTITIES = {"out": "output", "grad_x": "input gradient",
                       "grad_weight": "weight gradient", "grad_bias": "bias gradient"}


@dataclasses.dataclass
class UpstreamResult:
    case: Conv1dCase
    dtype: str
    errors: Dict[str, float]
    tol: float
    seed: int

    @property
    def wrong(self) -> Dict[str, float]:
        return {k: v for k, v in self.errors.items() if not v < self.tol}

    def describe(self) -> List[str]:
        """One line per wrong quantity: "PyTorch's conv1d weight gradient is wrong here: ..."."""
        return [f"PyTorch's conv1d {UPSTREAM_QUANTITIES[name]} is wrong here: {self.case}, "
                f"{self.dtype}: relative error {error:.2g} against float64 (bound "
                f"{self.tol:.0e}, seed {self.seed})" for name, error in self.wrong.items()]


def conv1d_errors(case: Conv1dCase, dtype: torch.dtype, device="cpu", seed: int = 0
                  ) -> Dict[str, float]:
    """PyTorch's F.conv1d in `dtype` against itself in float64 on the same rounded inputs:
    relative error of the output and of the input, weight and bias gradients (the bias
    gradient, a sum over (batch, length), against the size of what it sums)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    masters = [rnd(case.B, case.C_in, case.L), rnd(case.C_out, case.C_in, case.K),
               rnd(case.C_out), rnd(case.B, case.C_out, case.L_out)]
    masters = [t.to(dtype).to(torch.float64).to(device) for t in masters]

    def run(run_dtype):
        x, weight, bias = (t.to(run_dtype).requires_grad_() for t in masters[:3])
        with torch.enable_grad():
            out = F.conv1d(x, weight, bias, stride=case.stride, padding=case.padding,
                           dilation=case.dilation)
            grads = torch.autograd.grad(out, (x, weight, bias), masters[3].to(run_dtype))
        return (out.detach(),) + grads

    got, ref = run(dtype), run(torch.float64)
    scales = {"grad_bias": masters[3].abs().sum((0, 2)).norm().item()}
    return {name: rel_err(a, b, scales.get(name))
            for name, a, b in zip(UPSTREAM_QUANTITIES, got, ref)}


def check_upstream(device: str = "cpu", cases: Optional[Sequence[Conv1dCase]] = None,
                   seed: Optional[int] = None) -> List[UpstreamResult]:
    """PyTorch's float32 conv1d (forward, input, weight and bias gradients; CUDA with TF32
    off) against float64 over `cases` (UPSTREAM_CASES), fresh inputs unless `seed`."""
    cases = UPSTREAM_CASES if cases is None else cases
    base = random.randrange(2**31) if seed is None else seed
    results = []
    with cudnn_conv_tf32_set(False):
        for i, case in enumerate(cases):
            case_seed = (base + i) % 2**31
            errors = conv1d_errors(case, torch.float32, device, case_seed)
            results.append(UpstreamResult(case, "float32", errors, TOLERANCE[torch.float32],
                                          case_seed))
    return results
