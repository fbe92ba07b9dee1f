"""Conv data gradient (grad_x) as an implicit GEMM over (C_out x K).

conv_dgrad_kernel computes a [BLOCK_CI, BLOCK_T] tile of grad_x for batch row b:

    grad_x[b, ci, t] = sum_{k < K} sum_{co < C_out} w[co, ci, k] * grad_y[b, co, l(t, k)]
    where l(t, k) = (t + pad_left - k*d) / s when that is a whole number in [0, L_out)

as tl.dot products of the transposed weight tile [BLOCK_CI, BLOCK_CO] (tap k) with the
gathered grad_y tile [BLOCK_CO, BLOCK_T]. The stride/dilation gather is a masked load:
positions that no output read at tap k (padding, or not a multiple of the stride) load 0.
Input positions the conv never read (e.g. beyond the last output's window) get 0.

Shapes: grad_y (B, C_out, L_out), w (C_out, C_in, K), grad_x (B, C_in, L), contiguous,
grad_y/w/grad_x in x.dtype with float32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import store_rounded


@triton.jit
def conv_dgrad_kernel(
    grad_y_ptr, w_ptr, grad_x_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Grid axis 0 enumerates (batch row, length tile): CUDA caps axes 1 and 2 at 65535.
    n_lblocks = tl.cdiv(L, BLOCK_T)
    b = (tl.program_id(0) // n_lblocks).to(tl.int64)
    pid_t = tl.program_id(0) % n_lblocks
    pid_ci = tl.program_id(1)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ci_ok = offs_ci < C_in
    t_ok = offs_t < L

    grad_y_row = grad_y_ptr + b * C_out * L_out
    acc = tl.zeros([BLOCK_CI, BLOCK_T], dtype=tl.float32)
    for k in range(0, K):
        # Which output position read input t at tap k (if any): l * s = t + pad_left - k * d.
        shifted = offs_t + pad_left - k * dilation
        shifted_ok = shifted >= 0
        shifted = tl.where(shifted_ok, shifted, 0)
        l = shifted // stride
        l_ok = shifted_ok & (l * stride == shifted) & (l < L_out) & t_ok
        for co0 in range(0, C_out, BLOCK_CO):
            offs_co = co0 + tl.arange(0, BLOCK_CO)
            co_ok = offs_co < C_out
            w_tile = tl.load(w_ptr + (offs_co[None, :] * C_in + offs_ci[:, None]) * K + k,
                             mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
            gy_tile = tl.load(grad_y_row + offs_co[:, None].to(tl.int64) * L_out + l[None, :],
                              mask=co_ok[:, None] & l_ok[None, :], other=0.0)
            if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
                w_tile, gy_tile = w_tile.to(tl.float32), gy_tile.to(tl.float32)
            acc = tl.dot(w_tile, gy_tile, acc, input_precision=DOT_PRECISION)

    offs = b * C_in * L + offs_ci[:, None].to(tl.int64) * L + offs_t[None, :]
    store_rounded(grad_x_ptr + offs, acc, ci_ok[:, None] & t_ok[None, :])
