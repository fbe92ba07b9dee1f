"""Block-size and precision choices shared by the Triton kernels' launchers.

Block sizes are powers of two (tl.arange needs them) and at least 16 (every tl.dot
dimension must be >= 16 on the GPU); the interpreter enforces neither, so these helpers
do. The limits are module attributes so tests can shrink them to force several tiles
along every axis on small shapes.
"""
from __future__ import annotations

import os

import torch
import triton

# Upper bounds of the tile sizes (powers of two). 64 x 64 fp32 accumulators keep register
# pressure sane at num_warps=4; tests lower them to exercise edge tiles.
MAX_BLOCK_CO = 64   # output channels per program (forward, wgrad rows)
MAX_BLOCK_CI = 32   # input channels per tl.dot reduction step (forward), per program (dgrad)
MAX_BLOCK_L = 64    # output positions per program
MAX_BLOCK_C = 32    # channels per program of the elementwise BN kernels
MIN_DOT = 16        # smallest tl.dot dimension the GPU accepts

# How many programs wgrad aims for in total; the (b, l) reduction is split to reach it.
WGRAD_TARGET_PROGRAMS = 512
MAX_WGRAD_SPLITS = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2_block(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi] (both powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input_precision: float32 follows cudnn.allow_tf32 as nn.Conv1d does (SPEC.md).

    fp16/bf16 operands always run on tensor cores, the flag is irrelevant to them; the
    interpreter computes dots in numpy, so "ieee" there.
    """
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
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
    return interpreting() and dtype == torch.bfloat16
