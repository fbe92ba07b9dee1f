"""Backward through ReLU(s), residual add and batch norm: masks, BN sums and grad_y.

relu_bn_backward_kernel works on a [BLOCK_C, BLOCK_L] tile of batch row b:

    g_final = grad_out where out > 0 (or NaN: torch.relu's backward) = grad_residual
    g = g_final [where xhat * gamma + beta > 0, when relu_before_add]
    xhat: what forward saved (docs/spec.md); y itself without batch norm
    partial sums over the tile of g, g * xhat and xhat                 (REDUCE)
    grad_y = gamma * invstd * g                                        (NORM eval)
    grad_y = gamma * invstd * (g - sum_g / N - xhat * sum_gxhat / N)   (NORM train; needs
             the finalized sums, grad_beta and grad_gamma: a second launch)
    grad_y = g                                                         (NORM none)
    grad_y = r (gg - mean_c gg - xhat mean_c(gg xhat)), gg = gamma g    (NORM layer: r =
             rsqrt(var[b, l] + eps), the means over the channels of each position, all
             in this tile: BLOCK_C >= C, tiling.layer_norm_backward_tiles)

MASK_FROM_XHAT (no residual, no bits: eval with a float32 x-hat): out = relu(x-hat *
gamma + beta) is recomputed from x-hat with the forward's own float32 expression and
rounding, so the mask agrees bit for bit and `out` is never read (2 bytes an element
saved per pass in bf16).

MASK_BITS (training, or a residual: forward saved the final mask as bits, mask_bits.py):
the bits replace the read of out (1/8 byte an element instead of 2 in 16 bits) and, in
16-bit training, a recomputation from the float16 x-hat, whose rounding would flip masks
(triton.saved_dtype).

Training runs it twice: pass 1 (REDUCE, and WRITE_G stores grad_residual) reads
grad_out, the mask's source (out, its bits, or x-hat) and x-hat; pass 2 (WRITE_GRAD_Y)
reads x-hat and either grad_residual (READ_G: the masked gradient pass 1 stored, one
tensor instead of grad_out and the mask) or grad_out again (and its mask). A deferred
residual gradient (ops.ResidualGradLink: stage 1's dgrad adds grad_out under the bits)
is neither stored nor read: pass 2 reads grad_out and the bits. Eval and no-norm run one
pass doing both. Partials go to part[tile, j, c] (float32, tile = b * n_lblocks +
lblock; j = 0: g, 1: g * xhat, 2: xhat, or grad_y with layer norm, whose grad_y mixes
channels); the last programs to finish reduce them into grad_beta, grad_gamma and
grad_bias (batch_stats.bn_grad_finalize), so pass 2 follows pass 1 with no launch between.
Layer norm runs one pass (its statistics are per position, in the tile).

ACT other than ReLU (activation.py's named codes): the final activation's derivative is
taken at its input z2 = act?(z1) + residual, z1 = x-hat * gamma + beta (y without norm),
recomputed from saved and the residual (res_ptr, HAS_RES) with the forward's expressions;
out and mask bits are not read. With relu_before_add also at z1.

Shapes: grad_out, out, saved, grad_residual, grad_y (B, C, L_out) contiguous; var (C,), or
(B, L_out) with layer norm; gamma, beta, sum_g, sum_gxhat (C,) float32; part (n_tiles, 3,
C) and grp (cdiv(n_tiles, GROUP), 3, C) float32; counter: batch_stats.counters.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activation import ACTIVATION_RELU, activate, activation_grad
from .batch_stats import NORM_CODE_LAYER, NORM_CODE_NONE, NORM_CODE_TRAIN, bn_grad_finalize
from .mask_bits import load_bits
from .rounding import as_stored, relu, store_rounded
from .tiling import elementwise_tile


@triton.jit
def relu_bn_backward_kernel(
    grad_out_ptr, out_ptr, mask_bits_ptr, saved_ptr, var_ptr, gamma_ptr, beta_ptr,
    sum_g_ptr, sum_gxhat_ptr, grad_bias_ptr, grad_res_ptr, grad_y_ptr, part_ptr, grp_ptr,
    counter_ptr, C, L_out, n_per_channel, eps,
    NORM: tl.constexpr, RELU_BEFORE_ADD: tl.constexpr, WRITE_G: tl.constexpr,
    READ_G: tl.constexpr, REDUCE: tl.constexpr, WRITE_GRAD_Y: tl.constexpr,
    MASK_FROM_XHAT: tl.constexpr, MASK_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr, FIN_BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    ACT: tl.constexpr = ACTIVATION_RELU, act_param=0.0, res_ptr=None,
    HAS_RES: tl.constexpr = False,
):
    offs_c, c_ok, ok, offs, b, offs_l = elementwise_tile(C, L_out, BLOCK_C, BLOCK_L)

    if ACT != ACTIVATION_RELU:
        s = tl.load(saved_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z1 = s
        xhat = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        if NORM != NORM_CODE_NONE:
            gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
            beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            xhat = s
            z1 = s * gamma[:, None] + beta[:, None]  # the forward's float32 expression
        if READ_G:  # grad_residual: grad_out times the final activation's derivative
            g = tl.load(grad_res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            z2 = z1
            if RELU_BEFORE_ADD:
                z2 = activate(z1, ACT, act_param)
            if HAS_RES:
                z2 += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(grad_out_ptr + offs, mask=ok, other=0.0).to(tl.float32) \
                * activation_grad(z2, ACT, act_param)
        if WRITE_G:
            store_rounded(grad_res_ptr + offs, g, ok)
        if RELU_BEFORE_ADD:
            g = g * activation_grad(z1, ACT, act_param)
        g = tl.where(ok, g, 0.0)
    else:
        if READ_G:  # grad_residual: grad_out under the final ReLU's mask, as pass 1 stored it
            g = tl.load(grad_res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            g = tl.load(grad_out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if MASK_BITS:  # the bits forward saved (mask_bits.py): 1 where out is not <= 0
                bits = load_bits(mask_bits_ptr, b, offs_c, offs_l, ok, C, L_out)
                g = tl.where(bits == 0, 0.0, g)
            elif not MASK_FROM_XHAT:
                out = tl.load(out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                g = tl.where(out <= 0, 0.0, g)
        if WRITE_G:  # the residual sees only the final ReLU's mask
            store_rounded(grad_res_ptr + offs, g, ok)
        xhat = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        if NORM != NORM_CODE_NONE:
            gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
            xhat = tl.load(saved_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if MASK_FROM_XHAT or RELU_BEFORE_ADD:
                # The forward's float32 expression, so the masks agree bit for bit.
                beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
                z = xhat * gamma[:, None] + beta[:, None]
                if MASK_FROM_XHAT:  # out = relu(z) as forward stored it: no read of out
                    g = tl.where(as_stored(relu(z), out_ptr.dtype.element_ty) <= 0, 0.0, g)
                if RELU_BEFORE_ADD:
                    g = tl.where(z <= 0, 0.0, g)
            # Masked lanes loaded zeros, so they add nothing to the sums.
            g = tl.where(ok, g, 0.0)
        else:
            if RELU_BEFORE_ADD:
                y = tl.load(saved_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                g = tl.where(y <= 0, 0.0, g)

    if NORM == NORM_CODE_LAYER:  # the projection over each position's channels, all here
        l_ok = offs_l < L_out
        var_l = tl.load(var_ptr + b * L_out + offs_l, mask=l_ok, other=1.0).to(tl.float32)
        gg = g * gamma[:, None]
        mean_gg = tl.sum(gg, axis=0) / C
        mean_ggx = tl.sum(gg * xhat, axis=0) / C
        grad_y_layer = tl.where(ok, (gg - mean_gg[None, :] - xhat * mean_ggx[None, :])
                                * tl.rsqrt(var_l + eps)[None, :], 0.0)
    elif NORM != NORM_CODE_NONE:
        var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0).to(tl.float32)
        invstd = tl.rsqrt(var + eps)

    if REDUCE:
        part_row = part_ptr + tl.program_id(0).to(tl.int64) * 3 * C  # tile of elementwise_tile
        tl.store(part_row + offs_c, tl.sum(g, axis=1), mask=c_ok)
        tl.store(part_row + C + offs_c, tl.sum(g * xhat, axis=1), mask=c_ok)
        if NORM == NORM_CODE_LAYER:
            tl.store(part_row + 2 * C + offs_c, tl.sum(grad_y_layer, axis=1), mask=c_ok)
        else:
            tl.store(part_row + 2 * C + offs_c, tl.sum(xhat, axis=1), mask=c_ok)
        # sum_g and sum_gxhat are grad_beta and grad_gamma, written by the last programs.
        bn_grad_finalize(part_ptr, grp_ptr, counter_ptr, sum_g_ptr, sum_gxhat_ptr,
                         grad_bias_ptr, var_ptr, gamma_ptr, tl.program_id(0),
                         tl.num_programs(0), tl.program_id(1), C, n_per_channel, eps, NORM,
                         HAS_BIAS, GROUP, FIN_BLOCK_T, BLOCK_C)
    if WRITE_GRAD_Y:
        grad_y = g
        if NORM == NORM_CODE_TRAIN:
            sum_g = tl.load(sum_g_ptr + offs_c, mask=c_ok, other=0.0)
            sum_gxhat = tl.load(sum_gxhat_ptr + offs_c, mask=c_ok, other=0.0)
            mean_g = sum_g / n_per_channel
            mean_gxhat = sum_gxhat / n_per_channel
            grad_y = g - mean_g[:, None] - xhat * mean_gxhat[:, None]
        if NORM == NORM_CODE_LAYER:
            grad_y = grad_y_layer
        elif NORM != NORM_CODE_NONE:  # NORM_CODE_EVAL, NORM_CODE_TRAIN
            grad_y = grad_y * (gamma * invstd)[:, None]
        store_rounded(grad_y_ptr + offs, grad_y, ok)
