"""Conv weight gradient as split-(b, l) GEMMs with deterministic partials.

conv_wgrad_kernel computes, for tap k and a [BLOCK_CO, BLOCK_CI] tile of (co, ci),

    part[split, co, ci, k] = sum over this split's (b, l-block) pairs of
                             sum_l grad_y[b, co, l] * x[b, ci, l*s + k*d - pad_left]

as tl.dot products of a grad_y tile [BLOCK_CO, BLOCK_L] with the gathered, transposed
input tile [BLOCK_L, BLOCK_CI] (padding positions load 0; no padded copy of x). The
B * n_lblocks (b, l-block) pairs are cut into n_splits contiguous ranges so that enough
programs run; batch_stats.sum_partials_kernel then sums the splits in a fixed order (no
float atomics, bitwise reproducible) into grad_weight in the weight's dtype.

Shapes: grad_y (B, C_out, L_out), x (B, C_in, L), part (n_splits, C_out, C_in, K) float32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def conv_wgrad_kernel(
    grad_y_ptr, x_ptr, part_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left, n_lblocks, n_pairs, pairs_per_split,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n_ci_blocks = tl.cdiv(C_in, BLOCK_CI)
    pid_co = tl.program_id(0) // n_ci_blocks
    pid_ci = tl.program_id(0) % n_ci_blocks
    k = tl.program_id(1)
    split = tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = offs_co < C_out
    ci_ok = offs_ci < C_in

    first = split * pairs_per_split
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    for i in range(0, pairs_per_split):
        pair = first + i
        # The last split may run past the B * n_lblocks real pairs: its loads are masked off.
        # (Folded into the length limit: a scalar-bool & vector-bool mask trips the interpreter.)
        l_limit = L_out * (pair < n_pairs).to(tl.int32)
        b = (pair // n_lblocks).to(tl.int64)
        offs_l = (pair % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        l_ok = offs_l < l_limit
        t = offs_l * stride + k * dilation - pad_left
        t_ok = (t >= 0) & (t < L) & l_ok
        gy_tile = tl.load(grad_y_ptr + b * C_out * L_out + offs_co[:, None].to(tl.int64) * L_out
                          + offs_l[None, :], mask=co_ok[:, None] & l_ok[None, :], other=0.0)
        x_tile = tl.load(x_ptr + b * C_in * L + offs_ci[None, :].to(tl.int64) * L + t[:, None],
                         mask=t_ok[:, None] & ci_ok[None, :], other=0.0)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            gy_tile, x_tile = gy_tile.to(tl.float32), x_tile.to(tl.float32)
        acc = tl.dot(gy_tile, x_tile, acc, input_precision=DOT_PRECISION)

    part_offs = (offs_co[:, None] * C_in + offs_ci[None, :]) * K + k
    tl.store(part_ptr + split.to(tl.int64) * C_out * C_in * K + part_offs, acc,
             mask=co_ok[:, None] & ci_ok[None, :])
