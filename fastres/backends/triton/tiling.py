"""Block-size and precision choices shared by the Triton kernels' launchers.

Block sizes are powers of two (tl.arange needs them) and at least 16 (every tl.dot
dimension must be >= 16 on the GPU); the interpreter enforces neither, so these helpers
do. The limits are module attributes so tests can shrink them to force several tiles
along every axis on small shapes.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ...conventions import cudnn_conv_tf32, triton_interpreting

# Upper bounds of the tile sizes (powers of two); tests lower them to exercise edge tiles.
MAX_BLOCK_CO = 256  # channels a GEMM program tiles (forward: C_out, dgrad: C_in, wgrad: C_out)
MAX_BLOCK_CI = 64   # channels per reduction step (forward: C_in, dgrad: C_out), 16-bit;
                    # wgrad's C_in tile is capped by MAX_BLOCK_CO / 2
MAX_BLOCK_L = 128   # positions per program (wgrad: per reduction step)
MAX_BLOCK_C = 32    # channels per program of the elementwise BN kernels
MIN_DOT = 16        # smallest tl.dot dimension the GPU accepts
MAX_ACC = 128 * 128  # float32 accumulator elements per program: 64 registers a thread at 8 warps
SMEM_BUDGET = 200 * 1024  # bytes of pipelined operand buffers (H100: 227 KiB a block)
MAX_STAGES = 4

# Layer norm over channels (docs/spec.md, "Layer norm") is fused where one program's tile
# holds every output channel of its positions: the conv forward's BLOCK_CO and the
# backward's elementwise BLOCK_C cover all of C_out, so the per-position mean, variance and
# backward projection are reductions over the tile's channel axis, in registers. The bound
# is the forward's widest channel tile (MAX_BLOCK_CO's 256, whose accumulator fits
# MAX_ACC at 32-64 positions); wider layers are refused (TritonBackend.supports) and run
# plain. Its own attribute, so that tests shrinking MAX_BLOCK_CO keep layer norm fused.
LAYER_NORM_MAX_CHANNELS = 256
# Elements of one program's tile in the layer-norm backward pass (BLOCK_C covers C_out;
# BLOCK_L shrinks to keep the tile at this): 32 float32 values a thread of each tensor at
# 4 warps, as the batch-norm passes' 32 x 128 tiles.
LAYER_NORM_BACKWARD_TILE = 4096

# Read activation windows through tensor descriptors (TMA) where the layout allows
# (operands.descriptor_ok). FASTRES_TRITON_TMA=0 forces the masked-pointer path everywhere:
# the way out if a GPU ever refuses what the TMA path does (benchmarks/NOTES.md).
USE_TMA = os.environ.get("FASTRES_TRITON_TMA", "1") != "0"

# How many programs wgrad aims for in total; the (b, l) reduction is split to reach it.
# One wave on an H100 SXM (132 SMs): every split writes a float32 partial of its tile and
# the last one reads them all back, 8 * programs * tile elements bytes a call, so more
# waves cost HBM traffic (512, four waves, cost 4N of a 62N TemporalBlock step at C=256;
# 132 costs 1N); at B=32, L=4096 each split still reduces over 180+ (b, l) blocks.
WGRAD_TARGET_PROGRAMS = 132
MAX_WGRAD_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of one conv GEMM: out tile [block_m, block_n], reduction steps of block_k.

    forward: (C_out, L_out, C_in); dgrad: (C_in, L, C_out); wgrad: (C_out, C_in, L_out).
    Every block is a power of two >= 16 (tl.arange and tl.dot need it); num_stages is
    how many operand buffers the software pipeline keeps in shared memory."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, element_size: int) -> int:
        per_stage = (self.block_m + self.block_n) * self.block_k * element_size
        return self.num_stages * per_stage


def gemm_config(M: int, N: int, Kr: int, dtype: torch.dtype, *, max_m: int, max_n: int,
                max_k: int) -> GemmConfig:
    """Tiles that fit the problem: block_m up to all of M (an operand is then read once),
    block_n shrunk to keep the accumulator at MAX_ACC (half that in float32), a reduction
    step of max_k * 2 bytes, 8 warps (two warpgroups) for large tiles,
    and as many pipeline stages as fit SMEM_BUDGET (at least 2)."""
    size = torch.empty((), dtype=dtype).element_size()
    block_m = pow2_block(M, MIN_DOT, max_m)
    block_n = pow2_block(N, MIN_DOT, max(MIN_DOT, min(max_n, _max_acc(size) // block_m)))
    block_k = pow2_block(Kr, MIN_DOT, max(MIN_DOT, max_k * 2 // size))
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    stages = MAX_STAGES
    while stages > 2 and GemmConfig(block_m, block_n, block_k, num_warps,
                                    stages).smem_bytes(size) > SMEM_BUDGET:
        stages -= 1
    return GemmConfig(block_m, block_n, block_k, num_warps, stages)


def _max_acc(element_size: int) -> int:
    """float32 epilogues hold 32-bit operand tiles (residual, x-hat) beside the accumulator:
    half the accumulator keeps them out of local memory (an fp32 C=256 forward spilled at
    MAX_ACC; tests/backends/test_triton_codegen.py checks)."""
    return MAX_ACC // 2 if element_size > 2 else MAX_ACC


def forward_config(C_in: int, C_out: int, L_out: int, dtype: torch.dtype) -> GemmConfig:
    return gemm_config(C_out, L_out, C_in, dtype, max_m=MAX_BLOCK_CO, max_n=MAX_BLOCK_L,
                       max_k=MAX_BLOCK_CI)


def layer_norm_forward_config(C_in: int, C_out: int, L_out: int,
                              dtype: torch.dtype) -> GemmConfig:
    """forward_config for layer norm: block_m covers all of C_out (up to
    LAYER_NORM_MAX_CHANNELS, which the caller checks), whatever MAX_BLOCK_CO is."""
    return gemm_config(C_out, L_out, C_in, dtype, max_m=LAYER_NORM_MAX_CHANNELS,
                       max_n=MAX_BLOCK_L, max_k=MAX_BLOCK_CI)


def dgrad_config(C_in: int, C_out: int, L: int, dtype: torch.dtype) -> GemmConfig:
    return gemm_config(C_in, L, C_out, dtype, max_m=MAX_BLOCK_CO, max_n=MAX_BLOCK_L,
                       max_k=MAX_BLOCK_CI)


def wgrad_config(C_in: int, C_out: int, L_out: int, dtype: torch.dtype) -> GemmConfig:
    return gemm_config(C_out, C_in, L_out, dtype, max_m=min(MAX_BLOCK_CO, 128),
                       max_n=max(MIN_DOT, MAX_BLOCK_CO // 2), max_k=MAX_BLOCK_L)


def pointer_config(config: GemmConfig, all_rows: bool = False) -> GemmConfig:
    """Tiles for the masked-pointer path (stride > 1, rows that are not 16-byte multiples):
    its operands arrive as 2-byte scalar gathers through registers, which neither large
    tiles nor deep pipelines help; at the TMA path's tiles wgrad spilled 400+ bytes a
    thread (benchmarks/NOTES.md). At most 64 x 64 outputs, 32-deep steps, 4 warps.
    `all_rows` (layer norm's forward, whose tile must hold every channel) keeps block_m
    and shrinks block_n to the same 64 * 64 outputs instead (at least MIN_DOT)."""
    if all_rows:
        return GemmConfig(config.block_m,
                          min(config.block_n, max(MIN_DOT, 64 * 64 // config.block_m)),
                          min(config.block_k, 32), 4, 2)
    return GemmConfig(min(config.block_m, 64), min(config.block_n, 64),
                      min(config.block_k, 32), 4, 2)


def candidate_configs(config: GemmConfig, M: int, N: int, dtype: torch.dtype):
    """The heuristic `config` first, then its neighbours worth timing on a GPU (tuning.py):
    block_n halved and doubled, the reduction step halved, the other warp count. Pruned:
    tl.dot-sized and power-of-two blocks, block_n within N's next power of two, an
    accumulator no larger than the heuristic allows (MAX_ACC, half in float32) nor than 64
    registers a thread, and as many stages as SMEM_BUDGET allows (>= 2; a
    config that needs more shared memory than that at 2 stages is dropped)."""
    size = torch.empty((), dtype=dtype).element_size()
    out = [config]
    n_cap = max(MIN_DOT, triton.next_power_of_2(max(int(N), 1)))
    for block_n in (config.block_n // 2, config.block_n, config.block_n * 2):
        for block_k in (config.block_k // 2, config.block_k):
            for warps in (4, 8):
                acc = config.block_m * block_n
                # (at most 64 accumulator registers a thread: 4 warps spilled beyond)
                if min(block_n, block_k) < MIN_DOT or block_n > n_cap \
                        or acc > max(_max_acc(size), config.block_m * config.block_n) \
                        or acc > MAX_ACC * warps // 8:
                    continue
                stages = MAX_STAGES
                while stages > 2 and GemmConfig(config.block_m, block_n, block_k, warps,
                                                stages).smem_bytes(size) > SMEM_BUDGET:
                    stages -= 1
                cfg = GemmConfig(config.block_m, block_n, block_k, warps, stages)
                if cfg.smem_bytes(size) <= SMEM_BUDGET and cfg not in out:
                    out.append(cfg)
    return out


def elementwise_tiles(C: int, L_out: int):
    """(BLOCK_C, BLOCK_L) of the elementwise BN kernels (no tl.dot: any power of two)."""
    return pow2_block(C, 1, MAX_BLOCK_C), pow2_block(L_out, 16, MAX_BLOCK_L)


def layer_norm_backward_tiles(C: int, L_out: int):
    """(BLOCK_C, BLOCK_L) of the layer-norm backward pass: BLOCK_C covers all C channels
    (C <= LAYER_NORM_MAX_CHANNELS), BLOCK_L keeps the tile at LAYER_NORM_BACKWARD_TILE."""
    block_c = pow2_block(C, 1, LAYER_NORM_MAX_CHANNELS)
    return block_c, pow2_block(L_out, 16, max(16, min(MAX_BLOCK_L,
                                                       LAYER_NORM_BACKWARD_TILE // block_c)))


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


# Tiles per first-level group of the fused finalizes (batch_stats.py: the last program of
# each group reduces its rows, the last group the group rows). 32 keeps both levels short
# at B=32, L=4096 (1024-2048 tiles: 32-64 group rows). Tests lower it to get several groups.
FINALIZE_GROUP = 32

@triton.jit
def elementwise_tile(C, L_out, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's [BLOCK_C, BLOCK_L] tile of a contiguous (B, C, L_out) tensor.

    Grid axis 0 enumerates (batch row, length tile), because CUDA caps grid axes 1 and 2
    at 65535; axis 1 tiles the channels. The batch offset is int64, so B*C*L_out may pass
    2**31. Returns (channel offsets, channel mask, tile mask, element offsets, batch row,
    length offsets).
    """
    n_lblocks = tl.cdiv(L_out, BLOCK_L)
    b = (tl.program_id(0) // n_lblocks).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = (tl.program_id(0) % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < C
    ok = c_ok[:, None] & (offs_l < L_out)[None, :]
    offs = b * C * L_out + offs_c[:, None].to(tl.int64) * L_out + offs_l[None, :]
    return offs_c, c_ok, ok, offs, b, offs_l
