"""Training-mode apply: out = relu([relu](batch_norm(y)) + residual), one elementwise pass.

bn_relu_apply_kernel reads a [BLOCK_C, BLOCK_L] tile of y (the conv output, x.dtype) of
batch row b, normalizes it with the batch statistics the finalize kernel produced,
z = (y - mean) * gamma * rsqrt(var + eps) + beta (deviation first, so a large |mean| does
not swamp the std), optionally relu's it (relu_before_add), adds the residual tile and
applies the final ReLU. One read of y and of the residual, one write of out.

y is the conv output as conv_forward_kernel stored it: x.dtype for float32 inputs, but
float32 for fp16/bf16 inputs, because normalizing a bf16-rounded y shifts z by up to
2**-9 * |y| / std, enough to flip ReLU masks near zero and miss the 1e-2 bound that
rounding the final out alone meets. For those dtypes SAVE_Y also writes the x.dtype copy
of y that backward reads (the contract's y), while the tile is in registers.

Shapes: y, residual, out, y_saved (B, C, L_out) contiguous; mean, var, gamma, beta (C,)
float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import store_rounded
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
    scale = gamma * tl.rsqrt(var + eps)

    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if SAVE_Y:  # the x.dtype copy of y that backward reads (y_ptr holds float32 here)
        store_rounded(y_saved_ptr + offs, y, ok)
    z = (y - mean[:, None]) * scale[:, None] + beta[:, None]
    if RELU_BEFORE_ADD:
        z = tl.maximum(z, 0.0)
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    store_rounded(out_ptr + offs, tl.maximum(z, 0.0), ok)
