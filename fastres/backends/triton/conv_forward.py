"""Forward conv as an implicit GEMM, with batch statistics or the whole eval stage fused.

conv_forward_kernel computes, for one batch row b and a [BLOCK_CO, BLOCK_L] tile of
(output channel, output position),

    y[b, co, l] = bias[co]
                  + sum_{k < K} sum_{ci < C_in} w[co, ci, k] * x[b, ci, l*s + k*d - pad_left]

as one software-pipelined loop over (tap, C_in block) pairs of tl.dot products of a
weight tile [BLOCK_CO, BLOCK_CI] (tap k of the tap-major copy, operands.py) with the input
window [BLOCK_CI, BLOCK_L] that tap reads. TMA: both come through tensor descriptors,
whose zero fill outside the tensor is the causal / same padding; otherwise the window is a
masked gather (stride > 1, unaligned rows) and padding positions read 0. No padded copy
of x exists. BLOCK_CO may cover all of C_out, so that x is read from HBM once.

Epilogue, by MODE:
  MODE_STATS (training, first pass): per output channel, this tile's (mean, M2) over its
      valid positions, from the float32 accumulator, into [n_tiles, C_out] partials (tile
      = b * n_lblocks + pid_l; the count min(BLOCK_L, L_out - l0) is recomputed, not
      stored). With FINALIZE the last programs to finish merge them (batch_stats.
      welford_finalize): batch mean and variance, running statistics, the batch counter.
      Nothing else is written.
  MODE_NORM: batch norm with the given statistics, per channel: x-hat = (y - mean) *
      rsqrt(var + eps), z = x-hat * gamma + beta, then [relu], + residual, relu, store out.
      Eval passes the running statistics: the eval stage is this one kernel, one read of
      x (and residual), one write. Training runs it as its second pass with the batch
      statistics: the conv is computed again rather than y stored and re-read, so y never
      travels through memory (nor is rounded: 16-bit inputs normalize the float32 y).
  MODE_LAYER: layer norm over the channels of each position (docs/spec.md, "Layer
      norm"): the tile holds every channel (BLOCK_CO >= C_out, one program column:
      tiling.LAYER_NORM_MAX_CHANNELS), so each position's mean and biased variance over
      C_out are reductions over the float32 accumulator's channel axis, stored to
      mean/var (B, L_out); then x-hat = (y - mean) * rsqrt(var + eps), z = x-hat * gamma +
      beta and the rest as MODE_NORM. One pass in training and eval alike: no batch
      statistics, no running ones.
  MODE_NONE: as MODE_NORM without the normalization.
  ACT (NORM/NONE): the activation replacing both ReLUs (activation.py's named codes; its
      slope or alpha in act_param). Not ReLU: backward takes its derivative at its input,
      recomputed from x-hat (or y) and the residual, so no mask bits are saved.
  SAVE_Y (NORM/LAYER/NONE): also store what backward reads: x-hat (NORM, LAYER) or y
      (NONE).
  SAVE_MASK (training or a residual, when backward is to run): the final ReLU's mask as
      bits (mask_bits.py), so backward never reads out nor recomputes the mask from a
      float16 x-hat, whose rounding would flip it (triton.saved_dtype).

Shapes: x (B, C_in, L) (x_src: its descriptor, box [1, BLOCK_CI, BLOCK_L], or pointer),
tap-major weight (K, C_out_p, C_in_p) (w_src likewise, box [1, BLOCK_CO, BLOCK_CI]), bias
(C_out,), y/out/residual (B, C_out, L_out), mean/var (C_out,), or (B, L_out) in
MODE_LAYER, all contiguous. Batch and channel offsets are
int64 so B * C * L may exceed 2**31.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activation import ACTIVATION_RELU, activate
from .batch_stats import welford_finalize
from .mask_bits import store_bits
from .operands import weight_tile, window
from .rounding import as_stored, relu, store_rounded

# The epilogues (launchers pass MODE=<name>.value).
MODE_NONE = tl.constexpr(0)
MODE_NORM = tl.constexpr(1)
MODE_STATS = tl.constexpr(2)
MODE_LAYER = tl.constexpr(3)


@triton.jit
def conv_forward_kernel(
    x_src, w_src, bias_ptr, y_ptr, out_ptr, res_ptr, mask_bits_ptr,
    mean_ptr, var_ptr, gamma_ptr, beta_ptr,
    part_mean_ptr, part_m2_ptr, grp_mean_ptr, grp_m2_ptr, grp_count_ptr, counter_ptr,
    running_mean_ptr, running_var_ptr, momentum_factor, batches_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left, eps, C_in_p, C_out_p,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Y: tl.constexpr, HAS_RES: tl.constexpr,
    RELU_BEFORE_ADD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    TMA: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_L: tl.constexpr,
    SAVE_MASK: tl.constexpr = False,
    FINALIZE: tl.constexpr = False,
    UPDATE_RUNNING: tl.constexpr = False,
    COUNT_BATCH: tl.constexpr = False, GROUP: tl.constexpr = 32, FIN_BLOCK_T: tl.constexpr = 8,
    ACT: tl.constexpr = ACTIVATION_RELU, act_param=0.0,
):
    # Grid axis 0 enumerates (batch row, length tile): CUDA caps axes 1 and 2 at 65535.
    n_lblocks = tl.cdiv(L_out, BLOCK_L)
    b = (tl.program_id(0) // n_lblocks).to(tl.int64)
    pid_l = tl.program_id(0) % n_lblocks
    pid_co = tl.program_id(1)

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    co_ok = offs_co < C_out
    l_ok = offs_l < L_out

    acc = tl.zeros([BLOCK_CO, BLOCK_L], dtype=tl.float32)
    n_ci = tl.cdiv(C_in, BLOCK_CI)
    # One loop over (tap, channel block), so the pipeliner overlaps every load with the dots.
    for i in range(0, K * n_ci):
        k = i // n_ci
        ci0 = (i % n_ci) * BLOCK_CI
        w_tile = weight_tile(w_src, k, pid_co * BLOCK_CO, ci0, C_out_p, C_in_p, TMA,
                             BLOCK_CO, BLOCK_CI)
        # Input position of output l at tap k is l * stride + k * dilation - pad_left.
        x_tile = window(x_src, b, ci0, pid_l * BLOCK_L * stride + k * dilation - pad_left,
                        C_in, L, stride, TMA, BLOCK_CI, BLOCK_L)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            w_tile, x_tile = w_tile.to(tl.float32), x_tile.to(tl.float32)
        acc = tl.dot(w_tile, x_tile, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[:, None]

    tile_offs = b * C_out * L_out + offs_co[:, None].to(tl.int64) * L_out + offs_l[None, :]
    tile_ok = co_ok[:, None] & l_ok[None, :]

    if MODE == MODE_STATS:  # this tile's per-channel (mean, M2)
        count = tl.minimum(L_out - pid_l * BLOCK_L, BLOCK_L).to(tl.float32)
        tile_mean = tl.sum(tl.where(tile_ok, acc, 0.0), axis=1) / count
        centered = tl.where(tile_ok, acc - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(centered * centered, axis=1)
        tile = tl.program_id(0).to(tl.int64)  # = b * n_lblocks + pid_l
        tl.store(part_mean_ptr + tile * C_out + offs_co, tile_mean, mask=co_ok)
        tl.store(part_m2_ptr + tile * C_out + offs_co, tile_m2, mask=co_ok)
        if FINALIZE:  # batch mean and variance out (mean_ptr, var_ptr), by the last programs
            welford_finalize(part_mean_ptr, part_m2_ptr, grp_mean_ptr, grp_m2_ptr,
                             grp_count_ptr, counter_ptr, mean_ptr, var_ptr, running_mean_ptr,
                             running_var_ptr, momentum_factor, batches_ptr, tile,
                             tl.num_programs(0), pid_co, pid_co * BLOCK_CO, C_out, n_lblocks,
                             L_out, BLOCK_L, UPDATE_RUNNING, COUNT_BATCH, GROUP, FIN_BLOCK_T,
                             BLOCK_CO)
    else:
        z = acc
        if MODE != MODE_NONE:
            gamma = tl.load(gamma_ptr + offs_co, mask=co_ok, other=1.0).to(tl.float32)
            beta = tl.load(beta_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)
            if MODE == MODE_LAYER:  # over the channels of each position: all in this tile
                y_ok = tl.where(tile_ok, acc, 0.0)
                mean_l = tl.sum(y_ok, axis=0) / C_out
                centered = tl.where(tile_ok, acc - mean_l[None, :], 0.0)
                var_l = tl.sum(centered * centered, axis=0) / C_out
                stats_offs = b * L_out + offs_l
                tl.store(mean_ptr + stats_offs, mean_l, mask=l_ok)
                tl.store(var_ptr + stats_offs, var_l, mask=l_ok)
                xhat = centered * tl.rsqrt(var_l + eps)[None, :]
            else:  # MODE_NORM: batch norm with the given (running or batch) statistics
                mean = tl.load(mean_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)
                var = tl.load(var_ptr + offs_co, mask=co_ok, other=1.0).to(tl.float32)
                xhat = (acc - mean[:, None]) * tl.rsqrt(var + eps)[:, None]
            # Backward recomputes the inner ReLU's mask (and out's sign, without SAVE_MASK)
            # from a float32 x-hat with this same expression (bn_backward.py): keep the two
            # identical.
            z = xhat * gamma[:, None] + beta[:, None]
        if SAVE_Y:  # what backward reads: x-hat (batch or layer norm), or y (none)
            store_rounded(y_ptr + tile_offs, acc if MODE == MODE_NONE else xhat, tile_ok)
        if RELU_BEFORE_ADD:
            z = activate(z, ACT, act_param)
        if HAS_RES:
            z += tl.load(res_ptr + tile_offs, mask=tile_ok, other=0.0).to(tl.float32)
        if ACT != ACTIVATION_RELU:
            store_rounded(out_ptr + tile_offs, activate(z, ACT, act_param), tile_ok)
        elif SAVE_MASK:  # the final ReLU's mask as bits, from out as stored (mask_bits.py)
            stored = as_stored(relu(z), out_ptr.dtype.element_ty)
            keep = tl.where(tile_ok, tl.where(stored <= 0, 0, 1), 0)
            store_bits(mask_bits_ptr, keep, b, offs_co, pid_l * BLOCK_L, C_out, L_out,
                       BLOCK_CO, BLOCK_L)
            store_rounded(out_ptr + tile_offs, stored, tile_ok)
        else:
            store_rounded(out_ptr + tile_offs, relu(z), tile_ok)
