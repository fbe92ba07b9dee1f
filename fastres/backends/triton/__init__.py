"""Triton backend: the fused op as Triton kernels, forward and backward.

Implements the contract in fastres/backends/reference.py. Kernels live one stage per
sibling module; this file only sizes tiles, allocates (through fastres._alloc) and
launches. Triton itself is imported on first use, so a machine without it gets a reason
from unavailable_reason() instead of an ImportError.

Training step, kernels and HBM passes over a B*C*L activation (SPEC.md's model):
  forward   conv_forward_kernel (MODE_TRAIN)  read x, write y (float32), per-tile (mean, M2)
            welford_merge_kernel               C-sized: batch mean, biased var
            bn_relu_apply_kernel               read y + residual, write out
                                               (+ write the x.dtype y backward saves, for
                                               fp16/bf16 when grad is needed)
  backward  relu_bn_backward_kernel (reduce)   read grad_out, out, y; write grad_residual
            sum_partials_kernel x2             C-sized: grad_beta, grad_gamma
            relu_bn_backward_kernel (grad_y)   read grad_out, out, y; write grad_y
            sum_partials_kernel                C-sized: grad_bias
            conv_dgrad_kernel                  read grad_y, write grad_x
            conv_wgrad_kernel + sum_partials   read grad_y, x; (n_splits, C_out*C_in*K) partials
Forward: 5 activation passes (the SPEC floor) for float32; for fp16/bf16 y travels as
float32 (2x bytes) and the saved copy is one more write. Backward: 9 reads + 3 writes
(2 writes without a residual). Eval / no-norm forward is conv_forward_kernel alone: read x
(+ residual), write out (+ y when backward needs it).
All reductions are per-tile partials merged in a fixed order: no atomics, bitwise
reproducible run to run.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ... import _alloc

NAME = "triton"
DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


_NORM_CODE = {"none": 0, "eval": 1, "train": 2}


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, **kwargs):
    with _on_device(x):
        return _forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, **kwargs)


def backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, **kwargs):
    with _on_device(x):
        return _backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var,
                         **kwargs)


def _forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, *, stride, dilation,
             pad_left, pad_right, norm_mode, eps, relu_before_add, save_y):
    from . import batch_stats, bn_apply, conv_forward, tiling
    from .tiling import cdiv, conv_tiles, dot_precision, dot_upcast, elementwise_tiles

    x, weight = x.contiguous(), weight.contiguous()
    residual = None if residual is None else residual.contiguous()
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    L_out = (L + pad_left + pad_right - dilation * (K - 1) - 1) // stride + 1
    shape = (B, C_out, L_out)
    block_ci, block_co, block_l = conv_tiles(C_in, C_out, L_out)
    n_lblocks = cdiv(L_out, block_l)
    grid = (B * n_lblocks, cdiv(C_out, block_co))
    stats_dtype = torch.float32
    train = norm_mode == "train"

    out = _alloc.empty(shape, dtype=x.dtype, device=x.device)
    # Training normalizes y in a second pass; 16-bit inputs keep it in float32 in between
    # (see bn_apply.py) and write the x.dtype copy backward needs from the apply kernel.
    y_dtype = torch.float32 if (train and tiling.TRAIN_Y_FLOAT32) else x.dtype
    y = _alloc.empty(shape if (save_y or train) else (0,), dtype=y_dtype, device=x.device)
    dummy = out  # pointer for absent operands; never dereferenced (flags are constexpr)
    part_mean = part_m2 = dummy
    if train:
        part_mean = _alloc.empty((B * n_lblocks, C_out), dtype=stats_dtype, device=x.device)
        part_m2 = _alloc.empty((B * n_lblocks, C_out), dtype=stats_dtype, device=x.device)
    use = lambda t: dummy if t is None else t  # noqa: E731
    conv_forward.conv_forward_kernel[grid](
        x, weight, use(bias), y if y.numel() else dummy, out, use(residual),
        use(mean), use(var), use(bn_weight), use(bn_bias), part_mean, part_m2,
        C_in, C_out, L, L_out, K, stride, dilation, pad_left, float(eps),
        MODE=_NORM_CODE[norm_mode], HAS_BIAS=bias is not None, SAVE_Y=save_y,
        HAS_RES=residual is not None, RELU_BEFORE_ADD=bool(relu_before_add),
        DOT_PRECISION=dot_precision(x.dtype, x.device), DOT_UPCAST=dot_upcast(x.dtype),
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_L=block_l)

    if not train:
        empty_stats = _alloc.empty((0,), dtype=stats_dtype, device=x.device)
        return out, y, empty_stats, _alloc.empty((0,), dtype=stats_dtype, device=x.device)

    batch_mean = _alloc.empty((C_out,), dtype=stats_dtype, device=x.device)
    batch_var = _alloc.empty((C_out,), dtype=stats_dtype, device=x.device)
    batch_stats.welford_merge(part_mean, part_m2, batch_mean, batch_var, n_lblocks=n_lblocks,
                              L_out=L_out, tile_l=block_l)
    if save_y and y.dtype == x.dtype:
        y_saved, write_y = y, False
    else:
        y_saved = _alloc.empty(shape if save_y else (0,), dtype=x.dtype, device=x.device)
        write_y = save_y
    block_c, block_l2 = elementwise_tiles(C_out, L_out)
    bn_apply.bn_relu_apply_kernel[(B * cdiv(L_out, block_l2), cdiv(C_out, block_c))](
        y, use(residual), out, y_saved if write_y else dummy, batch_mean, batch_var, bn_weight,
        bn_bias, C_out, L_out, float(eps), HAS_RES=residual is not None,
        RELU_BEFORE_ADD=bool(relu_before_add), SAVE_Y=write_y, BLOCK_C=block_c,
        BLOCK_L=block_l2)
    return out, y_saved, batch_mean, batch_var


def _backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, *, has_residual,
              stride, dilation, pad_left, pad_right, norm_mode, eps, relu_before_add):
    from . import batch_stats, bn_backward, conv_dgrad, conv_wgrad
    from .tiling import (cdiv, conv_tiles, dot_precision, dot_upcast, elementwise_tiles,
                         wgrad_splits)

    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    L_out = grad_out.shape[2]
    dev, dtype = x.device, x.dtype
    stats_dtype = torch.float32
    norm = _NORM_CODE[norm_mode]
    precision, upcast = dot_precision(dtype, dev), dot_upcast(dtype)

    # --- ReLU masks, residual gradient, batch-norm sums and grad_y (elementwise passes).
    block_c, block_l = elementwise_tiles(C_out, L_out)
    n_lblocks = cdiv(L_out, block_l)
    grid = (B * n_lblocks, cdiv(C_out, block_c))
    n_tiles = B * n_lblocks
    part = _alloc.empty((n_tiles, 3, C_out), dtype=stats_dtype, device=dev)
    grad_res = _alloc.empty(grad_out.shape, dtype=dtype, device=dev) if has_residual else None
    grad_y = _alloc.empty(grad_out.shape, dtype=dtype, device=dev)
    grad_gamma = grad_beta = None
    if norm != 0:
        grad_beta = _alloc.empty((C_out,), dtype=bn_bias.dtype, device=dev)
        grad_gamma = _alloc.empty((C_out,), dtype=bn_weight.dtype, device=dev)
    use = lambda t: grad_y if t is None else t  # noqa: E731
    y_arg = y if y.numel() else grad_y

    def launch(reduce_bn, write_grad_res, write_grad_y, reduce_grad_y):
        bn_backward.relu_bn_backward_kernel[grid](
            grad_out, out, y_arg, use(mean), use(var), use(bn_weight), use(bn_bias),
            use(grad_beta), use(grad_gamma), use(grad_res), grad_y, part,
            C_out, L_out, float(B * L_out), float(eps),
            NORM=norm, RELU_BEFORE_ADD=bool(relu_before_add), WRITE_GRAD_RES=write_grad_res,
            REDUCE_BN=reduce_bn, WRITE_GRAD_Y=write_grad_y, REDUCE_GRAD_Y=reduce_grad_y,
            BLOCK_C=block_c, BLOCK_L=block_l)

    def finalize_bn_sums():
        batch_stats.sum_partials(part[:, 0], grad_beta)
        batch_stats.sum_partials(part[:, 1], grad_gamma)

    has_bias = bias is not None
    if norm == 2:
        # grad_y needs the full sums of g and g * xhat: reduce first, then a second pass.
        launch(True, has_residual, False, False)
        finalize_bn_sums()
        launch(False, False, True, has_bias)
    else:
        launch(norm != 0, has_residual, True, has_bias)
        if norm != 0:
            finalize_bn_sums()
    grad_bias = None
    if has_bias:
        grad_bias = _alloc.empty((C_out,), dtype=bias.dtype, device=dev)
        batch_stats.sum_partials(part[:, 2], grad_bias)

    # --- conv data gradient.
    block_co, block_ci, block_t = conv_tiles(C_out, C_in, L)
    grad_x = _alloc.empty(x.shape, dtype=dtype, device=dev)
    conv_dgrad.conv_dgrad_kernel[(B * cdiv(L, block_t), cdiv(C_in, block_ci))](
        grad_y, weight, grad_x, C_in, C_out, L, L_out, K, stride, dilation, pad_left,
        DOT_PRECISION=precision, DOT_UPCAST=upcast, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        BLOCK_T=block_t)

    # --- conv weight gradient: split the (b, l-block) reduction, then sum the splits.
    block_ci, block_co, block_l = conv_tiles(C_in, C_out, L_out)
    n_lblocks = cdiv(L_out, block_l)
    tile_programs = cdiv(C_out, block_co) * cdiv(C_in, block_ci)
    n_splits, pairs_per_split = wgrad_splits(B * n_lblocks, tile_programs * K)
    wpart = _alloc.empty((n_splits, C_out * C_in * K), dtype=stats_dtype, device=dev)
    conv_wgrad.conv_wgrad_kernel[(tile_programs, K, n_splits)](
        grad_y, x, wpart, C_in, C_out, L, L_out, K, stride, dilation, pad_left, n_lblocks,
        B * n_lblocks, pairs_per_split, DOT_PRECISION=precision, DOT_UPCAST=upcast,
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_L=block_l)
    grad_weight = _alloc.empty(weight.shape, dtype=weight.dtype, device=dev)
    batch_stats.sum_partials(wpart, grad_weight.view(-1))

    return grad_x, grad_weight, grad_bias, grad_gamma, grad_beta, grad_res

