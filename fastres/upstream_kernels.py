"""PyTorch's own kernels where they are known to be wrong, and fastres's routes around them.

fastres never passes on a wrong answer because PyTorch gives it: the eager backend
(fastres/backends/eager.py) and the fused modules' plain-PyTorch stages (fastres/nn/_stage.py)
take these routes, `fastres check` tests the upstream kernels themselves on the user's
machine (fastres/parity.py, `check_upstream`), and benchmarks/upstream_conv1d_wgrad.py is the
reproducer to report them with.

Known today: oneDNN's float32 conv weight gradient on x86 CPUs.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["one_tap_conv1d", "plain_convs_are_routed", "plain_convs_routed",
           "route_weight_grad", "weight_grad_at_risk", "weight_grad_by_columns"]

# oneDNN's float32 conv weight gradient, torch 2.11 and 2.14 (oneDNN 3.x) on x86: wrong,
# unrelated to the true gradient, for some strided convs with wide padding. The reproducer
# (benchmarks/upstream_conv1d_wgrad.py, issue 26): F.conv1d(x, w, stride=2, dilation=8,
# padding=16) with x (2, 3, 64) and w (19, 3, 5) gives a weight gradient 1.1-1.2 away from
# float64 (relative), 1e-7 with oneDNN disabled; its output and input gradient are right.
# Seen on an AMD EPYC Zen 4 and on an Intel Xeon with AVX-512 and AMX, where oneDNN's log
# (ONEDNN_VERBOSE=1) names the kernel: jit:avx512_core, backward_weights. Every wrong case
# seen (about 10k random geometries) had stride >= 2 and a padding of 15 or more; capped
# at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's gemm path) there were none, and bfloat16 was
# right. That failing set is one build's on a few CPUs, so the route is wider: every CPU
# float32 conv at stride >= 2 whose weight needs a gradient while oneDNN is enabled,
# whatever its padding. There the conv runs on oneDNN with the weight detached (its
# output, input and bias gradients are right) and the weight gradient comes from one
# matmul over x's columns (`weight_grad_by_columns`): no convolution kernel, no global
# switch flipped (so other threads' convs are unaffected), and about the cost of oneDNN's
# own weight gradient (benchmarks/NOTES.md, "PyTorch's conv1d weight gradient"). A 1-tap
# conv (the ResNets' downsampling shortcuts) takes no route at all: it runs unstrided on
# every s-th position (`one_tap_conv1d`), which is exact and faster than either.


_ONEDNN_BUILT = torch.backends.mkldnn.is_available()


def weight_grad_at_risk(x: Tensor, weight: Tensor, stride: int) -> bool:
    """Whether this conv's weight gradient takes the route (see above)."""
    if not (stride >= 2 and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.requires_grad and torch.is_grad_enabled() and _ONEDNN_BUILT):
        return False
    # torch.compile does not trace the oneDNN switch (a global read at run time): routed
    # there, which only costs time should a user have turned oneDNN off.
    return torch.compiler.is_compiling() or torch.backends.mkldnn.enabled


def weight_grad_by_columns(grad_y: Tensor, x: Tensor, kernel_size: int, stride: int,
                           dilation: int, pad_left: int, pad_right: int) -> Tensor:
    """The conv weight gradient sum_{b,t} grad_y[b,o,t] * x_padded[b,c,t*s + k*d] as one
    matmul over a strided view of x's columns (im2col), no convolution kernel involved.
    Differentiable, so double backward works too."""
    padded = F.pad(x, [pad_left, pad_right]) if pad_left or pad_right else x
    span = (kernel_size - 1) * dilation + 1
    # (B, C, L_out, K) views: windows of the dilated kernel's span every `stride` steps,
    # every `dilation`-th element of each (unfold, not as_strided: torch.compile traces it)
    columns = padded.unfold(2, span, stride)[:, :, :grad_y.shape[-1], ::dilation]
    return torch.tensordot(grad_y, columns, dims=([0, 2], [0, 2]))


def one_tap_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                   pad_left: int, pad_right: int) -> Tensor:
    """A conv of kernel size 1 at stride s as the same conv at stride 1 on every s-th
    position of the padded x: the same products and sums, and no strided kernel, so its
    weight gradient is oneDNN's unstrided one, outside the risk above. PyTorch's strided
    conv reads every position and its data gradient writes every one; on the ResNets'
    downsampling shortcuts the unstrided conv measured faster, forward and backward
    (benchmarks/NOTES.md, issue 22). The slice's length, ceil(L_padded / s), is the
    strided conv's output length."""
    if pad_left or pad_right:
        x = F.pad(x, [pad_left, pad_right])
    return F.conv1d(x[..., ::stride], weight, bias)


class _WeightGradByColumns(torch.autograd.Function):
    """The identity on a conv's output y that was computed from a detached weight; its
    backward passes grad_y on and gives the weight gradient by weight_grad_by_columns."""

    generate_vmap_rule = True  # (and setup_context: torch.func transforms can run it)

    @staticmethod
    def forward(y, x, weight, stride, dilation, pad_left, pad_right):
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, weight, stride, dilation, pad_left, pad_right = inputs
        ctx.save_for_backward(x)
        ctx.geometry = (weight.shape[-1], stride, dilation, pad_left, pad_right)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_weight = weight_grad_by_columns(grad_y, x, *ctx.geometry)
        return grad_y, None, grad_weight, None, None, None, None


def route_weight_grad(y: Tensor, x: Tensor, weight: Tensor, stride: int, dilation: int,
                      pad_left: int, pad_right: int) -> Tensor:
    """y, a conv of x with weight.detach(), with the weight gradient attached (see above)."""
    return _WeightGradByColumns.apply(y, x, weight, stride, dilation, pad_left, pad_right)


_plain_route = threading.local()


@contextlib.contextmanager
def plain_convs_routed() -> Iterator[None]:
    """Inside the block (this thread), fastres.nn's plain-PyTorch convs (padded_conv1d) take
    the route above too: a fused module running its plain twin's forward enters it, so the
    module is right where PyTorch is not; the twins fastres.unfuse returns never do."""
    previous = getattr(_plain_route, "on", False)
    _plain_route.on = True
    try:
        yield
    finally:
        _plain_route.on = previous


def plain_convs_are_routed() -> bool:
    return getattr(_plain_route, "on", False)
