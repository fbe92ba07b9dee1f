"""Finalizes fused into the kernels that produce their partials: no finalize launches.

A kernel that reduces over (batch, length) writes one partial row per tile and then takes
a ticket; the last program to arrive reduces the rows, in a fixed order (bitwise
reproducible, no float atomics). Rows are reduced in two levels, so that no program
walks thousands of rows alone: tiles are grouped tiling.FINALIZE_GROUP at a time, the last program
of each group reduces its group's rows into one group row, and the last group to finish
reduces the group rows into the result. Each reduction column (a block of channels, or a
wgrad tile) has its own tickets, so columns finish in parallel.

    welford_finalize      conv_forward_kernel (MODE_STATS): per-tile (mean, M2) -> batch
                          mean, biased variance, running statistics, num_batches_tracked
    bn_grad_finalize      relu_bn_backward_kernel (REDUCE): per-tile sums of g, g * x-hat
                          and x-hat -> grad_beta, grad_gamma, grad_bias
    (conv_wgrad_kernel sums its own splits with one ticket per tile and tap.)

Why the tickets are safe on the GPU. A program's partial stores are issued by all its
threads; `tl.debug_barrier()` (bar.sync) orders them before the ticket, which one thread
takes with an acq_rel, gpu-scope atomic: a release that covers the whole block's stores
(PTX memory model: release is cumulative over what the barrier made visible to it). The
last program's ticket acquires, and its block's loads follow it through the barrier
Triton places after a scalar atomic. It is the pattern of CUTLASS's split-K semaphore.
The last program of each counter sets it back to zero, so the counters (`counters()`,
one buffer per device and stream) are zero between launches with no memset launch.

The Welford merge squares only deviations from a mean, never raw values, so a large
|mean| against the std costs no precision (unlike sum / sum-of-squares).
"""
from __future__ import annotations

from typing import Dict

import torch
import triton
import triton.language as tl

from . import tiling
from ...conventions import NORM_CODES, NORM_EVAL, NORM_LAYER, NORM_NONE, NORM_TRAIN
from .rounding import store_rounded

# The backward kernels' NORM codes (conventions.NORM_CODES, which the launcher passes) by
# name, so each branch says which norm it is for.
NORM_CODE_NONE = tl.constexpr(NORM_CODES[NORM_NONE])
NORM_CODE_EVAL = tl.constexpr(NORM_CODES[NORM_EVAL])
NORM_CODE_TRAIN = tl.constexpr(NORM_CODES[NORM_TRAIN])
NORM_CODE_LAYER = tl.constexpr(NORM_CODES[NORM_LAYER])

