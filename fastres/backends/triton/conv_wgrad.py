"""Conv weight gradient as split-(b, l) GEMMs with deterministic partials.

conv_wgrad_kernel computes, for tap k and a [BLOCK_CO, BLOCK_CI] tile of (co, ci),

    part[split, k, co, ci] = sum over this split's (b, l-block) pairs of
                             sum_l grad_y[b, co, l] * x[b, ci, l*s + k*d - pad_left]

as a software-pipelined loop of tl.dot products of a grad_y tile [BLOCK_CO, BLOCK_L] with
the transposed input window [BLOCK_L, BLOCK_CI] of tap k (both contiguous along l, the
reduction: K-major operands, as tensor cores want them in every dtype). TMA reads both
(the window's zero fill is the padding); otherwise masked loads (stride > 1, unaligned
rows). The B * n_lblocks (b, l-block) pairs are cut into n_splits contiguous ranges so
that enough programs run; the last split of each (tile, tap) to finish (a ticket,
batch_stats.last_to_arrive) sums the tile's splits in a fixed order (no float atomics,
bitwise reproducible) into grad_weight, in the weight's dtype: no launch after it.

Shapes: grad_y (B, C_out, L_out), x (B, C_in, L), part (n_splits, K, C_out, C_in) float32,
grad_weight (C_out, C_in, K), counter: batch_stats.counters (n_tile_programs * K).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .batch_stats import last_to_arrive
from .operands import window
from .rounding import store_rounded


@triton.jit
def conv_wgrad_kernel(
    grad_y_src, x_src, part_ptr, grad_weight_ptr, counter_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left, n_lblocks, n_pairs, pairs_per_split,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_L: tl.constexpr,
    FIN_ROWS: tl.constexpr = 16,
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
    ok = (offs_co < C_out)[:, None] & (offs_ci < C_in)[None, :]
    part_offs = (k * C_out + offs_co[:, None]) * C_in + offs_ci[None, :]
    split_size = K * C_out * C_in
    tl.store(part_ptr + split.to(tl.int64) * split_size + part_offs, acc, mask=ok)

    ticket = counter_ptr + tl.program_id(0) * K + k
    if last_to_arrive(ticket, tl.num_programs(2)):
        # Sum the splits (this program's own included, from memory) FIN_ROWS rows at a
        # time: the whole tile's sum and addresses at once would take ~200 registers.
        for r0 in tl.static_range(0, BLOCK_CO, FIN_ROWS):
            rows = pid_co * BLOCK_CO + r0 + tl.arange(0, FIN_ROWS)
            rows_ok = (rows < C_out)[:, None] & (offs_ci < C_in)[None, :]
            offs = (k * C_out + rows[:, None]) * C_in + offs_ci[None, :]
            total = tl.zeros([FIN_ROWS, BLOCK_CI], dtype=tl.float32)
            split_base = part_ptr  # advanced by pointer: 64-bit, split after split
            for _ in range(0, tl.num_programs(2)):
                total += tl.load(split_base + offs, mask=rows_ok, other=0.0)
                split_base += split_size
            store_rounded(grad_weight_ptr + (rows[:, None] * C_in + offs_ci[None, :]) * K + k,
                          total, rows_ok)
        tl.store(ticket, 0)
