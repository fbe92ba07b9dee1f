"""Deterministic finalize kernels: merge per-tile partials into per-channel results.

welford_merge_kernel: per-row partial (mean, M2) -> merged (mean, M2, count) per channel.
    part_mean/part_m2: [n_rows, C] float32. Rows are either conv tiles (tile = b * n_lblocks
    + lblock, as conv_forward_kernel writes them, whose count min(TILE_L, L_out - lblock *
    TILE_L) is recomputed here rather than stored) or, with COUNTS_GIVEN, the outputs of a
    previous level, whose counts are in part_count. Program (c-block, chunk) merges rows
    [chunk * rows_per_program, ...) BLOCK_T at a time: exactly about the block's own mean
    (M2 = sum M2_i + sum n_i (mean_i - mean)^2), then into the running result with Chan's
    pairwise update. Only deviations from a mean are ever squared, never raw values, so a
    large |mean| against the std costs no precision (unlike sum / sum-of-squares).
    FINAL stores mean and the biased variance M2 / count, and with UPDATE_RUNNING moves
    the running statistics in place (docs/spec.md: running_mean <- (1 - f) running_mean +
    f mean, running_var <- (1 - f) running_var + f var * N / (N - 1)), so the training
    forward needs no torch kernels for them; otherwise the chunk's (mean, M2, count) for
    the next level.

bn_grad_finalize_kernel: the backward's per-tile sums -> grad_beta, grad_gamma and
    grad_bias in one launch (its docstring says how grad_bias follows from them).

sum_partials_kernel: out[chunk, m] = sum of part[p, m] over the chunk's rows, for part
    [n_parts, M] float32 (row stride part_row_stride), in float32, stored in out's dtype.
    Used for wgrad's split partials.

welford_merge runs one level when the rows fit one program per channel block (up to
FINALIZE_ROWS tiles: B=32 at L=4096 and more), else two (chunks of FINALIZE_ROWS rows in
parallel, then the chunks), so the finalize does not become a long serial loop for very
long sequences. Fixed order everywhere: bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _alloc
from . import tiling
from .rounding import store_rounded


@triton.jit
def welford_merge_kernel(
    part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, m2_ptr, count_ptr,
    running_mean_ptr, running_var_ptr, momentum_factor,
    C, n_rows, rows_per_program, n_lblocks, L_out, TILE_L,
    COUNTS_GIVEN: tl.constexpr, FINAL: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    first_row = tl.program_id(1) * rows_per_program
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_program, BLOCK_T):
        rows = first_row + r0 + tl.arange(0, BLOCK_T)
        # Past this program's rows or past the end: count 0, so the block adds nothing.
        r_ok = (rows < n_rows) & (rows < first_row + rows_per_program)
        offs = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        ok = r_ok[:, None] & c_ok[None, :]
        mean_i = tl.load(part_mean_ptr + offs, mask=ok, other=0.0)
        m2_i = tl.load(part_m2_ptr + offs, mask=ok, other=0.0)
        if COUNTS_GIVEN:
            n_i = tl.load(part_count_ptr + offs, mask=ok, other=0.0)
        else:
            l0 = (rows % n_lblocks) * TILE_L
            n_i = tl.where(r_ok, tl.minimum(L_out - l0, TILE_L), 0).to(tl.float32)
            n_i = tl.broadcast_to(n_i[:, None], (BLOCK_T, BLOCK_C))
        # Exact merge of this block of rows about its own mean.
        n_blk = tl.sum(n_i, axis=0)
        mean_blk = tl.sum(n_i * mean_i, axis=0) / tl.maximum(n_blk, 1.0)
        dev = tl.where(ok, mean_i - mean_blk[None, :], 0.0)
        m2_blk = tl.sum(m2_i + n_i * dev * dev, axis=0)
        # Chan's update of the running (count, mean, M2) with the block's.
        total = tl.maximum(count + n_blk, 1.0)
        delta = mean_blk - mean
        mean += delta * (n_blk / total)
        m2 += m2_blk + delta * delta * (count * (n_blk / total))
        count += n_blk
    if FINAL:
        tl.store(mean_ptr + offs_c, mean, mask=c_ok)
        # The biased variance (count >= 1 on real channels; the max keeps masked lanes finite).
        var = m2 / tl.maximum(count, 1.0)
        tl.store(m2_ptr + offs_c, var, mask=c_ok)
        if UPDATE_RUNNING:
            f = momentum_factor
            unbiased = m2 / tl.maximum(count - 1.0, 1.0)
            r_mean = tl.load(running_mean_ptr + offs_c, mask=c_ok, other=0.0)
            r_var = tl.load(running_var_ptr + offs_c, mask=c_ok, other=0.0)
            tl.store(running_mean_ptr + offs_c, (1.0 - f) * r_mean + f * mean, mask=c_ok)
            tl.store(running_var_ptr + offs_c, (1.0 - f) * r_var + f * unbiased, mask=c_ok)
    else:
        out = tl.program_id(1).to(tl.int64) * C + offs_c
        tl.store(mean_ptr + out, mean, mask=c_ok)
        tl.store(m2_ptr + out, m2, mask=c_ok)
        tl.store(count_ptr + out, count, mask=c_ok)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, n_parts, M, part_row_stride, rows_per_program,
                        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    first_row = tl.program_id(1) * rows_per_program
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, rows_per_program, BLOCK_P):
        rows = first_row + p0 + tl.arange(0, BLOCK_P)
        r_ok = (rows < n_parts) & (rows < first_row + rows_per_program)
        ok = r_ok[:, None] & m_ok[None, :]
        part = tl.load(part_ptr + rows[:, None].to(tl.int64) * part_row_stride + offs_m[None, :],
                       mask=ok, other=0.0)
        acc += tl.sum(part, axis=0)
    store_rounded(out_ptr + tl.program_id(1).to(tl.int64) * M + offs_m, acc, m_ok)


@triton.jit
def bn_grad_finalize_kernel(
    part_ptr, grad_beta_ptr, grad_gamma_ptr, grad_bias_ptr, var_ptr, gamma_ptr,
    C, n_tiles, n_per_channel, eps,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_beta = sum g, grad_gamma = sum g * xhat, grad_bias = sum grad_y, per channel,
    from the backward's per-tile partials part[tile, j, c] (j = 0: g, 1: g * xhat,
    2: xhat), summed in tile order in one level.

    grad_bias needs no pass over grad_y: grad_y is linear in g and xhat per channel, so
    its sum is k (sum_g - N mean_g - mean_gxhat sum_xhat) = -k mean_gxhat sum_xhat in
    training (zero in exact arithmetic: sum_xhat vanishes), k sum_g in eval and sum_g
    without batch norm (k = gamma * rsqrt(var + eps))."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    sums_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sums_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    sums_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ok = (rows < n_tiles)[:, None] & c_ok[None, :]
        base = part_ptr + rows[:, None].to(tl.int64) * 3 * C + offs_c[None, :]
        sums_g += tl.sum(tl.load(base, mask=ok, other=0.0), axis=0)
        sums_gx += tl.sum(tl.load(base + C, mask=ok, other=0.0), axis=0)
        sums_x += tl.sum(tl.load(base + 2 * C, mask=ok, other=0.0), axis=0)
    bias_grad = sums_g
    if NORM != 0:
        tl.store(grad_beta_ptr + offs_c, sums_g, mask=c_ok)
        tl.store(grad_gamma_ptr + offs_c, sums_gx, mask=c_ok)
        var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0)
        k = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0) * tl.rsqrt(var + eps)
        if NORM == 2:
            bias_grad = -k * (sums_gx / n_per_channel) * sums_x
        else:
            bias_grad = k * sums_g
    if HAS_BIAS:
        store_rounded(grad_bias_ptr + offs_c, bias_grad, c_ok)


def _levels(n_rows: int):
    """(rows per program, programs along the rows) of one finalize level."""
    chunk = tiling.FINALIZE_ROWS
    if n_rows <= chunk:
        chunk = triton.next_power_of_2(n_rows)
    return chunk, triton.cdiv(n_rows, chunk)


def welford_merge(part_mean, part_m2, mean, var, *, n_lblocks, L_out, tile_l,
                  running_mean=None, running_var=None, momentum_factor=0.0):
    """mean, var (C,) <- the conv tiles' partials part_mean, part_m2 (n_tiles, C); the
    running statistics, when given, move by momentum_factor in the same launch."""
    n_tiles, C = part_mean.shape
    update = running_mean is not None
    running = (running_mean, running_var, float(momentum_factor)) if update else (mean, var, 0.0)
    block_c = 32
    rows, n_chunks = _levels(n_tiles)
    block_t = min(64, rows)
    if n_chunks == 1:
        welford_merge_kernel[(triton.cdiv(C, block_c), 1)](
            part_mean, part_m2, part_mean, mean, var, var, *running, C, n_tiles, rows,
            n_lblocks, L_out, tile_l, COUNTS_GIVEN=False, FINAL=True, UPDATE_RUNNING=update,
            BLOCK_T=block_t, BLOCK_C=block_c)
        return
    chunk_stats = [_alloc.empty((n_chunks, C), dtype=torch.float32, device=mean.device)
                   for _ in range(3)]
    welford_merge_kernel[(triton.cdiv(C, block_c), n_chunks)](
        part_mean, part_m2, part_mean, *chunk_stats, mean, var, 0.0, C, n_tiles, rows,
        n_lblocks, L_out, tile_l, COUNTS_GIVEN=False, FINAL=False, UPDATE_RUNNING=False,
        BLOCK_T=block_t, BLOCK_C=block_c)
    rows2 = triton.next_power_of_2(n_chunks)
    welford_merge_kernel[(triton.cdiv(C, block_c), 1)](
        chunk_stats[0], chunk_stats[1], chunk_stats[2], mean, var, var, *running, C, n_chunks,
        rows2, 1, 0, 0, COUNTS_GIVEN=True, FINAL=True, UPDATE_RUNNING=update,
        BLOCK_T=min(64, rows2), BLOCK_C=block_c)


def sum_partials(part, out):
    """out (M,) <- part (n_parts, M).sum(0) in row order, in one level: the parts are
    wgrad's splits, at most tiling.MAX_WGRAD_SPLITS of them."""
    n_parts, M = part.shape
    assert part.stride(1) == 1 and out.is_contiguous() and out.numel() == M
    block_m = min(128, triton.next_power_of_2(M))
    rows = triton.next_power_of_2(n_parts)
    sum_partials_kernel[(triton.cdiv(M, block_m), 1)](
        part, out, n_parts, M, part.stride(0), rows, BLOCK_P=min(32, rows), BLOCK_M=block_m)
