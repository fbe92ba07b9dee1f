"""How the conv GEMMs read their operands: tensor descriptors (TMA) or masked pointers.

Activation windows. Every conv GEMM reads, per tap k, a window of a (B, C, L) activation
shifted by `k * dilation - pad_left` (forward, wgrad) or `pad_left - k * dilation` (dgrad).
That shift has no alignment, so a pointer load of it is one 2-byte scalar per lane on
the GPU and is not pipelined (cp.async needs 4+ aligned bytes). A tensor descriptor
(Hopper's TMA) copies a box at any int32 coordinates, negative or past the end included,
and fills what lies outside the tensor with zeros: that is causal / same padding for
free, and the copy is asynchronous, so the compiler's software pipeliner overlaps it with
the tensor-core work. The descriptor needs a 16-byte aligned base and 16-byte row strides
(L % 8 == 0 in 16 bits, L % 4 == 0 in float32) and a unit conv stride (the window is
contiguous); other calls take the masked-pointer path (`window` with TMA=False).

Weights. Kernels read weights as tap-major `(K, C_out_p, C_in_p)` tiles, C padded to a
multiple of 8 with zeros, so a weight tile is a contiguous, aligned box whatever C_in is;
`tap_major_weight` builds that copy once per weight version (an optimizer step bumps the
version) and caches it.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ...conventions import triton_interpreting

# Channel counts of the tap-major weight copy are padded to this (16 bytes of bf16).
WEIGHT_CHANNEL_ALIGN = 8


def descriptor_ok(t: torch.Tensor, conv_stride: int = 1) -> bool:
    """Whether a contiguous (B, C, L) tensor can be read through a tensor descriptor."""
    from . import tiling
    return (tiling.USE_TMA and conv_stride == 1 and t.is_contiguous()
            and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0)


def descriptor(t: torch.Tensor, block_shape):
    """A host-side TMA descriptor of `t` whose box is `block_shape`; zero fill outside."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    patch_interpreter()
    # Row-major strides from the shape: a contiguous tensor may carry any stride on a
    # size-1 dimension (K=1 weights, B=1 batches), which TMA would reject; it is never used.
    strides = [1]
    for size in reversed(t.shape[1:]):
        strides.insert(0, strides[0] * size)
    return TensorDescriptor(t, list(t.shape), strides, list(block_shape))


# id(weight) -> (weak reference to the weight, its version, the tap-major copy)
_WEIGHT_CACHE: dict = {}


def tap_major_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, K) -> zero-padded (K, C_out_p, C_in_p) copy, cached per weight version.

    One entry per live weight tensor: a hit needs the very same tensor object (a new
    tensor at a freed address is a new weight) at the same version (an optimizer step
    bumps it); an entry goes when its weight is garbage collected."""
    C_out, C_in, K = weight.shape
    hit = _WEIGHT_CACHE.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    pad = lambda c: triton.cdiv(c, WEIGHT_CHANNEL_ALIGN) * WEIGHT_CHANNEL_ALIGN  # noqa: E731
    if (pad(C_out), pad(C_in)) == (C_out, C_in):  # one copy kernel
        taps = weight.detach().permute(2, 0, 1).contiguous()
    else:  # a zero fill and a copy
        taps = torch.zeros((K, pad(C_out), pad(C_in)), dtype=weight.dtype, device=weight.device)
        taps[:, :C_out, :C_in] = weight.detach().permute(2, 0, 1)
    key = id(weight)
    _WEIGHT_CACHE[key] = (weakref.ref(weight, lambda _: _WEIGHT_CACHE.pop(key, None)),
                          weight._version, taps)
    return taps


def weight_tile_descriptor(taps: torch.Tensor, block_rows: int, block_cols: int):
    """Descriptor of the tap-major copy: box [1, block_rows, block_cols] at [k, row, col]."""
    return descriptor(taps, (1, block_rows, block_cols))


@triton.jit
def window(src, b, c0, t0, C, L, stride,
           TMA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """[BLOCK_C, BLOCK_T] window of batch row b of a (B, C, L) tensor: rows c0.., columns
    t0 + j * stride; positions outside [0, C) x [0, L) read 0.

    TMA: `src` is a descriptor with box [1, BLOCK_C, BLOCK_T] (stride must be 1).
    Otherwise `src` is the base pointer and the window a masked gather.
    """
    if TMA:
        tile = src.load([b.to(tl.int32), c0, t0]).reshape(BLOCK_C, BLOCK_T)
    else:
        offs_c = c0 + tl.arange(0, BLOCK_C)
        t = t0 + tl.arange(0, BLOCK_T) * stride
        ok = (offs_c < C)[:, None] & ((t >= 0) & (t < L))[None, :]
        tile = tl.load(src + b.to(tl.int64) * C * L + offs_c[:, None].to(tl.int64) * L
                       + t[None, :], mask=ok, other=0.0)
    return tile


@triton.jit
def weight_tile(w, k, r0, c0, R, Cc, TMA: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_R, BLOCK_C] tile at tap k, rows r0.., columns c0.. of the tap-major weight
    (K, R, Cc) (R, Cc padded to WEIGHT_CHANNEL_ALIGN; the padding holds zeros)."""
    if TMA:
        tile = w.load([k, r0, c0]).reshape(BLOCK_R, BLOCK_C)
    else:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_c = tl.max_contiguous(tl.multiple_of(offs_c, BLOCK_C), BLOCK_C)
        ok = (offs_r < R)[:, None] & (offs_c < Cc)[None, :]
        tile = tl.load(w + (k * R + offs_r[:, None]) * Cc + offs_c[None, :], mask=ok, other=0.0)
    return tile


