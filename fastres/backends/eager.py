"""Eager: no fused kernel. The stage composed from PyTorch's own kernels under autograd.

The dispatcher routes a call here wherever no fused kernel is faster, so the default never
makes a user slower than plain PyTorch: this is exactly what users write (F.conv1d, which
calls oneDNN on CPU and cuDNN on CUDA, F.batch_norm, F.relu). It is its own implementation,
not fastres/reference.py: the reference judges it like any other backend.

16-bit inputs are computed in float32 (docs/spec.md: accumulate in float32 whatever the
input dtype): rounding the conv output to 16 bits before batch norm costs 2-3e-2 in the
gradients, past the 1e-2 bound.

One PyTorch kernel is routed around (`conv1d`): oneDNN's float32 conv weight gradient on
x86 CPUs, which is unrelated to the true gradient (relative error about 1) for some strided
convs with wide padding, while its output and input gradient are right
(fastres/upstream_kernels.py; reproducer: benchmarks/upstream_conv1d_wgrad.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import upstream_kernels
from ..conventions import (HALF_DTYPES, NORM_EVAL, NORM_LAYER, NORM_NONE, NORM_TRAIN,
                           autocast_dtype, output_length)
from ._activation import activation_function
from .base import Backend

_ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, dilation: int,
          pad_left: int, pad_right: int) -> Tensor:
    """F.conv1d with asymmetric zero padding and no padded copy of x where avoidable."""
    if pad_left == pad_right:
        return F.conv1d(x, weight, bias, stride=stride, padding=pad_left, dilation=dilation)
    # Pad the larger side's amount on both and drop the outputs only the extra zeros made.
    pad = max(pad_left, pad_right)
    y = F.conv1d(x, weight, bias, stride=stride, padding=pad, dilation=dilation)
    k = weight.shape[-1]
    l_out = output_length(x.shape[-1], k, dilation, stride, pad_left, pad_right)
    if pad_left >= pad_right:  # causal: the extra outputs are at the end (the "chomp")
        # (made contiguous: batch norm over the strided view ran slower than this copy costs,
        # forward and backward; benchmarks/NOTES.md, issue 21, seventh session)
        return y[..., :l_out].contiguous()
    # More zeros on the right (same padding, odd total): the extra outputs are at the start,
    # which only works out on the stride grid at stride 1, where PyTorch's "same" is exact.
    return F.conv1d(x, weight, bias, padding="same", dilation=dilation)


def conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, dilation: int,
           pad_left: int, pad_right: int) -> Tensor:
    """_conv, whose weight gradient avoids PyTorch's CPU kernel where that is known wrong:
    strided float32 convs on oneDNN, whose weight gradient can be unrelated to the true one
    (benchmarks/upstream_conv1d_wgrad.py reproduces it; upstream_kernels.weight_grad_at_risk
    says where, and why that is wider than the failures seen). There the conv runs with the
    weight detached and the weight gradient comes from a matmul over x's columns; a 1-tap
    conv runs unstrided on every stride-th position instead (one_tap_conv1d)."""
    if not upstream_kernels.weight_grad_at_risk(x, weight, stride):
        return _conv(x, weight, bias, stride, dilation, pad_left, pad_right)
    if weight.shape[-1] == 1:  # (no route needed: no strided kernel)
        return upstream_kernels.one_tap_conv1d(x, weight, bias, stride, pad_left, pad_right)
    y = _conv(x, weight.detach(), bias, stride, dilation, pad_left, pad_right)
    return upstream_kernels.route_weight_grad(y, x, weight, stride, dilation, pad_left,
                                              pad_right)


def conv_bn_relu_eager(x, weight, bias, gamma, beta, running_mean, running_var, residual, *,
                       stride, dilation, pad_left, pad_right, norm, eps, momentum_factor,
                       relu_before_add, activation="relu"):
    """act([act](batch_norm(conv1d(x))) + residual) in PyTorch ops, under autograd; act is
    ReLU unless `activation` names another (docs/spec.md, "Activation").

    Arguments as the backend contract's forward (docs/spec.md), except that gamma/beta may
    be None and the running statistics are updated by F.batch_norm itself.
    """
    # No parser's dataclass: torch.compile traces this function, and older dynamo (torch
    # 2.11) cannot trace the cached parser's frozen dataclass.
    act = torch.relu if activation == "relu" else activation_function(activation)
    compute = torch.float32 if x.dtype in HALF_DTYPES else x.dtype
    up = (lambda t: t) if compute == x.dtype else (  # noqa: E731
        lambda t: None if t is None else t.to(compute))
    # (entering torch.autocast costs microseconds: only where autocast is on)
    device_type = x.device.type
    no_autocast = torch.autocast(device_type, enabled=False) \
        if autocast_dtype(device_type) is not None else contextlib.nullcontext()
    with no_autocast:
        z = conv1d(up(x), up(weight), up(bias), stride, dilation, pad_left, pad_right)
        if norm == NORM_LAYER:  # over the channels at each position
            z = F.layer_norm(z.transpose(1, 2), (z.shape[1],), up(gamma), up(beta),
                             eps).transpose(1, 2)
        elif norm != NORM_NONE:
            stats = [running_mean, running_var]
            # Running statistics of another dtype (a model moved to 16 bits whole) are
            # updated through compute-dtype copies, written back below.
            work = [t if t is None or t.dtype == compute else t.to(compute) for t in stats]
            if norm == NORM_EVAL and eps == 0:
                # (y - mean) / sqrt(var) as docs/spec.md has it: with a zero variance
                # F.batch_norm's kernel for contiguous input folds 1/sqrt(0) into a scale
                # and a shift, and gives NaN where the spec has +-inf.
                z = (z - work[0][:, None]) / work[1][:, None].sqrt()
                z = z if gamma is None else z * up(gamma)[:, None]
                z = z if beta is None else z + up(beta)[:, None]
            else:
                z = F.batch_norm(z, work[0], work[1], up(gamma), up(beta), norm == NORM_TRAIN,
                                 momentum_factor, eps)
            if norm == NORM_TRAIN:
                with torch.no_grad():
                    for stat, copy in zip(stats, work):
                        if copy is not stat:
                            stat.copy_(copy)
        if relu_before_add:
            z = act(z)
        out_dtype = x.dtype
        if residual is not None:
            z = z + up(residual)
            # A skip stream of higher precision (float32 under autocast) keeps the sum so.
            out_dtype = torch.promote_types(x.dtype, residual.dtype)
        return act(z).to(out_dtype)


class EagerBackend(Backend):
    name = "eager"
    devices = ("cpu", "cuda", "meta")
    dtypes = _ALL_FLOATS
    fused = False
    activations = "all"
    layer_norm = True
    description = "PyTorch's own kernels (oneDNN / cuDNN) under autograd: no fused kernel"

    @staticmethod
    def run(*args, **kwargs) -> Tensor:
        return conv_bn_relu_eager(*args, **kwargs)