_COUNTERS: Dict[tuple, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 ticket counters, zero between launches (the last program of each
    counter resets it). One buffer per device and stream: kernels on one stream run one
    after another, so they can share it; kernels on two streams cannot. Under CUDA-graph
    capture the call gets its own zeroed buffer, never cached: memory allocated during a
    capture belongs to that graph's pool and must not outlive the graph in this cache."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        # (A new buffer replaces the old one in stream order: kernels in flight keep theirs.)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def n_ticket_counters(n_rows: int, n_columns: int) -> int:
    """Counters a two-level finalize over n_rows tiles and n_columns columns uses."""
    return n_columns * (triton.cdiv(n_rows, tiling.FINALIZE_GROUP) + 1)


@triton.jit
def last_to_arrive(counter_ptr, n_arrivals):
    """Take a ticket at counter_ptr; True in the program that takes the last of
    n_arrivals (it resets the counter when done). See the module docstring for why the
    partial stores issued before this call are visible to that program."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == n_arrivals - 1


@triton.jit
def _merge_welford_rows(part_mean_ptr, part_m2_ptr, part_count_ptr, first_row, end_row,
                        offs_c, c_ok, C, n_lblocks, L_out, TILE_L,
                        COUNTS_GIVEN: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Merge rows [first_row, end_row) of [rows, C] (mean, M2) partials, in row order.
    Without COUNTS_GIVEN the rows are conv tiles (row = b * n_lblocks + lblock), whose
    count min(TILE_L, L_out - lblock * TILE_L) is recomputed rather than stored."""
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(first_row, end_row, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        r_ok = rows < end_row
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
        # Exact merge of this block of rows about its own mean (rows past the end count 0).
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
    return count, mean, m2


@triton.jit
def welford_finalize(
    part_mean_ptr, part_m2_ptr, grp_mean_ptr, grp_m2_ptr, grp_count_ptr, counter_ptr,
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, momentum_factor, batches_ptr,
    tile, n_tiles, column, c0, C, n_lblocks, L_out, TILE_L,
    UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Called by every program of the statistics pass after it stored its tile's partial
    row `tile` for channels [c0, c0 + BLOCK_C) (its `column`). The last of each group
    merges the group; the last group stores mean and the biased variance M2 / count, moves
    the running statistics (docs/spec.md: running_mean <- (1 - f) running_mean + f mean,
    running_var <- (1 - f) running_var + f var * N / (N - 1)) and counts the batch.
    grp_*: [cdiv(n_tiles, GROUP), C] float32 scratch."""
    n_groups = tl.cdiv(n_tiles, GROUP)
    group = tile // GROUP
    tickets = counter_ptr + column * (n_groups + 1)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    first = group * GROUP
    end = tl.minimum(first + GROUP, n_tiles)
    if last_to_arrive(tickets + group, end - first):
        count, mean, m2 = _merge_welford_rows(
            part_mean_ptr, part_m2_ptr, part_mean_ptr, first, end, offs_c, c_ok, C,
            n_lblocks, L_out, TILE_L, False, BLOCK_T, BLOCK_C)
        row = group.to(tl.int64) * C + offs_c
        tl.store(grp_mean_ptr + row, mean, mask=c_ok)
        tl.store(grp_m2_ptr + row, m2, mask=c_ok)
        tl.store(grp_count_ptr + row, count, mask=c_ok)
        tl.store(tickets + group, 0)
        if last_to_arrive(tickets + n_groups, n_groups):
            count, mean, m2 = _merge_welford_rows(
                grp_mean_ptr, grp_m2_ptr, grp_count_ptr, 0, n_groups, offs_c, c_ok, C,
                1, 0, 0, True, BLOCK_T, BLOCK_C)
            tl.store(mean_ptr + offs_c, mean, mask=c_ok)
            # count >= 1 on real channels; the max keeps masked lanes finite.
            tl.store(var_ptr + offs_c, m2 / tl.maximum(count, 1.0), mask=c_ok)
            if UPDATE_RUNNING:
                f = momentum_factor
                unbiased = m2 / tl.maximum(count - 1.0, 1.0)
                r_mean = tl.load(running_mean_ptr + offs_c, mask=c_ok, other=0.0)
                r_var = tl.load(running_var_ptr + offs_c, mask=c_ok, other=0.0)
                tl.store(running_mean_ptr + offs_c, (1.0 - f) * r_mean + f * mean, mask=c_ok)
                tl.store(running_var_ptr + offs_c, (1.0 - f) * r_var + f * unbiased,
                         mask=c_ok)
            if COUNT_BATCH:  # nn.BatchNorm1d's num_batches_tracked += 1, once per call
                if column == 0:
                    tl.store(batches_ptr, tl.load(batches_ptr) + 1)
            tl.store(tickets + n_groups, 0)


@triton.jit
def _sum_rows(part_ptr, first_row, end_row, row_stride, offs_c, c_ok,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum of part[row * row_stride + c] over rows [first_row, end_row), in row order."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(first_row, end_row, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        ok = (rows < end_row)[:, None] & c_ok[None, :]
        acc += tl.sum(tl.load(part_ptr + rows[:, None].to(tl.int64) * row_stride
                              + offs_c[None, :], mask=ok, other=0.0), axis=0)
    return acc


@triton.jit
def bn_grad_finalize(
    part_ptr, grp_ptr, counter_ptr, grad_beta_ptr, grad_gamma_ptr, grad_bias_ptr, var_ptr,
    gamma_ptr, tile, n_tiles, column, C, n_per_channel, eps,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Called by every program of the backward's reduce pass after it stored its partial
    row part[tile, j, c] (j = 0: g, 1: g * x-hat, 2: x-hat, or grad_y with layer norm)
    for channels of `column`. The last program stores grad_beta = sum g, grad_gamma =
    sum g * x-hat and grad_bias = sum grad_y. grp: [cdiv(n_tiles, GROUP), 3, C] float32
    scratch.

    With batch norm grad_bias needs no pass over grad_y: grad_y is linear in g and x-hat
    per channel, so its sum is k (sum_g - N mean_g - mean_gxhat sum_xhat) = -k mean_gxhat
    sum_xhat in training (zero in exact arithmetic: sum_xhat vanishes), k sum_g in eval
    and sum_g without batch norm (k = gamma * rsqrt(var + eps)). Layer norm's grad_y
    mixes the channels of a position, so its tiles sum grad_y itself (row j = 2)."""
    n_groups = tl.cdiv(n_tiles, GROUP)
    group = tile // GROUP
    tickets = counter_ptr + column * (n_groups + 1)
    offs_c = column * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    first = group * GROUP
    end = tl.minimum(first + GROUP, n_tiles)
    if last_to_arrive(tickets + group, end - first):
        row = grp_ptr + group.to(tl.int64) * 3 * C + offs_c
        for j in tl.static_range(3):
            tl.store(row + j * C, _sum_rows(part_ptr + j * C, first, end, 3 * C, offs_c, c_ok,
                                            BLOCK_T, BLOCK_C), mask=c_ok)
        tl.store(tickets + group, 0)
        if last_to_arrive(tickets + n_groups, n_groups):
            sums_g = _sum_rows(grp_ptr, 0, n_groups, 3 * C, offs_c, c_ok, BLOCK_T, BLOCK_C)
            bias_grad = sums_g
            if NORM != NORM_CODE_NONE:
                sums_gx = _sum_rows(grp_ptr + C, 0, n_groups, 3 * C, offs_c, c_ok, BLOCK_T,
                                    BLOCK_C)
                tl.store(grad_beta_ptr + offs_c, sums_g, mask=c_ok)
                tl.store(grad_gamma_ptr + offs_c, sums_gx, mask=c_ok)
                if NORM == NORM_CODE_LAYER:  # (var is per position: the tiles summed grad_y)
                    bias_grad = _sum_rows(grp_ptr + 2 * C, 0, n_groups, 3 * C, offs_c,
                                          c_ok, BLOCK_T, BLOCK_C)
                else:
                    var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0)
                    k = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0) \
                        * tl.rsqrt(var + eps)
                    if NORM == NORM_CODE_TRAIN:
                        sums_x = _sum_rows(grp_ptr + 2 * C, 0, n_groups, 3 * C, offs_c,
                                           c_ok, BLOCK_T, BLOCK_C)
                        bias_grad = -k * (sums_gx / n_per_channel) * sums_x
                    else:
                        bias_grad = k * sums_g
            if HAS_BIAS:
                store_rounded(grad_bias_ptr + offs_c, bias_grad, c_ok)
            tl.store(tickets + n_groups, 0)
