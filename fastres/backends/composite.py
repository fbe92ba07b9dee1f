"""Composite backend: the stage as PyTorch ops inside the custom op, with the analytic backward.

It is the template every fused backend reproduces: the same forward/backward contract
(docs/spec.md, "Backend contract"), the same saved tensor (x-hat, not y) and the same
backward formulas, written as plain tensor ops in the compute dtype (float32 for 16-bit
inputs, float64 for float64). It runs on any device and is never the default: it exists to
be compared against, and to show in the fewest lines what the kernels compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _alloc, conventions
from ..conventions import NORM_LAYER, NORM_NONE, NORM_TRAIN, stats_dtype
from ._activation import parse_activation


def unavailable_reason():
    return None


def forward(x, weight, bias, gamma, beta, running_mean, running_var, residual, *, stride,
            dilation, pad_left, pad_right, norm, eps, momentum_factor, relu_before_add,
            save_for_backward, activation="relu"):
    act = parse_activation(activation)
    ct = stats_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    y = F.conv1d(F.pad(cast(x), (pad_left, pad_right)), cast(weight), cast(bias),
                 stride=stride, dilation=dilation)
    batch_mean, batch_var = y.new_empty(0), y.new_empty(0)
    xhat = y
    if norm == NORM_LAYER:
        # Over the channels of each position; its statistics, (B, L_out), are returned.
        var, mean = torch.var_mean(y, dim=1, unbiased=False)
        batch_mean, batch_var = mean, var
        xhat = (y - mean[:, None]) * torch.rsqrt(var + eps)[:, None]
        z = xhat * cast(gamma)[:, None] + cast(beta)[:, None]
    elif norm != NORM_NONE:
        if norm == NORM_TRAIN:
            var, mean = torch.var_mean(y, dim=(0, 2), unbiased=False)
            batch_mean, batch_var = mean, var
            if running_mean is not None:
                n = y.shape[0] * y.shape[2]
                with torch.no_grad():
                    running_mean.mul_(1 - momentum_factor).add_(mean, alpha=momentum_factor)
                    running_var.mul_(1 - momentum_factor).add_(var * (n / (n - 1)),
                                                               alpha=momentum_factor)
        else:
            mean, var = running_mean.to(ct), running_var.to(ct)
        xhat = (y - mean[:, None]) * torch.rsqrt(var + eps)[:, None]
        z = xhat * cast(gamma)[:, None] + cast(beta)[:, None]
    else:
        z = y
    if relu_before_add:
        z = act(z)
    if residual is not None:
        z = z + cast(residual)
    out = _alloc.empty(z.shape, dtype=x.dtype, device=x.device).copy_(act(z))
    # Another activation than ReLU differentiates at its input, recomputed from x-hat (y
    # without norm): what every kernel backend saves (conventions.saves_for_backward).
    wanted = conventions.saves_for_backward(save_for_backward, norm, relu_before_add,
                                            activation)
    sdt = conventions.saved_dtype(x.dtype, norm, relu_before_add, activation)
    saved = _alloc.empty(z.shape if wanted else (0,), dtype=sdt, device=x.device)
    if wanted:
        saved.copy_(xhat)
    return out, saved, batch_mean, batch_var


def backward(grad_out, x, weight, gamma, beta, saved, out, var, *, has_bias, has_residual,
             stride, dilation, pad_left, pad_right, norm, eps, relu_before_add,
             need_grad_x=True, activation="relu", residual=None):
    """The analytic backward (docs/spec.md), in the compute dtype.

    residual: needed for every activation but ReLU after a residual add (the derivative is
    taken at the add's result, recomputed here)."""
    act = parse_activation(activation)
    ct = stats_dtype(x.dtype)
    if act.is_relu:
        # ReLU passes the gradient where its output is positive or NaN, as torch.relu does.
        g = torch.where(out <= 0, 0.0, grad_out.to(ct))
    else:
        # At the activation's input, recomputed from saved (and the residual) in the
        # compute dtype: a derivative from a 16-bit output (tanh's 1 - out^2) would carry
        # its rounding, as the kernel backends' would.
        if has_residual and residual is None:
            raise ValueError(f"the backward of activation {activation!r} after a residual add "
                             "needs the residual (its derivative is taken at the sum)")
        z1 = saved.to(ct) if norm == NORM_NONE else \
            saved.to(ct) * gamma.to(ct)[:, None] + beta.to(ct)[:, None]
        z2 = act(z1) if relu_before_add else z1
        if has_residual:
            z2 = z2 + residual.to(ct)
        g = grad_out.to(ct) * act.grad_from_input(z2)
    grad_residual = g.to(x.dtype) if has_residual else None
    grad_gamma = grad_beta = None
    if norm != NORM_NONE:
        xhat = saved.to(ct)
        gamma_c = gamma.to(ct)
        if relu_before_add:
            z1 = xhat * gamma_c[:, None] + beta.to(ct)[:, None]
            g = torch.where(z1 <= 0, 0.0, g) if act.is_relu else g * act.grad_from_input(z1)
        grad_beta = g.sum((0, 2))
        grad_gamma = (g * xhat).sum((0, 2))
        grad_y = g
        if norm == NORM_LAYER:
            # var: (B, L_out), per position; the projection runs over its channels.
            gg = g * gamma_c[:, None]
            grad_y = (gg - gg.mean(1, keepdim=True)
                      - xhat * (gg * xhat).mean(1, keepdim=True)) \
                * torch.rsqrt(var.to(ct) + eps)[:, None]
        else:
            if norm == NORM_TRAIN:
                n = g.shape[0] * g.shape[2]
                grad_y = g - (grad_beta / n)[:, None] - xhat * (grad_gamma / n)[:, None]
            grad_y = grad_y * (gamma_c * torch.rsqrt(var.to(ct) + eps))[:, None]
        grad_gamma, grad_beta = grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)
    else:
        if relu_before_add:
            g = torch.where(saved <= 0, 0.0, g) if act.is_relu \
                else g * act.grad_from_input(saved.to(ct))
        grad_y = g
    grad_x = None
    if need_grad_x:
        x_padded_shape = x.shape[:2] + (x.shape[2] + pad_left + pad_right,)
        grad_x = torch.nn.grad.conv1d_input(x_padded_shape, weight.to(ct), grad_y,
                                            stride=stride, dilation=dilation)
        grad_x = grad_x[:, :, pad_left:pad_left + x.shape[2]].contiguous().to(x.dtype)
    grad_weight = torch.nn.grad.conv1d_weight(F.pad(x.to(ct), (pad_left, pad_right)),
                                              weight.shape, grad_y, stride=stride,
                                              dilation=dilation)
    grad_bias = grad_y.sum((0, 2)).to(x.dtype) if has_bias else None
    return (grad_x, grad_weight.to(weight.dtype), grad_bias, grad_gamma, grad_beta,
            grad_residual)
