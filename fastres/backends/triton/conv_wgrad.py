"""Conv weight gradient as split-(b, l) GEMMs with deterministic partials.

conv_wgrad_kernel computes, for tap k and a [BLOCK_CO, BLOCK_CI] tile of (co, ci),

    part[split, co, ci, k] = sum over this split's (b, l-block) pairs of
                             sum_l grad_y[b, co, l] * x[b, ci, l*s + k*d - pad_left]

as a software-pipelined loop of tl.dot products of a grad_y tile [BLOCK_CO, BLOCK_L] with
the transposed input window [BLOCK_L, BLOCK_CI] of tap k (both contiguous along l, the
reduction: K-major operands, as tensor cores want them in every dtype). TMA reads both
(the window's zero fill is the padding); otherwise masked loads (stride > 1, unaligned
rows). The B * n_lblocks (b, l-block) pairs are cut into n_splits contiguous ranges so
that enough programs run; batch_stats.sum_partials_kernel then sums the splits in a fixed
order (no float atomics, bitwise reproducible) into grad_weight in the weight's dtype.

Shapes: grad_y (B, C_out, L_out), x (B, C_in, L), part (n_splits, C_out, C_in, K) float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .operands import window


@triton.jit
def conv_wgrad_kernel(
    grad_y_src, x_src, part_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left, n_lblocks, n_pairs, pairs_per_split,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_L: tl.constexpr,
):
    n_ci_blocks = tl.cdiv(C_in, BLOCK_CI)
    pid_co = tl.program_id(0) // n_ci_blocks
    pid_ci = tl.program_id(0) % n_ci_blocks
    k = tl.program_id(1)
    split = tl.program_id(2)
    n_batch = n_pairs // n_lblocks

    first = split * pairs_per_split
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    for i in range(0, pairs_per_split):
        pair = first + i
        # The last split may run past the B * n_lblocks real pairs: those read batch row
        # n_batch or beyond, which is outside the tensors (TMA and masks give 0).
        b = pair // n_lblocks
        real = (b < n_batch).to(tl.int32)
        l0 = (pair % n_lblocks) * BLOCK_L
        gy_tile = window(grad_y_src, b, pid_co * BLOCK_CO, l0, C_out * real, L_out, 1, TMA,
                         BLOCK_CO, BLOCK_L)
        x_tile = window(x_src, b, pid_ci * BLOCK_CI, l0 * stride + k * dilation - pad_left,
                        C_in * real, L, stride, TMA, BLOCK_CI, BLOCK_L)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            gy_tile, x_tile = gy_tile.to(tl.float32), x_tile.to(tl.float32)
        acc = tl.dot(gy_tile, tl.trans(x_tile), acc, input_precision=DOT_PRECISION)

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    part_offs = (offs_co[:, None] * C_in + offs_ci[None, :]) * K + k
    tl.store(part_ptr + split.to(tl.int64) * C_out * C_in * K + part_offs, acc,
             mask=(offs_co < C_out)[:, None] & (offs_ci < C_in)[None, :])
