"""Training-mode apply: out = relu([relu](batch_norm(y)) + residual), one elementwise pass.

bn_relu_apply_kernel reads a [BLOCK_C, BLOCK_L] tile of y (the conv output) of batch row
b, normalizes it with the batch statistics the finalize kernel produced,
x-hat = (y - mean) * rsqrt(var + eps) (deviation first, so a large |mean| does not swamp
the std), z = x-hat * gamma + beta, optionally relu's it (relu_before_add), adds the
residual tile and applies the final ReLU. One read of y and of the residual, one write of
out; SAVE_Y also writes x-hat, what backward reads (docs/spec.md), in the saved dtype.

y is the conv output as conv_forward_kernel stored it: x.dtype for float32 inputs, but
float32 for fp16/bf16 inputs, because normalizing a bf16-rounded y shifts z by up to
2**-9 * |y| / std, enough to flip ReLU masks near zero (and the gradients with them).

Shapes: y, residual, out, y_saved (B, C, L_out) contiguous; mean, var, gamma, beta (C,)
float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import relu, store_rounded
from .tiling import elementwise_tile


@triton.jit
def bn_relu_apply_kernel(
    y_ptr, res_ptr, out_ptr, y_saved_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr,
    C, L_out, eps,
    HAS_RES: tl.constexpr, RELU_BEFORE_ADD: tl.constexpr, SAVE_Y: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    offs_c, c_ok, ok, offs = elementwise_tile(C, L_out, BLOCK_C, BLOCK_L)

    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)

    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = (y - mean[:, None]) * tl.rsqrt(var + eps)[:, None]
    if SAVE_Y:  # x-hat, what backward reads (docs/spec.md), while the tile is in registers
        store_rounded(y_saved_ptr + offs, xhat, ok)
    z = xhat * gamma[:, None] + beta[:, None]
    if RELU_BEFORE_ADD:
        z = relu(z)
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    store_rounded(out_ptr + offs, relu(z), ok)
