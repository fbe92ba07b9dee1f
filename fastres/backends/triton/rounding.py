"""store_rounded: tl.store of a float32 tile into a pointer of any float dtype, rounding
to nearest even (as_stored: the value it would store, without storing).

On the GPU this is a plain cast-and-store (float32 -> fp16/bf16 conversions round to
nearest even there). Triton's interpreter (3.9) truncates float32 -> bfloat16 instead,
doubling the rounding error and making CI judge a less accurate kernel than the GPU
runs; under TRITON_INTERPRET=1 the bfloat16 case adds the round-to-nearest-even bias to
the float32 bits of normal numbers first, so the truncation lands on the correctly
rounded value.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...conventions import triton_interpreting

_INTERPRETING = tl.constexpr(triton_interpreting())


@triton.jit
def _cast_rounded(value, dtype: tl.constexpr):
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            # (not +=: in the interpreter that would write through to the caller's tile)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            # Zeros and subnormals stay as they are: biasing 0.0 would make a subnormal that
            # the interpreter's bf16 conversion turns into a nonzero value (a flipped ReLU mask).
            rounded = bits.to(tl.float32, bitcast=True)
            value = tl.where(tl.abs(value) >= 1.1754944e-38, rounded, value)
    return value.to(dtype)


@triton.jit
def store_rounded(ptr, value, mask):
    tl.store(ptr, _cast_rounded(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def as_stored(value, dtype: tl.constexpr):
    """The float32 value store_rounded would store into a tensor of `dtype`, read back:
    backward recomputes a stored output's sign with it (a tiny positive float32 that
    rounds to zero in fp16 is a zero output)."""
    return _cast_rounded(value, dtype).to(tl.float32)


@triton.jit
def relu(z):
    """torch.relu's semantics: NaN stays NaN. (tl.maximum(z, 0) returns the non-NaN operand,
    and so does the GPU's max instruction, which would silently zero a diverging model.)"""
    return tl.where(z < 0, 0.0, z)
