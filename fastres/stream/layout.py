"""The packed layout both stream kernels read: layer kinds, the meta table, alignment.

This is the one place the Python side of the layout lives: fastres/stream/plan.py packs with
it, fastres/backends/triton/stream_step.py reads its constants, and csrc/cpu/stream_cpu.cpp
mirrors them (a mismatch fails that kernel's header check, META_VERSION).

weights  one contiguous buffer of the compute dtype: per layer, conv1 as K taps of
         W_k[C_in][C_out] (row-major: tap k multiplies the input of (K-1-k)*d steps back),
         then its bias; conv2 and the 1x1 downsample likewise. Every piece starts at a
         multiple of ALIGN values.
meta     int64: META_HEADER values, then META_FIELDS per layer (fields F_*), offsets into
         weights (w*, b*; -1 absent) and into the state (rings).
state    every layer's input ring, and a block's ring of its first conv's output (h):
         (K-1)*d + 1 slots of (B, C) values each; the input of time t sits in slot
         t mod slots. All zeros is the causal zero padding. Ring offsets are multiples of
         ALIGN too. The same layout on every backend, so a state moves between them.
position one int64: the steps taken since the zero state.
"""
from __future__ import annotations

# Layer kinds.
BLOCK, POINTWISE, RELU = 0, 1, 2

# Header: n_layers, batch, c_in, c_out, max_c, state size, weights size, layout version.
META_HEADER, META_FIELDS, META_VERSION = 8, 16, 1
(H_LAYERS, H_BATCH, H_C_IN, H_C_OUT, H_MAX_C, H_STATE_SIZE, H_WEIGHTS_SIZE,
 H_VERSION) = range(META_HEADER)
# Per layer record.
(F_KIND, F_C_IN, F_C_OUT, F_TAPS, F_DILATION, F_SLOTS, F_RING_IN, F_RING_MID, F_W1, F_B1,
 F_W2, F_B2, F_WD, F_BD, F_RELU_BEFORE_ADD) = range(15)

# Offsets in the packed buffers are multiples of 16 values (64 bytes in float32: a cache line
# and an AVX-512 register).
ALIGN = 16


def aligned(size: int) -> int:
    """size rounded up to a multiple of ALIGN."""
    return -(-size // ALIGN) * ALIGN
