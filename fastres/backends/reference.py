"""Reference backend: the spec run through autograd, on any device.

It also documents the contract every backend implements.

forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, *, stride, dilation,
        pad_left, pad_right, norm_mode, eps, relu_before_add, save_y)
    x (B, C_in, L); weight (C_out, C_in, K); bias (C_out,) or None;
    residual (B, C_out, L_out) or None. All of x's dtype.
    norm_mode "train": batch statistics; "eval": normalize with mean/var (the running
    statistics, float32 or float64); "none": no batch norm (bn_* and mean/var are None).
    In "train"/"eval" bn_weight and bn_bias are given (float32/float64, never None).
    Returns (out, y, mean, var):
      out  (B, C_out, L_out), x.dtype: relu(bn(conv(x)) + residual)
      y    (B, C_out, L_out), x.dtype: the conv output (bias included) when save_y, else an
           empty tensor. Backward recomputes normalized values and masks from it.
      mean, var  (C_out,) float32 (float64 for float64 x): in "train" the batch mean and
           biased batch variance; empty tensors otherwise (outputs may not alias inputs).

backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, *,
         has_residual, stride, dilation, pad_left, pad_right, norm_mode, eps,
         relu_before_add)
    The saved tensors of forward: y whenever norm_mode != "none" or relu_before_add;
    mean/var the statistics forward normalized with (batch or running). Returns (grad_x, grad_weight, grad_bias, grad_bn_weight,
    grad_bn_bias, grad_residual); None for an input that is absent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _alloc

NAME = "reference"
DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def unavailable_reason():
    return None


def _compute_dtype(dtype):
    # Accumulate in float32 whatever the input dtype (float64 stays float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv(x, weight, bias, stride, dilation, pad_left, pad_right):
    return F.conv1d(F.pad(x, (pad_left, pad_right)), weight, bias, stride=stride, dilation=dilation)


def _normalized(y, mean, var, bn_weight, bn_bias, norm_mode, eps, relu_before_add):
    """bn(y), relu'd when relu_before_add: the term the residual is added to."""
    z = y
    if norm_mode != "none":
        scale = bn_weight * torch.rsqrt(var + eps)
        z = (y - mean[:, None]) * scale[:, None] + bn_bias[:, None]
    return torch.relu(z) if relu_before_add else z


def forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, *, stride, dilation,
            pad_left, pad_right, norm_mode, eps, relu_before_add, save_y):
    ct = _compute_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    y = _conv(cast(x), cast(weight), cast(bias), stride, dilation, pad_left, pad_right)
    if norm_mode == "train":
        var, mean = torch.var_mean(y, dim=(0, 2), unbiased=False)
    elif norm_mode == "eval":
        mean, var = mean.to(ct), var.to(ct)
    out = _normalized(y, mean, var, cast(bn_weight), cast(bn_bias), norm_mode, eps, relu_before_add)
    if residual is not None:
        out = out + cast(residual)
    out = torch.relu(out)
    y_saved = _alloc.empty(y.shape if save_y else (0,), dtype=x.dtype, device=x.device)
    if save_y:
        y_saved.copy_(y)
    if norm_mode != "train":
        mean, var = y.new_empty(0), y.new_empty(0)
    result = _alloc.empty(out.shape, dtype=x.dtype, device=x.device)
    return result.copy_(out), y_saved, mean, var


def backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, *, has_residual,
             stride, dilation, pad_left, pad_right, norm_mode, eps, relu_before_add):
    """The analytic backward every fused backend reproduces, in the compute dtype.

    With xhat = (y - mean) * invstd, N = B * L_out, and g the incoming gradient through
    the ReLU masks (out > 0, and bn(y) > 0 when relu_before_add):
      grad_residual = g;  grad_beta = sum g;  grad_gamma = sum g * xhat
      grad_y = gamma * invstd * g                                   (eval)
      grad_y = gamma * invstd * (g - grad_beta / N - xhat * grad_gamma / N)   (train)
      grad_bias = sum grad_y; grad_x, grad_weight: the conv's data and weight gradients.
    """
    ct = _compute_dtype(x.dtype)
    g = grad_out.to(ct) * (out > 0)
    grad_residual = g.to(x.dtype) if has_residual else None
    grad_gamma = grad_beta = None
    if norm_mode != "none":
        mean, var, gamma = mean.to(ct), var.to(ct), bn_weight.to(ct)
        invstd = torch.rsqrt(var + eps)
        xhat = (y.to(ct) - mean[:, None]) * invstd[:, None]
        if relu_before_add:
            g = g * (xhat * gamma[:, None] + bn_bias.to(ct)[:, None] > 0)
        grad_beta = g.sum((0, 2))
        grad_gamma = (g * xhat).sum((0, 2))
        grad_y = g
        if norm_mode == "train":
            n = g.shape[0] * g.shape[2]
            grad_y = g - (grad_beta / n)[:, None] - xhat * (grad_gamma / n)[:, None]
        grad_y = grad_y * (gamma * invstd)[:, None]
        grad_gamma, grad_beta = grad_gamma.to(bn_weight.dtype), grad_beta.to(bn_bias.dtype)
    else:
        if relu_before_add:
            g = g * (y > 0)
        grad_y = g
    x_padded_shape = x.shape[:2] + (x.shape[2] + pad_left + pad_right,)
    grad_x = torch.nn.grad.conv1d_input(x_padded_shape, weight.to(ct), grad_y, stride=stride,
                                        dilation=dilation)
    grad_x = grad_x[:, :, pad_left:pad_left + x.shape[2]]
    grad_weight = torch.nn.grad.conv1d_weight(F.pad(x.to(ct), (pad_left, pad_right)),
                                              weight.shape, grad_y, stride=stride,
                                              dilation=dilation)
    grad_bias = None if bias is None else grad_y.sum((0, 2)).to(bias.dtype)
    return (grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias, grad_gamma, grad_beta,
            grad_residual)
