"""Conv data gradient (grad_x) as an implicit GEMM over (K x C_out).

conv_dgrad_kernel computes a [BLOCK_CI, BLOCK_T] tile of grad_x for batch row b:

    grad_x[b, ci, t] = sum_{k < K} sum_{co < C_out} w[co, ci, k] * grad_y[b, co, l(t, k)]
    where l(t, k) = (t + pad_left - k*d) / s when that is a whole number in [0, L_out)

as one software-pipelined loop over (tap, C_out block) pairs of tl.dot products of the
transposed weight tile [BLOCK_CI, BLOCK_CO] (tap k of the tap-major copy, operands.py)
with the grad_y window [BLOCK_CO, BLOCK_T] that tap reads. At stride 1 that window is
contiguous, t + pad_left - k*d, and TMA reads it (zero fill = positions no output read);
at stride > 1 (or unaligned rows) it is a masked gather of the positions that are
multiples of the stride. Input positions the conv never read get 0.

HAS_ADDEND: grad_x += addend in the epilogue (a block's identity-shortcut gradient, which
autograd would otherwise add in a kernel of its own: 6 bytes an element become 2).
ADDEND_BITS: the addend is the second stage's grad_out, zeroed here where its final ReLU's
mask bits (mask_bits.py) are clear: that is grad_residual, which the second stage then
never writes (ops.ResidualGradLink: 2 bytes an element in 16 bits, for 1/8 byte more read
here and in the second stage's pass 2).

Shapes: grad_y (B, C_out, L_out), tap-major weight (K, C_out_p, C_in_p), grad_x and
addend (B, C_in, L), addend_bits (B, C_in, cdiv(L, 8)) uint8, contiguous; grad_y/w/grad_x
in x.dtype with float32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .mask_bits import load_bits
from .operands import weight_tile, window
from .rounding import store_rounded


@triton.jit
def _strided_grad_y_window(grad_y_ptr, b, co0, t0, k, C_out, L_out, stride, dilation, pad_left,
                           BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr):
    """grad_y[b, co0.., l] for l * stride = t + pad_left - k * d, 0 where no such l."""
    offs_co = co0 + tl.arange(0, BLOCK_CO)
    shifted = t0 + tl.arange(0, BLOCK_T) + pad_left - k * dilation
    shifted_ok = shifted >= 0
    shifted = tl.where(shifted_ok, shifted, 0)
    l = shifted // stride
    l_ok = shifted_ok & (l * stride == shifted) & (l < L_out)
    return tl.load(grad_y_ptr + b * C_out * L_out + offs_co[:, None].to(tl.int64) * L_out
                   + l[None, :], mask=(offs_co < C_out)[:, None] & l_ok[None, :], other=0.0)


@triton.jit
def conv_dgrad_kernel(
    grad_y_src, w_src, grad_x_ptr, addend_ptr, addend_bits_ptr,
    C_in, C_out, L, L_out, K, stride, dilation, pad_left, C_in_p, C_out_p,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_ADDEND: tl.constexpr = False, ADDEND_BITS: tl.constexpr = False,
):
    # Grid axis 0 enumerates (batch row, length tile): CUDA caps axes 1 and 2 at 65535.
    n_lblocks = tl.cdiv(L, BLOCK_T)
    b = (tl.program_id(0) // n_lblocks).to(tl.int64)
    pid_t = tl.program_id(0) % n_lblocks
    pid_ci = tl.program_id(1)
    t0 = pid_t * BLOCK_T

    acc = tl.zeros([BLOCK_CI, BLOCK_T], dtype=tl.float32)
    n_co = tl.cdiv(C_out, BLOCK_CO)
    for i in range(0, K * n_co):
        k = i // n_co
        co0 = (i % n_co) * BLOCK_CO
        w_tile = weight_tile(w_src, k, co0, pid_ci * BLOCK_CI, C_out_p, C_in_p, TMA,
                             BLOCK_CO, BLOCK_CI)
        if TMA:  # stride 1: output l read input t at tap k for l = t + pad_left - k * d
            gy_tile = window(grad_y_src, b, co0, t0 + pad_left - k * dilation, C_out, L_out,
                             1, TMA, BLOCK_CO, BLOCK_T)
        else:
            gy_tile = _strided_grad_y_window(grad_y_src, b, co0, t0, k, C_out, L_out, stride,
                                             dilation, pad_left, BLOCK_CO, BLOCK_T)
        if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
            w_tile, gy_tile = w_tile.to(tl.float32), gy_tile.to(tl.float32)
        acc = tl.dot(tl.trans(w_tile), gy_tile, acc, input_precision=DOT_PRECISION)

    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs = b * C_in * L + offs_ci[:, None].to(tl.int64) * L + offs_t[None, :]
    ok = (offs_ci < C_in)[:, None] & (offs_t < L)[None, :]
    if HAS_ADDEND:  # the block's shortcut gradient (ops.ResidualGradLink), added unrounded
        addend = tl.load(addend_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if ADDEND_BITS:  # as relu_bn_backward_kernel's MASK_BITS masks it: bit for bit
            addend = tl.where(load_bits(addend_bits_ptr, b, offs_ci, offs_t, ok, C_in, L) == 0,
                              0.0, addend)
        acc += addend
    store_rounded(grad_x_ptr + offs, acc, ok)
