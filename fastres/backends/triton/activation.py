"""The epilogue's activation in the Triton kernels (docs/spec.md, "Activation").

The kernels take it as a constexpr code ACT, one of the named constants below (the values
of fastres/backends/_activation.py's ACT_*, which the launcher passes), and leaky_relu's
slope or elu's alpha as `param`. Each kernel compares ACT with these names, never with a
literal integer, so a reader sees which activation a branch is for; every branch is
resolved when the kernel is compiled, so ReLU's kernels are the ones they were.

activate(z) is the activation with PyTorch's formulas; activation_grad(z) its derivative
at its input z (backward recomputes z from what forward saved: the kernels never take a
derivative from a 16-bit output). Triton has no tanh: it is 1 - 2 / (e^{2z} + 1), which
stays finite for every z (e^{2z} = inf gives 1, 0 gives -1).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._activation import (ACT_ELU, ACT_GELU, ACT_GELU_TANH, ACT_LEAKY_RELU, ACT_RELU,
                           ACT_SILU, ACT_TANH)
from .rounding import relu

ACTIVATION_RELU = tl.constexpr(ACT_RELU)
ACTIVATION_GELU = tl.constexpr(ACT_GELU)
ACTIVATION_GELU_TANH = tl.constexpr(ACT_GELU_TANH)
ACTIVATION_SILU = tl.constexpr(ACT_SILU)
ACTIVATION_TANH = tl.constexpr(ACT_TANH)
ACTIVATION_LEAKY_RELU = tl.constexpr(ACT_LEAKY_RELU)
ACTIVATION_ELU = tl.constexpr(ACT_ELU)

_SQRT_HALF = tl.constexpr(0.7071067811865476)        # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)     # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)   # sqrt(2 / pi)
_GELU_KAPPA = tl.constexpr(0.044715)
# (a constant times a tensor is written tensor * constant: constexpr.__mul__ would wrap the
# tensor product in a constexpr, which the interpreter cannot convert back)


@triton.jit
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def activate(z, ACT: tl.constexpr, param):
    """act(z) (float32). ReLU keeps NaN (rounding.relu)."""
    if ACT == ACTIVATION_RELU:
        out = relu(z)
    elif ACT == ACTIVATION_GELU:
        out = z * 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF))
    elif ACT == ACTIVATION_GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_KAPPA) * _SQRT_2_OVER_PI))
    elif ACT == ACTIVATION_SILU:
        out = z / (1.0 + tl.exp(-z))
    elif ACT == ACTIVATION_TANH:
        out = _tanh(z)
    elif ACT == ACTIVATION_LEAKY_RELU:
        out = tl.where(z > 0, z, z * param)
    else:  # ACTIVATION_ELU: alpha (e^z - 1), e^z - 1 exact near 0 as expm1 would be
        small = tl.abs(z) < 1e-3
        em1 = tl.where(small, z * (1.0 + z * (0.5 + z * 0.16666666666666666)),
                       tl.exp(z) - 1.0)
        out = tl.where(z > 0, z, param * em1)
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr, param):
    """d act / dz at z (float32), as PyTorch's backward formulas: leaky_relu and elu take
    the slope side wherever z > 0 is false (NaN included). Not for ReLU, whose gradient is
    its mask (bn_backward.py)."""
    if ACT == ACTIVATION_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF))
        grad = cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == ACTIVATION_GELU_TANH:
        t = _tanh((z + z * z * z * _GELU_KAPPA) * _SQRT_2_OVER_PI)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI \
            * (1.0 + z * z * _GELU_KAPPA * 3.0)
    elif ACT == ACTIVATION_SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        grad = s * (1.0 + z * (1.0 - s))
    elif ACT == ACTIVATION_TANH:
        t = _tanh(z)
        grad = 1.0 - t * t
    elif ACT == ACTIVATION_LEAKY_RELU:
        grad = tl.where(z > 0, 1.0, param)
    else:  # ACTIVATION_ELU
        grad = tl.where(z > 0, 1.0, param * tl.exp(z))
    return grad
