"""Block-size and precision choices shared by the Triton kernels' launchers.

Block sizes are powers of two (tl.arange needs them) and at least 16 (every tl.dot
dimension must be >= 16 on the GPU); the interpreter enforces neither, so these helpers
do. The limits are module attributes so tests can shrink them to force several tiles
along every axis on small shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...conventions import cudnn_conv_tf32, triton_interpreting

# Upper bounds of the tile sizes (powers of two). 64 x 64 fp32 accumulators keep register
# pressure sane at num_warps=4; tests lower them to exercise edge tiles.
MAX_BLOCK_CO = 64   # channels a GEMM program tiles (forward: C_out, dgrad: C_in, wgrad: C_out)
MAX_BLOCK_CI = 32   # channels per tl.dot reduction step (forward: C_in, dgrad: C_out, wgrad: C_in)
MAX_BLOCK_L = 64    # positions per program
MAX_BLOCK_C = 32    # channels per program of the elementwise BN kernels
MIN_DOT = 16        # smallest tl.dot dimension the GPU accepts

# How many programs wgrad aims for in total; the (b, l) reduction is split to reach it.
WGRAD_TARGET_PROGRAMS = 512
MAX_WGRAD_SPLITS = 64


def conv_tiles(C_reduce: int, C_tile: int, L_tile: int):
    """(BLOCK over the reduced channels, BLOCK over the tiled channels, BLOCK over length)
    for the three implicit GEMMs: forward (C_in, C_out, L_out), dgrad (C_out, C_in, L),
    wgrad (C_in, C_out, L_out)."""
    return (pow2_block(C_reduce, MIN_DOT, MAX_BLOCK_CI), pow2_block(C_tile, MIN_DOT, MAX_BLOCK_CO),
            pow2_block(L_tile, MIN_DOT, MAX_BLOCK_L))


def elementwise_tiles(C: int, L_out: int):
    """(BLOCK_C, BLOCK_L) of the elementwise BN kernels (no tl.dot: any power of two)."""
    return pow2_block(C, 1, MAX_BLOCK_C), pow2_block(L_out, 16, MAX_BLOCK_L)


def wgrad_splits(n_pairs: int, n_tile_programs: int):
    """(n_splits, pairs_per_split): cut wgrad's B * n_lblocks reduction into contiguous
    ranges so that about WGRAD_TARGET_PROGRAMS programs run; every split is non-empty."""
    n_splits = max(1, min(n_pairs, MAX_WGRAD_SPLITS, cdiv(WGRAD_TARGET_PROGRAMS, n_tile_programs)))
    per_split = cdiv(n_pairs, n_splits)
    return cdiv(n_pairs, per_split), per_split


def pow2_block(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi] (both powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input_precision: float32 follows the TF32 setting nn.Conv1d follows
    (conventions.cudnn_conv_tf32; docs/spec.md).

    fp16/bf16 operands always run on tensor cores, the flag is irrelevant to them; the
    interpreter computes dots in numpy, so "ieee" there.
    """
    if dtype == torch.float32 and device.type == "cuda" and cudnn_conv_tf32():
        return "tf32"
    if dtype == torch.float32:
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dot_upcast(dtype: torch.dtype) -> bool:
    """Upcast tl.dot operands to float32 first: only in the interpreter, whose tl.dot
    multiplies bfloat16 tiles as raw 16-bit integers (triton 3.9). Exact: bf16 -> fp32
    is lossless and the accumulation is float32 either way."""
    return triton_interpreting() and dtype == torch.bfloat16


# Rows (tiles, splits) one finalize program reduces; more rows than this are reduced in two
# levels, FINALIZE_ROWS-row chunks in parallel and then the chunks. A power of two.
FINALIZE_ROWS = 1024

# Training keeps the conv output y in float32 between the conv and the apply pass for
# fp16/bf16 inputs (bn_apply.py says why). False stores it in x.dtype instead: 2x fewer
# bytes for that round trip, but ReLU masks near zero then flip often enough to exceed
# the 1e-2 bound of the parity tests. A speed/precision knob for benchmarks.
TRAIN_Y_FLOAT32 = True


@triton.jit
def elementwise_tile(C, L_out, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's [BLOCK_C, BLOCK_L] tile of a contiguous (B, C, L_out) tensor.

    Grid axis 0 enumerates (batch row, length tile), because CUDA caps grid axes 1 and 2
    at 65535; axis 1 tiles the channels. The batch offset is int64, so B*C*L_out may pass
    2**31. Returns (channel offsets, channel mask, tile mask, element offsets).
    """
    n_lblocks = tl.cdiv(L_out, BLOCK_L)
    b = (tl.program_id(0) // n_lblocks).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = (tl.program_id(0) % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < C
    ok = c_ok[:, None] & (offs_l < L_out)[None, :]
    offs = b * C * L_out + offs_c[:, None].to(tl.int64) * L_out + offs_l[None, :]
    return offs_c, c_ok, ok, offs