_PATCHED = False


def patch_interpreter():
    """Make Triton's CPU interpreter run fastres as the GPU does (TRITON_INTERPRET=1 only).

    Two fixes, each chosen by what the installed Triton has, never by its version number:
    - Descriptor boxes at any column (`TensorDescHandle.materialize_pointers`). The
      interpreter asserts that a descriptor load's innermost offset is a multiple of 16
      bytes. TMA's tensor coordinates are plain int32 with zero fill outside the tensor, so
      the GPU needs no such alignment, and the conv windows here are shifted by
      k * dilation - pad_left. The check is dropped; the pointer arithmetic and masks the
      interpreter builds are the same either way. The class is found by its name: Triton
      3.6 also has a `BlockPointerHandle.materialize_pointers` (block pointers, which
      fastres does not use), so "the class with that method" picked the wrong one there.
    - Kernel scalars as Python ints (`tl.tensor.__index__`, e.g. `range(n)` over a kernel
      argument). Triton 3.6's interpreter converts with `int(array)` of a 1-element array
      with one dimension, which numpy >= 2.5 refuses; `.item()` reads the value on every
      numpy and Triton version.
    """
    global _PATCHED
    if _PATCHED or not triton_interpreting():
        return
    from triton.runtime import interpreter
    _patch_scalar_index(interpreter)
    _patch_descriptor_offsets(interpreter)
    _PATCHED = True


def _patch_scalar_index(interpreter):
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastres", False):
        return

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        patch_tensor(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._fastres = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_descriptor_offsets(interpreter):
    import numpy as np
    cls = getattr(interpreter, "TensorDescHandle", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if cls is None or handle is None or not hasattr(cls, "materialize_pointers"):
        return

    def materialize_pointers(self, offsets):
        # The interpreter's own body (triton 3.6 to 3.9) without the alignment assertion.
        itemsize = self.base.dtype.element_ty.primitive_bitwidth // 8
        ptrs = np.broadcast_to(self.base.data, self.block_shape)
        masks = np.ones(self.block_shape, dtype=bool)
        for dim, size in enumerate(self.block_shape):
            shape = [1] * len(self.block_shape)
            shape[dim] = size
            off = (offsets[dim].data + np.arange(size)).reshape(shape)
            ptrs = ptrs + (itemsize * off * self.strides[dim].data).astype(np.uint64)
            masks = masks & (0 <= off) & (off < self.shape[dim].data)
        return (handle(ptrs, self.base.dtype.scalar), handle(masks, tl.int1))

    cls.materialize_pointers = materialize_pointers


# Interpreted kernels can launch as soon as this module is imported.
patch_interpreter()
