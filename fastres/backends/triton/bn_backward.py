"""Backward through ReLU(s), residual add and batch norm: masks, BN sums and grad_y.

relu_bn_backward_kernel works on a [BLOCK_C, BLOCK_L] tile of batch row b:

    grad_residual = grad_out where out > 0 (or NaN: torch.relu's backward)   (WRITE_GRAD_RES)
    g = grad_residual [where xhat * gamma + beta > 0, when relu_before_add]
    xhat: what forward saved (docs/spec.md); y itself without batch norm
    partial sums over the tile of g and g * xhat                    (REDUCE_BN)
    grad_y = gamma * invstd * g                                     (NORM eval)
    grad_y = gamma * invstd * (g - sum_g / N - xhat * sum_gxhat / N) (NORM train; needs the
             finalized sums, i.e. grad_beta and grad_gamma, so it is a second launch)
    grad_y = g                                                      (NORM none)
    partial sum over the tile of grad_y (for grad_bias)             (REDUCE_GRAD_Y)

Partials go to part[tile, j, c] (float32, tile = b * n_lblocks + lblock; j = 0: g,
1: g * xhat, 2: grad_y), summed deterministically by batch_stats.sum_partials_kernel.

grad_y is a separate elementwise pass (stored in x.dtype, as cuDNN stores dgrad inputs)
rather than recomputed in the prologue of the dgrad/wgrad GEMMs: that would reload
grad_out, out and y once per tap in dgrad; kept simple for now.
Training therefore runs this kernel twice (reduce; then grad_y), eval and none once.

Shapes: grad_out, out, saved, grad_residual, grad_y (B, C, L_out) contiguous; var, gamma,
beta, sum_g, sum_gxhat (C,) float32; part (n_tiles, 3, C) float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import store_rounded
from .tiling import elementwise_tile

NORM_NONE, NORM_EVAL, NORM_TRAIN = 0, 1, 2


@triton.jit
def relu_bn_backward_kernel(
    grad_out_ptr, out_ptr, saved_ptr, var_ptr, gamma_ptr, beta_ptr,
    sum_g_ptr, sum_gxhat_ptr, grad_res_ptr, grad_y_ptr, part_ptr,
    C, L_out, n_per_channel, eps,
    NORM: tl.constexpr, RELU_BEFORE_ADD: tl.constexpr, WRITE_GRAD_RES: tl.constexpr,
    REDUCE_BN: tl.constexpr, WRITE_GRAD_Y: tl.constexpr, REDUCE_GRAD_Y: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    offs_c, c_ok, ok, offs = elementwise_tile(C, L_out, BLOCK_C, BLOCK_L)

    out = tl.load(out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.where(out <= 0, 0.0, g)
    if WRITE_GRAD_RES:  # the residual sees only the final ReLU's mask
        store_rounded(grad_res_ptr + offs, g, ok)
    if NORM != 0:
        var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
        invstd = tl.rsqrt(var + eps)
        xhat = tl.load(saved_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if RELU_BEFORE_ADD:  # the forward's float32 expression, so the masks agree bit for bit
            beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            g = tl.where(xhat * gamma[:, None] + beta[:, None] <= 0, 0.0, g)
        # Masked lanes loaded zeros, so they add nothing to the sums.
        g = tl.where(ok, g, 0.0)
        xhat = tl.where(ok, xhat, 0.0)
    else:
        if RELU_BEFORE_ADD:
            y = tl.load(saved_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.where(y <= 0, 0.0, g)

    tile = tl.program_id(0).to(tl.int64)  # the (batch row, length tile) of elementwise_tile
    part_row = part_ptr + tile * 3 * C
    if REDUCE_BN:
        tl.store(part_row + offs_c, tl.sum(g, axis=1), mask=c_ok)
        tl.store(part_row + C + offs_c, tl.sum(g * xhat, axis=1), mask=c_ok)
    if WRITE_GRAD_Y:
        grad_y = g
        if NORM == 2:
            sum_g = tl.load(sum_g_ptr + offs_c, mask=c_ok, other=0.0)
            sum_gxhat = tl.load(sum_gxhat_ptr + offs_c, mask=c_ok, other=0.0)
            mean_g = sum_g / n_per_channel
            mean_gxhat = sum_gxhat / n_per_channel
            grad_y = g - mean_g[:, None] - xhat * mean_gxhat[:, None]
        if NORM != 0:
            grad_y = grad_y * (gamma * invstd)[:, None]
        grad_y = tl.where(ok, grad_y, 0.0)
        store_rounded(grad_y_ptr + offs, grad_y, ok)
        if REDUCE_GRAD_Y:
            tl.store(part_row + 2 * C + offs_c, tl.sum(grad_y, axis=1), mask=c_ok)
