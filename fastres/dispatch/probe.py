"""Trust, then time: a candidate runs a call signature only once it computed that geometry
right.

PyTorch's own kernels can be wrong where nobody looked: on x86 CPUs, torch 2.11-2.14's
oneDNN float32 conv1d weight gradient is unrelated to the true one for strided convs with a
wide dilated kernel (benchmarks/upstream_conv1d_wgrad.py reproduces it). So before a
candidate backend (eager included) is timed for a new signature, it runs a probe of that
geometry (the same kernel size, dilation, stride, padding, norm mode and residual; a small
batch and at most PROBE_CHANNELS channels, length bounded by PROBE_MAX_LENGTH) and its
output, every gradient and the running statistics are compared with the float64 reference
(fastres/reference.py, the independent oracle) within docs/spec.md's bound. A candidate
that fails is left out of the choice, with the error as its reason.

It runs the backends through their contract directly (fused: forward and backward; eager:
under autograd), not through the op: the op chooses through this package.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import backends, reference
from ..backends import Call
from ..conventions import NORM_NONE, NORM_TRAIN, rel_err, stats_dtype

BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
          torch.bfloat16: 1e-2}
PROBE_BATCH = 2
PROBE_CHANNELS = 16
PROBE_MAX_LENGTH = 1024
MOMENTUM = 0.1
EPS = 1e-5


def probe_call(call: Call) -> Call:
    """The small call that stands for `call` (same geometry, few channels, short)."""
    length = min(call.length, max(PROBE_MAX_LENGTH, call.pad_left + call.pad_right
                                  + (call.kernel_size - 1) * call.dilation + 2))
    c_out = call.c_in if call.has_residual and call.c_in == call.c_out else \
        min(call.c_out, PROBE_CHANNELS)
    return Call(call.device, call.dtype, min(call.batch, PROBE_BATCH),
                min(call.c_in, PROBE_CHANNELS) if c_out != call.c_in else c_out, c_out, length,
                call.kernel_size, call.stride, call.dilation, call.pad_left, call.pad_right,
                call.norm, call.has_bias, call.has_residual, call.relu_before_add,
                call.needs_grad)


def check(call: Call, backend: str, seed: int = 0) -> Optional[str]:
    """None if `backend` computes `call`'s geometry within the spec's bound, else why not.

    A failure is confirmed on a second draw before it is reported, so only a backend that
    is wrong (not one unlucky draw near a ReLU kink) is left out.
    """
    small = probe_call(call)
    first = _errors(small, backend, seed)
    worst = _worst(first, call.dtype)
    if worst is None:
        return None
    if _worst(_errors(small, backend, seed + 1), call.dtype) is None:
        return None
    name, error = worst
    return (f"failed its correctness probe: {name} off by {error:.2g} against float64 "
            f"(bound {BOUNDS[call.dtype]:.0e})")


def _worst(errors: Dict[str, float], dtype: torch.dtype):
    bad = {k: v for k, v in errors.items() if not v < BOUNDS[dtype]}
    return max(bad.items(), key=lambda kv: kv[1]) if bad else None


def _padding(call: Call) -> str:
    causal = (call.kernel_size - 1) * call.dilation
    return "causal" if (call.pad_left, call.pad_right) == (causal, 0) else "same"


def _errors(call: Call, name: str, seed: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    device, dtype = torch.device(call.device), call.dtype
    out_len = call.length_out

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype) \
            .to(torch.float64)

    x = draw(call.batch, call.c_in, call.length)
    weight = draw(call.c_out, call.c_in, call.kernel_size,
                  scale=(call.c_in * call.kernel_size) ** -0.5)
    bias = draw(call.c_out, scale=0.5) if call.has_bias else None
    residual = draw(call.batch, call.c_out, out_len) if call.has_residual else None
    grad_out = draw(call.batch, call.c_out, out_len)
    norm = call.norm != NORM_NONE
    gamma = torch.rand(call.c_out, generator=g, dtype=torch.float64) + 0.5 if norm else None
    beta = torch.randn(call.c_out, generator=g, dtype=torch.float64) * 0.3 if norm else None
    mean = torch.randn(call.c_out, generator=g, dtype=torch.float64) * 0.3 if norm else None
    var = torch.rand(call.c_out, generator=g, dtype=torch.float64) + 0.5 if norm else None
    leaves = {"x": x, "weight": weight, "bias": bias, "bn_weight": gamma, "bn_bias": beta,
              "residual": residual}
    leaves = {k: v for k, v in leaves.items() if v is not None}

    ref_leaves = {k: v.clone().requires_grad_(call.needs_grad) for k, v in leaves.items()}
    ref_stats = [None if t is None else t.clone() for t in (mean, var)]
    ref_out = reference.conv_bn_relu_reference(
        ref_leaves["x"], ref_leaves["weight"], ref_leaves.get("bias"), ref_stats[0],
        ref_stats[1], ref_leaves.get("bn_weight"), ref_leaves.get("bn_bias"),
        training=call.norm == NORM_TRAIN, momentum=MOMENTUM, eps=EPS, stride=call.stride,
        dilation=call.dilation, padding=_padding(call), residual=ref_leaves.get("residual"),
        relu_before_add=call.relu_before_add, norm="batch" if norm else None)
    got_out, got_grads, got_stats = _run(call, name, leaves, (mean, var), grad_out, device)
    errors = {"out": rel_err(got_out.double().cpu(), ref_out.detach())}
    if call.needs_grad:
        names = list(ref_leaves)
        ref_grads = torch.autograd.grad(ref_out, [ref_leaves[k] for k in names], grad_out)
        floors = _sum_floors(call, grad_out, x)
        for key, ref_grad in zip(names, ref_grads):
            got = got_grads[key].double().cpu()
            scale = max(ref_grad.norm().item(), floors.get(key, 0.0))
            errors["grad_" + key] = rel_err(got, ref_grad, scale) if scale > 0 else \
                rel_err(got, ref_grad)
    if call.norm == NORM_TRAIN:
        for key, got, ref in zip(("running_mean", "running_var"), got_stats, ref_stats):
            errors[key] = rel_err(got.double().cpu(), ref)
    return errors


def _sum_floors(call: Call, grad_out: torch.Tensor, x: torch.Tensor) -> Dict[str, float]:
    """Scales below which a gradient that is a per-channel sum is judged absolutely.

    The conv bias under training batch norm has a zero gradient in exact arithmetic (the
    mean subtraction cancels it), and the norm's gamma and beta gradients are sums over
    batch and length that can cancel: a float32 sum is accurate to its terms' size, not to
    the result's. So these are judged against (a bound on) the size of their terms, as the
    parity harness does (fastres/parity.py, sum_term_scales). The same holds for the weight
    gradient of a channel with two weights under training batch norm (one direction left).
    """
    terms = grad_out.abs().sum((0, 2)).norm().item()
    floors = {"bn_bias": terms, "bn_weight": 4 * terms}
    if call.norm == NORM_TRAIN:
        floors["bias"] = 4 * terms
        if call.c_in * call.kernel_size <= 2:
            floors["weight"] = 4 * terms * x.abs().max().item()
    return floors


def _run(call: Call, name: str, leaves, stats, grad_out, device):
    """(out, {leaf: grad}, (running_mean, running_var)) of backend `name` on the probe."""
    dtype, sdt = call.dtype, stats_dtype(call.dtype)
    norm = call.norm != NORM_NONE
    t = {k: v.to(device=device, dtype=sdt if k.startswith("bn_") else dtype)
         .requires_grad_(call.needs_grad and name == "eager") for k, v in leaves.items()}
    running = [None if s is None else s.to(device=device, dtype=sdt) for s in stats]
    geometry = dict(stride=call.stride, dilation=call.dilation, pad_left=call.pad_left,
                    pad_right=call.pad_right, norm=call.norm, eps=EPS,
                    momentum_factor=MOMENTUM if call.norm == NORM_TRAIN else 0.0,
                    relu_before_add=call.relu_before_add)
    grad = grad_out.to(device=device, dtype=dtype)
    backend = backends.get(name)
    if not backend.fused:
        with torch.enable_grad():
            out = backend.run(t["x"], t["weight"], t.get("bias"), t.get("bn_weight"),
                              t.get("bn_bias"), running[0], running[1], t.get("residual"),
                              **geometry)
            grads = {}
            if call.needs_grad:
                keys = list(t)
                grads = dict(zip(keys, torch.autograd.grad(out, [t[k] for k in keys], grad)))
        return out.detach(), grads, running
    out, saved, bits, _, batch_var = backend.forward(
        t["x"], t["weight"], t.get("bias"), t.get("bn_weight"), t.get("bn_bias"), running[0],
        running[1], t.get("residual"), save_for_backward=call.needs_grad, **geometry)
    grads = {}
    if call.needs_grad:
        del geometry["momentum_factor"]
        var = batch_var if call.norm == NORM_TRAIN else running[1]
        got = backend.backward(
            grad.contiguous(), t["x"], t["weight"], t.get("bn_weight"), t.get("bn_bias"),
            saved, out, var if var is not None else t["x"].new_empty(0), mask_bits=bits,
            has_bias=call.has_bias, has_residual=call.has_residual, need_grad_x=True,
            **geometry)
        for key, g in zip(("x", "weight", "bias", "bn_weight", "bn_bias", "residual"), got):
            if key in t:
                grads[key] = g
    return out, grads, running if norm else (None, None)
