"""The final ReLU's mask, one bit an element: what a stage with a residual saves so that
backward need not read `out` (2 bytes an element in 16 bits; the mask is 1/8 of a byte).

Layout: uint8 (B, C, cdiv(L_out, 8)), contiguous (conventions.mask_bits_shape). Bit j of
byte [b, c, i] is position 8 i + j: set where the stored output is not <= 0, which is
where the final ReLU passes the gradient (positive outputs, and NaN, whose gradient
torch.relu's backward passes on). Bits past L_out are 0.

store_bits packs a [BLOCK_C, BLOCK_L] tile (BLOCK_L a multiple of 8, starting at a
multiple of 8) with a reshape and a shifted sum over each group of 8 (distinct bits: the
sum is their OR); load_bits reads each element's byte (a tile reads each byte 8 times,
from L1) and shifts its bit out.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_bits(mask_ptr, keep, b, offs_c, l0, C, L_out, BLOCK_C: tl.constexpr,
               BLOCK_L: tl.constexpr):
    """Store keep ([BLOCK_C, BLOCK_L] of 0/1, positions l0 + arange(BLOCK_L) of batch row b
    and channels offs_c) as bits."""
    n_bytes = tl.cdiv(L_out, 8)
    grouped = tl.reshape(keep.to(tl.int32), (BLOCK_C, BLOCK_L // 8, 8))
    byte = tl.sum(grouped << tl.arange(0, 8)[None, None, :], axis=2)
    offs_byte = l0 // 8 + tl.arange(0, BLOCK_L // 8)
    ptr = mask_ptr + (b * C + offs_c[:, None].to(tl.int64)) * n_bytes + offs_byte[None, :]
    tl.store(ptr, byte.to(tl.uint8), mask=(offs_c < C)[:, None] & (offs_byte < n_bytes)[None, :])


@triton.jit
def load_bits(mask_ptr, b, offs_c, offs_l, ok, C, L_out):
    """The bits of positions offs_l, channels offs_c of batch row b, as 0/1 int32."""
    n_bytes = tl.cdiv(L_out, 8)
    ptr = mask_ptr + (b * C + offs_c[:, None].to(tl.int64)) * n_bytes + (offs_l // 8)[None, :]
    byte = tl.load(ptr, mask=ok, other=0).to(tl.int32)
    return (byte >> (offs_l % 8)[None, :]) & 1
