"""Streaming step of a whole causal stack in one launch (fastres.stream's GPU kernel).

stream_kernel advances batch row b = program_id(0) of a stack by n_steps steps. Per step:
the input goes into the first layer's ring (slot = time mod slots); then, layer by layer,
every conv reads its K taps from its input ring (tap k is `(K-1-k) * d` steps back) and
writes its output into the next layer's ring, the last layer into a scratch row that is
copied to out. All layouts are those of csrc/cpu/stream_cpu.cpp: the packed weights
(tap k of a conv is W_k[C_in][C_out], then the bias), the int64 meta table (header, then
one record per layer; constants in fastres/stream/layout.py) and the state (every layer's ring,
slots (K-1)*d + 1, each slot (B, C) float32). So a state moves between the CPU and GPU
streams.

Why one program per batch row: a step is a chain of small matrix-vector products, each
needing the previous one's whole output; a row's chain runs in one program with barriers
(tl.debug_barrier) between dependent writes and reads, and needs no grid-wide sync.
Writes and reads of the same step never touch the same ring slot except the current one,
written before a barrier and read after it: the ring keeps one slot more than the conv
needs for exactly that. On a GPU with few batch rows this uses few SMs; a step is
latency-bound (launch, the chain of dependent products), which the CUDA graph the stream
replays per step addresses.

Everything accumulates in float32; x and out may be float32, float16 or bfloat16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import store_rounded
from .tiling import pow2_block

from ...stream import layout as _layout

# The meta table's layout, from fastres/stream/layout.py (Triton reads globals as constexprs
# only).
HEADER = tl.constexpr(_layout.META_HEADER)
FIELDS = tl.constexpr(_layout.META_FIELDS)
BLOCK = tl.constexpr(_layout.BLOCK)
POINTWISE = tl.constexpr(_layout.POINTWISE)
F_KIND = tl.constexpr(_layout.F_KIND)
F_C_IN = tl.constexpr(_layout.F_C_IN)
F_C_OUT = tl.constexpr(_layout.F_C_OUT)
F_TAPS = tl.constexpr(_layout.F_TAPS)
F_DILATION = tl.constexpr(_layout.F_DILATION)
F_SLOTS = tl.constexpr(_layout.F_SLOTS)
F_RING_IN = tl.constexpr(_layout.F_RING_IN)
F_RING_MID = tl.constexpr(_layout.F_RING_MID)
F_W1 = tl.constexpr(_layout.F_W1)
F_B1 = tl.constexpr(_layout.F_B1)
F_W2 = tl.constexpr(_layout.F_W2)
F_B2 = tl.constexpr(_layout.F_B2)
F_WD = tl.constexpr(_layout.F_WD)
F_BD = tl.constexpr(_layout.F_BD)
F_RELU_BEFORE_ADD = tl.constexpr(_layout.F_RELU_BEFORE_ADD)


@triton.jit
def _conv_tile(w_ptr, w_off, b_off, ring_ptr, slots, pos, B, b, c_in, c_out, taps, dilation,
               co0, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """bias + sum_k W_k . ring[time pos - (K-1-k) * d] for output channels [co0, co0 +
    BLOCK_CO) of batch row b; ring_ptr is the conv's input ring ((slots, B, c_in) float32)."""
    offs_co = co0 + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < c_out
    acc = tl.zeros([BLOCK_CO], dtype=tl.float32)
    if b_off >= 0:
        acc += tl.load(w_ptr + b_off + offs_co, mask=co_ok, other=0.0)
    for k in range(0, taps):
        lag = (taps - 1 - k) * dilation
        row = ring_ptr + (((pos + slots - lag) % slots) * B + b) * c_in
        w_tap = w_ptr + w_off + k * c_in * c_out
        for ci0 in range(0, c_in, BLOCK_CI):
            offs_ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = offs_ci < c_in
            x = tl.load(row + offs_ci, mask=ci_ok, other=0.0)
            w = tl.load(w_tap + offs_ci[None, :] * c_out + offs_co[:, None],
                        mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def stream_kernel(x_ptr, out_ptr, w_ptr, meta_ptr, state_ptr, pos_ptr, scratch_ptr, n_steps,
                  x_sb, x_sc, x_st, o_sb, o_sc, o_st,
                  BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n_layers = tl.load(meta_ptr + 0)
    B = tl.load(meta_ptr + 1)
    c_in0 = tl.load(meta_ptr + 2)
    c_last = tl.load(meta_ptr + 3)
    pos0 = tl.load(pos_ptr)
    scratch = scratch_ptr + b * c_last
    for t in range(0, n_steps):
        pos = pos0 + t
        # This step's input into the first layer's ring.
        slots0 = tl.load(meta_ptr + HEADER + F_SLOTS)
        first = state_ptr + tl.load(meta_ptr + HEADER + F_RING_IN) \
            + ((pos % slots0) * B + b) * c_in0
        for c0 in range(0, c_in0, BLOCK_CO):
            offs = c0 + tl.arange(0, BLOCK_CO)
            ok = offs < c_in0
            v = tl.load(x_ptr + b * x_sb + offs * x_sc + t * x_st, mask=ok, other=0.0)
            tl.store(first + offs, v.to(tl.float32), mask=ok)
        tl.debug_barrier()
        for i in range(0, n_layers):
            rec = meta_ptr + HEADER + i * FIELDS
            kind = tl.load(rec + F_KIND)
            c_in = tl.load(rec + F_C_IN)
            c_out = tl.load(rec + F_C_OUT)
            taps = tl.load(rec + F_TAPS)
            dilation = tl.load(rec + F_DILATION)
            slots = tl.load(rec + F_SLOTS)
            ring_in = state_ptr + tl.load(rec + F_RING_IN)
            cur = pos % slots
            # Where the output goes: the next layer's ring (its current slot) or scratch.
            dst = scratch
            if i + 1 < n_layers:
                nxt = rec + FIELDS
                dst = state_ptr + tl.load(nxt + F_RING_IN) \
                    + ((pos % tl.load(nxt + F_SLOTS)) * B + b) * c_out
            if kind == BLOCK:
                ring_mid = state_ptr + tl.load(rec + F_RING_MID)
                w1 = tl.load(rec + F_W1)
                b1 = tl.load(rec + F_B1)
                w2 = tl.load(rec + F_W2)
                b2 = tl.load(rec + F_B2)
                wd = tl.load(rec + F_WD)
                bd = tl.load(rec + F_BD)
                relu_before_add = tl.load(rec + F_RELU_BEFORE_ADD)
                mid = ring_mid + (cur * B + b) * c_out
                for co0 in range(0, c_out, BLOCK_CO):
                    h = _conv_tile(w_ptr, w1, b1, ring_in, slots, pos, B, b, c_in, c_out, taps,
                                   dilation, co0, BLOCK_CO, BLOCK_CI)
                    offs = co0 + tl.arange(0, BLOCK_CO)
                    tl.store(mid + offs, tl.maximum(h, 0.0), mask=offs < c_out)
                tl.debug_barrier()
                for co0 in range(0, c_out, BLOCK_CO):
                    z = _conv_tile(w_ptr, w2, b2, ring_mid, slots, pos, B, b, c_out, c_out, taps,
                                   dilation, co0, BLOCK_CO, BLOCK_CI)
                    offs = co0 + tl.arange(0, BLOCK_CO)
                    ok = offs < c_out
                    if relu_before_add != 0:
                        z = tl.maximum(z, 0.0)
                    if wd >= 0:   # 1x1 projection of this step's input (lag 0)
                        res = _conv_tile(w_ptr, wd, bd, ring_in, slots, pos, B, b, c_in, c_out,
                                         1, 1, co0, BLOCK_CO, BLOCK_CI)
                    else:
                        res = tl.load(ring_in + (cur * B + b) * c_in + offs, mask=ok, other=0.0)
                    tl.store(dst + offs, tl.maximum(z + res, 0.0), mask=ok)
            elif kind == POINTWISE:
                w1 = tl.load(rec + F_W1)
                b1 = tl.load(rec + F_B1)
                for co0 in range(0, c_out, BLOCK_CO):
                    y = _conv_tile(w_ptr, w1, b1, ring_in, slots, pos, B, b, c_in, c_out, 1, 1,
                                   co0, BLOCK_CO, BLOCK_CI)
                    offs = co0 + tl.arange(0, BLOCK_CO)
                    tl.store(dst + offs, y, mask=offs < c_out)
            else:   # ReLU
                for co0 in range(0, c_out, BLOCK_CO):
                    offs = co0 + tl.arange(0, BLOCK_CO)
                    ok = offs < c_out
                    v = tl.load(ring_in + (cur * B + b) * c_in + offs, mask=ok, other=0.0)
                    tl.store(dst + offs, tl.maximum(v, 0.0), mask=ok)
            tl.debug_barrier()
        for c0 in range(0, c_last, BLOCK_CO):
            offs = c0 + tl.arange(0, BLOCK_CO)
            ok = offs < c_last
            v = tl.load(scratch + offs, mask=ok, other=0.0)
            store_rounded(out_ptr + b * o_sb + offs * o_sc + t * o_st, v, ok)
        tl.debug_barrier()   # the next step overwrites the scratch row and reads the rings


def block_sizes(max_channels: int):
    """(BLOCK_CO, BLOCK_CI): output channels per tile and input channels per reduction step."""
    return pow2_block(max_channels, 16, 64), pow2_block(max_channels, 16, 32)


def stream_forward(x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                   meta: torch.Tensor, state: torch.Tensor, position: torch.Tensor,
                   scratch: torch.Tensor, max_channels: int) -> None:
    """Advance `state` by x (B, C_in) (one step) or x (B, C_in, n), writing out (B, C_out[,
    n]). The caller advances `position` (a one-element int64 tensor on x's device): the
    kernel only reads it, so that a CUDA graph can replay the launch."""
    steps = x.shape[2] if x.dim() == 3 else 1
    xs = (x.stride(0), x.stride(1), x.stride(2) if x.dim() == 3 else 0)
    os_ = (out.stride(0), out.stride(1), out.stride(2) if out.dim() == 3 else 0)
    block_co, block_ci = block_sizes(max_channels)
    stream_kernel[(x.shape[0],)](x, out, weights, meta, state, position, scratch, steps, *xs,
                                 *os_, BLOCK_CO=block_co, BLOCK_CI=block_ci)
