"""Deterministic finalize kernels: merge per-tile partials into per-channel results.

welford_merge_kernel: partial (mean, M2) of n_tiles tiles -> batch mean and biased
    variance per channel. part_mean/part_m2: [n_tiles, C] float32 (tile = b * n_lblocks +
    lblock, as conv_forward_kernel writes them); a tile's count is min(TILE_L, L_out -
    lblock * TILE_L), recomputed here rather than stored. BLOCK_T tiles at a time are
    merged exactly about their common mean (M2 = sum M2_i + sum n_i (mean_i - mean)^2), then
    folded into the running result with Chan's pairwise update. Both steps only ever
    square deviations from a mean, never raw values, so a large |mean| against the std
    costs no precision (unlike sum / sum-of-squares). Fixed order: bitwise reproducible.

sum_partials_kernel: out[m] = sum_p part[p, m] for part [n_parts, M] float32 with row
    stride part_row_stride, summed in a fixed order in float32, stored in out's dtype.
    Used for the backward's per-tile BN sums and for wgrad's split-K partials.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rounding import store_rounded


@triton.jit
def welford_merge_kernel(
    part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr,
    C, n_tiles, n_lblocks, L_out, TILE_L,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < n_tiles
        l0 = (offs_t % n_lblocks) * TILE_L
        n_i = tl.where(t_ok, tl.minimum(L_out - l0, TILE_L), 0).to(tl.float32)
        offs = offs_t[:, None].to(tl.int64) * C + offs_c[None, :]
        ok = t_ok[:, None] & c_ok[None, :]
        mean_i = tl.load(part_mean_ptr + offs, mask=ok, other=0.0)
        m2_i = tl.load(part_m2_ptr + offs, mask=ok, other=0.0)
        # Exact merge of this block of tiles about its own mean.
        n_blk = tl.sum(n_i, axis=0)
        mean_blk = tl.sum(n_i[:, None] * mean_i, axis=0) / n_blk
        dev = tl.where(ok, mean_i - mean_blk[None, :], 0.0)
        m2_blk = tl.sum(m2_i + n_i[:, None] * dev * dev, axis=0)
        # Chan's update of the running (count, mean, M2) with the block's.
        total = count + n_blk
        delta = mean_blk - mean
        mean += delta * (n_blk / total)
        m2 += m2_blk + delta * delta * (count * (n_blk / total))
        count = total
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(var_ptr + offs_c, m2 / count, mask=c_ok)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, n_parts, M, part_row_stride,
                        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < n_parts)[:, None] & m_ok[None, :]
        part = tl.load(part_ptr + offs_p[:, None].to(tl.int64) * part_row_stride + offs_m[None, :],
                       mask=ok, other=0.0)
        acc += tl.sum(part, axis=0)
    store_rounded(out_ptr + offs_m, acc, m_ok)


def welford_merge(part_mean, part_m2, mean, var, *, n_lblocks, L_out, tile_l):
    n_tiles, C = part_mean.shape
    block_c = 32
    grid = (triton.cdiv(C, block_c),)
    welford_merge_kernel[grid](part_mean, part_m2, mean, var, C, n_tiles, n_lblocks, L_out,
                               tile_l, BLOCK_T=64, BLOCK_C=block_c)


def sum_partials(part, out):
    """out (M,) <- part (n_parts, M).sum(0); part may be a column slice (row stride kept)."""
    n_parts, M = part.shape
    assert part.stride(1) == 1 and out.is_contiguous() and out.numel() == M
    block_m = 128
    grid = (triton.cdiv(M, block_m),)
    sum_partials_kernel[grid](part, out, n_parts, M, part.stride(0), BLOCK_P=32,
                              BLOCK_M=block_m)
