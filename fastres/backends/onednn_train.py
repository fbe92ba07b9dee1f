"""oneDNN training program: a TemporalBlock's, a TCN's or a 1D ResNet's train step on rows.

What exists, not what runs: `build_or_reason(module)` turns a fused TemporalBlock
(norm="batch"), a TemporalConvNet of them, a TemporalConvNet of pytorch-tcn's blocks
(TCNBlock: batch norm, weight norm or none, ReLU, causal, with or without skip
connections; see _TCNBlock), a BasicBlock or a ResNet1d, in training mode, into a
`TrainProgram` whose call computes the module's forward with autograd attached (gradients
for the input and every parameter) and updates the running statistics as nn.BatchNorm1d
does; the dispatch decides whether it runs. The eval counterpart is
fastres/backends/onednn.py.

How a stage (conv -> BN with batch statistics -> (+ residual) -> ReLU) runs, and why:
- **The conv on oneDNN in channels-last, forward, data and weight gradient.** Activations
  live as (B, L, C) memory from the module's entry to its exit (converted once each way, not
  per stage; not at all for channels-last-strided input, i.e. input_layout="NLC"), seen by
  the conv as (B, C, 1, L) tensors with channels_last strides. `aten.convolution` and
  `aten.convolution_backward` on such tensors run oneDNN's NHWC (brgemm) kernels without
  reordering the activation; NCL conv1d reorders it to oneDNN's blocked layout and back on
  every call (benchmarks/NOTES.md, issue 22). Weights are not prepacked: they change every
  step, and at these widths packing measured no faster (NOTES).
- **Causal padding without a padded copy.** oneDNN pads symmetrically, so the conv runs with
  (K-1)*d zeros on both sides: its first L output rows are the causal output and the
  (K-1)*d rows after them are never read. Backward hands the conv a gradient whose extra rows
  are zero, so the data and weight gradients are exactly those of the causal conv.
- **Batch norm, residual add and ReLU in C++** (csrc/cpu/nlc_bn_train_cpu.cpp): one pass
  reads the conv output for the batch statistics (per-tile mean and M2 in float32, merged in
  float64 as (count, mean, M2)), one writes relu(x-hat * gamma + beta (+ residual)); backward
  is one pass of sums and one that writes the conv's output gradient and the residual's.
  PyTorch's own channels-last CPU batch norm is not used: its backward lost about three
  digits against the float64 reference at 16384 values a channel (NOTES, issue 22).
- Determinism: the batch-norm reductions merge per-tile partials in a fixed order, so they
  do not depend on the thread count; the conv weight gradient is oneDNN's, whose last bits
  do (1e-6 relative between 1 and 2 threads, measured).
- **Two conv layouts** (`conv_layout`): "NLC" as above, or "NCL", where the activations
  live as (B, C, L) from entry to exit instead (converted once each way for (B, L, C)
  data, not at all for NCL data): the conv is ATen's oneDNN entry on them as plain's is
  (oneDNN's blocked kernels), and the batch norm, residual add and ReLU run on its
  (B, C, L) output in place, forward and backward, by the NCL twins of the kernels below
  (the same float64-merged statistics): no transpose between stages, as torch.compile
  runs the plain model. The ResNets default to NCL: their convs have few rows (B * L) and
  up to 512 channels, where the NHWC kernels measured slower than the blocked ones
  (benchmarks/NOTES.md); the temporal blocks default to NLC. `program_for(module,
  conv_layout)` builds the other for the dispatch to time. A TCNBlock network without
  batch norm keeps rows whatever the layout (its convs are not stages).
- **Winograd F(2,3) for the NCL layout's stride-1 3-tap convs** (any dilation, "same" or
  causal padding; csrc/cpu/winograd_cpu.cpp, `winograd_ncl`): two outputs' six products
  become four GEMMs over channels, a third of the multiply-adds gone; the weights are
  transformed once per call (they change every step), in float64 rounded once. Only at
  WINOGRAD_MIN_ROWS rows (B * L) or more: the transform's memory traffic grows with the
  weights, the arithmetic saved with the rows. The forward by default; the data gradient (the
  3-tap conv of grad_y with the flipped, transposed weights: the same transformed weights
  read transposed) on request (`winograd="forward+dgrad"`), as oneDNN's data gradient
  shares its call with the weight gradient, which stays on oneDNN. Non-finite or huge
  values (a transformed input at or above 0.5e38 / the weights' largest row sum of |w|, or
  NaN/inf in input or weights) make the kernel answer ok=False, and the stage runs
  oneDNN's conv instead, whose NaN and inf are torch's.
- **Few rows: the NCL layout's convs as GEMMs** (at GEMM_MAX_ROWS output rows B * L_out or
  fewer, any kernel, stride, dilation): the forward is the (C_out, C_in*K) weights as they
  are times the input's im2col matrix (saved for the weight gradient, grad_y times its
  transpose), the data gradient their transpose times grad_y added back into the input's
  positions. oneDNN reorders the weights at every call (forward, and the backward once more;
  they change every step), which at few rows and many channels is most of the call; the
  GEMMs read them in place. Such a stage keeps its activations channel-major, (C, B, L)
  memory seen as a (B, C, L) tensor: the GEMM's (C_out, B*L) product is the conv output, the
  batch-norm kernels read it as one (1, C, B*L) item, and the next such stage's columns and
  the gradients' GEMMs read their operands without the four transposes per stage that
  (B, C, L) memory costs; a oneDNN stage converts what it reads (`contiguous`). The columns
  and their gradient's col2im are one pass each in C++ (cm_im2col, cm_col2im: no padded
  copy, no zero fill and one add per tap), in Python where the extension predates them.
- **Weights converted once per call**: a (C_out, C_in, K) weight as the channels-last
  (C_out, K, C_in) memory the NHWC conv reads, by the extension's transpose (ATen converted
  it at the forward and again at the backward, with a strided copy of several ms at
  512x512x3), shared by the forward and the backward.
- **Strided convs' weight gradient as one GEMM**, not oneDNN's (wrong for some strided
  geometries: fastres/upstream_kernels.py, benchmarks/upstream_conv1d_wgrad.py): grad_y
  (B*L_out, C_out) transposed times the im2col matrix (B*L_out, K*C_in) of the padded rows
  (in the NCL layout the same product, the columns built as (C_in, K, B, L_out)); the
  forward and the data gradient stay on oneDNN (right there).
- **ResNet pieces around the stages**: the shortcut's 1x1 conv -> BN is a stage without ReLU
  whose output is the second stage's residual; the max pool is ATen's channels-last
  max_pool2d on the (B, C, 1, L) view of the rows (NCL: ATen's max_pool1d, as plain's);
  average pooling and fc are a mean over the positions and F.linear, under autograd.
- Only the conv output is saved per stage (oneDNN's weight gradient reads the conv input,
  which is the previous stage's output, saved anyway); x-hat is recomputed from it.

Dropout after the first stage draws its mask over (B, C, L), as the plain block's
F.dropout does, and reads it through the channels-last view: under the same seed it drops
the same values as the plain block (ATen's CPU dropout is bernoulli_(1-p) then div_(1-p) on
a tensor of the input's shape; tests/backends/test_onednn_train.py checks it against plain).

TCNBlock networks (pytorch-tcn's layout, ReLU after each stage and again after the residual
add): with batch norm each conv -> BN -> ReLU is a stage as above (in the program's conv
layout), its dropout, the residual add, the final ReLU and the skip sum under autograd on the
rows; without, their convs run channels-last as above (`conv_layout` is ignored), with bias,
ReLU, dropout, residual and skip sum under autograd on the rows, relu and dropout one
autograd step (_ReluDropout).

Refused (`build_or_reason` or `unsupported_reason` says why): eval mode (the eval program
runs there), an in-place dropout, norm="weight" TemporalBlocks, TCNBlocks with layer norm,
another activation, gating or "same" padding, "same" padding wider on the right (an even
kernel at stride 1: oneDNN pads symmetrically and the outputs would shift), downsample
modules other than (1x1 conv, BN), inputs that leave one value per channel for some batch
norm, hooks, dtypes other than float32 (oneDNN has no float64 conv; 16-bit training is not
built), autocast, and a missing compiled extension.
"""
from __future__ import annotations

import sys
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _alloc, _ext
from ..conventions import conv_padding, output_length
from . import onednn

__all__ = ["CONV_LAYOUTS", "TrainProgram", "build_or_reason", "default_conv_layout",
           "program_for", "run", "unavailable_reason"]

_aten = torch.ops.aten

# The fewest conv rows (B * L) at which a stride-1 3-tap conv runs as Winograd F(2,3): the
# multiply-adds it saves grow with B * L C_in C_out, the weight transform it adds per step
# (4 C_in C_out floats written, read again by the forward and the data gradient) with
# C_in C_out only, so below some rows per weight the transform's memory traffic costs more
# than the arithmetic saved (benchmarks/NOTES.md, issue 22 section 15).
WINOGRAD_MIN_ROWS = 512

# Which directions of those convs build_or_reason runs as Winograd by default (one of
# WINOGRAD_MODES): the forward only. The data gradient as Winograd measured no faster in the
# step: oneDNN computes it in the same call as the weight gradient, sharing the
# activations' reorders, so on its own it costs little more than the weight gradient alone
# (benchmarks/NOTES.md, issue 22 section 15); "forward+dgrad" builds it for a timer to try.
WINOGRAD_MODES = ("off", "forward", "forward+dgrad")

# The most output rows (B * L_out) at which a conv of the NCL layout runs as GEMMs over
# the weights as they are (forward, data and weight gradient: _gemm_columns,
# _data_grad_gemm, _StageFunction._gemm_forward) instead of oneDNN, whose every call reorders the
# weights (they change every step): at few rows and many channels that reorder is most of
# the call (benchmarks/NOTES.md, issue 22 section 15). Since the route keeps its activations
# channel-major and builds its columns in C++ it measured ahead up to ResNet1d's stem at B4
# L1024 (2048 rows) and far behind at 16384 rows, where the columns (K times the input)
# outgrow the caches (section 17). -1: never.
GEMM_MAX_ROWS = 2048
WINOGRAD = "forward"


def unavailable_reason() -> Optional[str]:
    """Why this program cannot run in this process, or None."""
    reason = onednn.unavailable_reason()
    if reason is not None:
        return reason
    reason = _ext.load_error()
    if reason is not None:
        return reason
    if not hasattr(torch.ops.fastres_ext, "ncl_bn_train_forward") or "relu" not in [
            a.name for a in torch.ops.fastres_ext.nlc_bn_train_forward.default._schema.arguments]:
        return ("the compiled extension predates the training program's batch-norm kernels; "
                "rebuild it")
    return None


class _Refused(Exception):
    """A module (or part) this program does not build, with the reason."""


# ----------------------------------------------------------------------------- layout

def _conv_view(h: Tensor) -> Tensor:
    """(B, L, C) contiguous -> the (B, C, 1, L) channels_last view oneDNN's 2D conv reads."""
    return h.permute(0, 2, 1).unsqueeze(2)


def _rows(t4: Tensor) -> Tensor:
    """(B, C, 1, L) channels_last -> its (B, L, C) view (contiguous)."""
    return t4.squeeze(2).permute(0, 2, 1)


# ----------------------------------------------------------------------------- one stage

class _Geometry:
    """A conv's (kernel size, stride, dilation, left and right zero padding). oneDNN pads
    symmetrically: the conv runs with max(left, right) zeros on both sides, and the stage's
    output is the first `out_length` rows of that conv's output. That holds where the left
    padding is the larger (causal: the extra rows are at the end) or both are equal (the
    ResNet's "same"); a larger right padding ("same" with an even kernel at stride 1) would
    shift the outputs and is refused by the builders."""

    def __init__(self, conv: nn.Conv1d, pad_left: int, pad_right: int, ncl: bool = False):
        self.kernel_size, self.stride = conv.kernel_size[0], conv.stride[0]
        self.dilation = conv.dilation[0]
        self.pad_left, self.pad_right = pad_left, pad_right
        # oneDNN's 2D (padding, stride, dilation) on the (B, C, 1, L) view, built once
        self.padding = [0, max(pad_left, pad_right)]
        self.strides = [1, self.stride]
        self.dilations = [1, self.dilation]
        # the activations' layout: (B, L, C) rows (oneDNN's NHWC brgemm reads them in place)
        # or (B, C, L) (its blocked NCL kernels)
        self.ncl = ncl
        if pad_right > pad_left:
            raise _Refused(f"a conv padded more on the right ({pad_left}, {pad_right}) than "
                           "on the left")
        # the forward conv and its data gradient as Winograd F(2,3) (see the module
        # docstring); set by build_or_reason where winograd_reason() is None
        self.winograd = False
        self.winograd_dgrad = False
        self.winograd_min_rows = WINOGRAD_MIN_ROWS
        # the conv and its gradients as GEMMs at this many output rows or fewer (NCL only)
        self.gemm_max_rows = GEMM_MAX_ROWS if ncl else -1

    def winograd_reason(self) -> Optional[str]:
        """Why this conv cannot run as Winograd F(2,3) in the program, or None."""
        if not self.ncl:
            return "the Winograd training kernels are built for the NCL conv layout"
        if self.kernel_size != 3 or self.stride != 1:
            return f"kernel {self.kernel_size} stride {self.stride}: F(2,3) is for k3 stride 1"
        # the data gradient is the conv of grad_y padded 2d - P on the left
        if self.padding[1] > 2 * self.dilation:
            return f"padding {self.padding[1]} beyond twice the dilation {self.dilation}"
        if not hasattr(torch.ops.fastres_ext, "winograd_ncl"):
            return "the compiled extension predates the Winograd training kernel; rebuild it"
        return None

    def conv_length(self, length: int) -> int:
        """The length of oneDNN's output (symmetric padding), which the stage's conv output
        has on oneDNN and Winograd; the few-rows GEMM route pads as the conv does and its
        output has out_length."""
        return output_length(length, self.kernel_size, self.dilation, self.stride,
                             self.padding[1], self.padding[1])

    def out_length(self, length: int) -> int:
        return output_length(length, self.kernel_size, self.dilation, self.stride,
                             self.pad_left, self.pad_right)


def _transpose_last2(t: Tensor) -> Tensor:
    """(N, A, B) contiguous -> (N, B, A) contiguous, by the extension's L1-blocked loop (ATen's
    copy of this permutation runs a strided element-wise loop, several times slower)."""
    out = _alloc.empty((t.shape[0], t.shape[2], t.shape[1]), dtype=t.dtype, device=t.device)
    torch.ops.fastres_ext.nlc_transpose_last2(t, out)
    return out


class _Transposed(torch.autograd.Function):
    """(N, A, B) -> (N, B, A) contiguous, and the same for its gradient: the module's entry
    and exit conversions between NCL and rows, by the extension's tiled transpose (ATen's
    strided copy of these took about twice as long alone, benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, t):
        return _transpose_last2(t.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return _transpose_last2(grad.contiguous())


def _channels_last_weight(weight: Tensor) -> Tensor:
    """A (C_out, C_in, K) weight as the (C_out, C_in, 1, K) channels_last tensor oneDNN's
    NHWC conv reads: (C_out, K, C_in) memory. ATen would convert it at every forward and
    backward call; here it is converted once per step and shared by both."""
    if weight.shape[2] == 1:  # 1x1: the two layouts are the same memory
        return weight.unsqueeze(2)
    return _transpose_last2(weight.detach().contiguous()).permute(0, 2, 1).unsqueeze(2)


def _weight_from_channels_last(grad_w4: Tensor) -> Tensor:
    """oneDNN's channels_last (C_out, C_in, 1, K) weight gradient -> (C_out, C_in, K)."""
    grad_w = grad_w4.squeeze(2)
    if grad_w.shape[2] == 1 or grad_w.is_contiguous():
        return grad_w.contiguous()
    rows = grad_w.permute(0, 2, 1)  # (C_out, K, C_in)
    return _transpose_last2(rows) if rows.is_contiguous() else grad_w.contiguous()


def _weight_grad_by_rows(grad_y: Tensor, h: Tensor, geo: _Geometry) -> Tensor:
    """The weight gradient sum_{b,t} grad_y[b,t,o] * h_padded[b, t*s + k*d, c] of a conv on
    (B, L, C) rows, as one GEMM: grad_y (B*L_out, C_out) transposed times the im2col matrix
    (B*L_out, K*C_in) of h's windows, whose rows of C_in stay contiguous (copied tap by
    tap). No convolution kernel: oneDNN's strided weight gradient is wrong for some
    geometries (fastres/upstream_kernels.py)."""
    batch, l_out, c_out = grad_y.shape
    k, s, d = geo.kernel_size, geo.stride, geo.dilation
    need = (l_out - 1) * s + (k - 1) * d + 1  # padded rows the windows read
    right = max(0, need - geo.pad_left - h.shape[1])
    padded = F.pad(h, [0, 0, geo.pad_left, right]) if geo.pad_left or right else h
    # (B, L_out, K, C_in): tap j reads rows j*d, j*d + s, ...
    columns = torch.stack([padded[:, j * d: j * d + (l_out - 1) * s + 1: s] for j in range(k)],
                          dim=2)
    grad_w = torch.mm(grad_y.reshape(batch * l_out, c_out).t(),
                      columns.view(batch * l_out, k * h.shape[2]))  # (C_out, K*C_in)
    if k == 1:
        return grad_w.view(c_out, h.shape[2], 1)
    return _transpose_last2(grad_w.view(c_out, k, h.shape[2]))


def _weight_grad_ncl(grad_y: Tensor, h: Tensor, geo: _Geometry) -> Tensor:
    """_weight_grad_by_rows on (B, C, L) activations: grad_y (C_out, B*L_out) (one copy of
    the gradient's transpose) times the im2col matrix (B*L_out, C_in*K) of h's windows, built
    as (C_in, K, B, L_out) from strided views of the padded input, so the product is the
    (C_out, C_in, K) gradient itself."""
    batch, c_out, l_out = grad_y.shape
    k, s, d = geo.kernel_size, geo.stride, geo.dilation
    need = (l_out - 1) * s + (k - 1) * d + 1
    right = max(0, need - geo.pad_left - h.shape[2])
    padded = F.pad(h, [geo.pad_left, right]) if geo.pad_left or right else h
    per_channel = padded.transpose(0, 1)  # (C_in, B, L_padded) view
    columns = torch.stack([per_channel[:, :, j * d: j * d + (l_out - 1) * s + 1: s]
                           for j in range(k)], dim=1)  # (C_in, K, B, L_out)
    grad_w = torch.mm(grad_y.transpose(0, 1).reshape(c_out, batch * l_out),
                      columns.view(h.shape[1] * k, batch * l_out).t())
    return grad_w.view(c_out, h.shape[1], k)


def _cm_kernels() -> bool:
    """Whether the extension has the channel-major im2col and col2im loops
    (csrc/cpu/nlc_bn_train_cpu.cpp); an older build runs their Python equivalents below."""
    return _CM_KERNELS and hasattr(torch.ops.fastres_ext, "cm_col2im")


# False: the Python im2col and col2im even where the extension has the loops (for tests)
_CM_KERNELS = True


def _gemm_columns(h_cm: Tensor, geo: _Geometry, l_out: int) -> Tensor:
    """The im2col matrix of a conv of the few-rows route, as (C_in, K, B, L_out) contiguous
    (viewed (C_in*K, B*L_out): the product with the (C_out, C_in*K) weights is the conv),
    from channel-major (C_in, B, L) activations padded by the conv's true padding (so
    L_out is the stage's output length, no rows to crop)."""
    k, s, d, left = geo.kernel_size, geo.stride, geo.dilation, geo.pad_left
    if _cm_kernels():  # one pass, the padding never copied
        cols = _alloc.empty((h_cm.shape[0], k, h_cm.shape[1], l_out), dtype=h_cm.dtype,
                            device=h_cm.device)
        torch.ops.fastres_ext.cm_im2col(h_cm, k, s, d, left, cols)
        return cols
    need = (l_out - 1) * s + (k - 1) * d + 1  # padded positions the windows read
    right = max(0, need - left - h_cm.shape[2])
    padded = F.pad(h_cm, [left, right]) if left or right else h_cm
    if k == 1 and s == 1:
        return padded[:, None, :, :l_out].contiguous()
    return torch.stack([padded[:, :, j * d: j * d + (l_out - 1) * s + 1: s]
                        for j in range(k)], dim=1)


def _data_grad_gemm(grad_y2: Tensor, weight: Tensor, geo: _Geometry, batch: int,
                    l_out: int, length: int) -> Tensor:
    """The data gradient of a few-rows conv, channel-major: the (C_in*K, C_out) weights
    transposed times grad_y (C_out, B*L_out), each tap's columns added back into the input
    positions it read (col2im), as (C_in, B, length) contiguous. A tap that read every
    position once (stride 1, the "same" conv's middle tap) is copied instead of added to
    zeros."""
    c_out, c_in, k = weight.shape[0], weight.shape[1], geo.kernel_size
    s, d, left = geo.stride, geo.dilation, geo.pad_left
    gcols = torch.mm(weight.reshape(c_out, c_in * k).t(), grad_y2).view(c_in, k, batch, l_out)
    if _cm_kernels():  # one pass over the gradient
        grad_h = _alloc.empty((c_in, batch, length), dtype=grad_y2.dtype, device=grad_y2.device)
        torch.ops.fastres_ext.cm_col2im(gcols, s, d, left, grad_h)
        return grad_h
    spans = []  # (tap, first and last+1 output read, first input position)
    for j in range(k):
        offset = j * d - left  # output t read input position t * s + offset
        first = max(0, (s - 1 - offset) // s)
        last = min(l_out, (length - 1 - offset) // s + 1)
        if last > first:
            spans.append((j, first, last, first * s + offset))
    whole = next((span for span in spans if s == 1 and span[3] == 0
                  and span[2] - span[1] == length), None)
    if whole is not None:
        grad_h = gcols[:, whole[0], :, whole[1]:whole[2]].contiguous()
    else:
        grad_h = torch.zeros((c_in, batch, length), dtype=grad_y2.dtype,
                             device=grad_y2.device)
    for span in spans:
        if span is whole:
            continue
        j, first, last, start = span
        grad_h[:, :, start: start + (last - first - 1) * s + 1: s] += gcols[:, j, :, first:last]
    return grad_h


class _StageFunction(torch.autograd.Function):
    """act(BN_batch(conv(h)) (+ residual)), act ReLU or none; BN's running statistics
    updated in place. h: (B, L, C_in) contiguous, residual and the output (B, L_out, C_out)
    contiguous; or with geo.ncl, (B, C_in, L) and (B, C_out, L_out), the conv's output read
    in place by the NCL batch-norm kernels (on the few-rows route: any strides in, the
    output a channel-major view, see _gemm_forward)."""

    @staticmethod
    def forward(ctx, h, weight, bias, gamma, beta, residual, geo, relu, running_mean,
                running_var, eps, momentum_factor):
        # oneDNN's own entry, not aten.convolution: ATen sends small batch-1 dilated convs to
        # its im2col path (slow_conv_dilated2d), which measured slower here at B1 L256
        ctx.winograd = None
        ctx.gemm = geo.ncl and h.shape[0] * geo.out_length(h.shape[2]) <= geo.gemm_max_rows
        ctx.geo, ctx.relu = geo, relu
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        if ctx.gemm:
            return _StageFunction._gemm_forward(ctx, h, weight, bias, gamma, beta, residual,
                                                geo, relu, running_mean, running_var, eps,
                                                momentum_factor)
        if geo.ncl:
            h = h.contiguous()  # a few-rows stage's channel-major output, read by oneDNN
            w4 = weight.detach().unsqueeze(2)
            y = None
            if geo.winograd and h.shape[0] * h.shape[2] >= geo.winograd_min_rows:
                # one weight transform per step, shared by the forward and the data gradient;
                # ok is False for non-finite or overflowing values: oneDNN's conv then
                v, gain, gain_t = torch.ops.fastres_ext.winograd_weights_ncl(weight.detach())
                y, ok = torch.ops.fastres_ext.winograd_ncl(
                    h, v, None if bias is None else bias.detach(), geo.dilation,
                    geo.padding[1], geo.conv_length(h.shape[2]), False, gain)
                ctx.winograd = v, gain_t
                if not ok:
                    y = None
            if y is None:
                y = torch.ops.mkldnn._convolution_pointwise(
                    h.unsqueeze(2), w4, bias, geo.padding, geo.strides, geo.dilations, 1,
                    "none", [], "").squeeze(2)
                if not y.is_contiguous():  # oneDNN answered in another layout: one copy
                    y = y.contiguous()
        else:
            w4 = _channels_last_weight(weight)
            y4 = torch.ops.mkldnn._convolution_pointwise(
                _conv_view(h), w4, bias, geo.padding, geo.strides, geo.dilations, 1, "none",
                [], "")
            y = _rows(y4)
            if not y.is_contiguous():  # oneDNN answered in another layout: one copy
                y = y.contiguous()
        batch, c_out = h.shape[0], weight.shape[0]
        length = geo.out_length(h.shape[2 if geo.ncl else 1])
        out = _alloc.empty((batch, c_out, length) if geo.ncl else (batch, length, c_out),
                           dtype=h.dtype, device=h.device)
        mean = _alloc.empty((c_out,), dtype=torch.float32, device=h.device)
        invstd = _alloc.empty((c_out,), dtype=torch.float32, device=h.device)
        bn_forward = torch.ops.fastres_ext.ncl_bn_train_forward if geo.ncl \
            else torch.ops.fastres_ext.nlc_bn_train_forward
        bn_forward(y, length, gamma, beta, running_mean, running_var, eps, momentum_factor,
                   None if residual is None else residual.contiguous(), out, mean, invstd, relu)
        ctx.save_for_backward(h, w4, gamma, y, out, mean, invstd)
        return out

    @staticmethod
    def _gemm_forward(ctx, h, weight, bias, gamma, beta, residual, geo, relu, running_mean,
                      running_var, eps, momentum_factor):
        """The few-rows route (see GEMM_MAX_ROWS), channel-major: the activations as
        (C, B, L) memory, returned as its (B, C, L)-shaped view, so that the GEMM's
        (C_out, B*L_out) product is the conv output without a transpose, the batch-norm
        kernels read it as one (1, C_out, B*L_out) item (the same statistics: every value of
        a channel), and the next few-rows stage's columns and the gradients' GEMMs read
        their operands in place. The columns are saved for the weight gradient (K times
        the input's values, at few rows)."""
        batch, c_out = h.shape[0], weight.shape[0]
        length = geo.out_length(h.shape[2])
        n = batch * length
        cols = _gemm_columns(h.transpose(0, 1).contiguous(), geo, length)
        w2 = weight.detach().reshape(c_out, -1)
        cols2 = cols.view(w2.shape[1], n)
        y = torch.mm(w2, cols2) if bias is None \
            else torch.addmm(bias.detach()[:, None], w2, cols2)  # (C_out, B*L_out)
        out = _alloc.empty((c_out, batch, length), dtype=h.dtype, device=h.device)
        mean = _alloc.empty((c_out,), dtype=torch.float32, device=h.device)
        invstd = _alloc.empty((c_out,), dtype=torch.float32, device=h.device)
        res = None if residual is None else \
            residual.transpose(0, 1).contiguous().view(1, c_out, n)
        torch.ops.fastres_ext.ncl_bn_train_forward(
            y.view(1, c_out, n), n, gamma, beta, running_mean, running_var, eps,
            momentum_factor, res, out.view(1, c_out, n), mean, invstd, relu)
        ctx.save_for_backward(cols, weight.detach(), gamma, y, out, mean, invstd)
        ctx.in_length = h.shape[2]
        return out.transpose(0, 1)

    @staticmethod
    def _gemm_backward(ctx, grad_out):
        cols, weight, gamma, y, out, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        c_out, batch, length = out.shape
        n = batch * length
        grad_y = _alloc.empty((c_out, n), dtype=y.dtype, device=y.device)
        grad_gamma = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_beta = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_res = _alloc.empty((c_out, batch, length), dtype=out.dtype, device=out.device) \
            if ctx.has_residual and need[5] else None
        torch.ops.fastres_ext.ncl_bn_train_backward(
            grad_out.transpose(0, 1).contiguous().view(1, c_out, n), out.view(1, c_out, n),
            y.view(1, c_out, n), mean, invstd, gamma, grad_y.view(1, c_out, n), grad_gamma,
            grad_beta, None if grad_res is None else grad_res.view(1, c_out, n), ctx.relu)
        grad_h = grad_w = grad_b = None
        if need[0]:
            grad_h = _data_grad_gemm(grad_y, weight, ctx.geo, batch, length,
                                     ctx.in_length).transpose(0, 1)
        if need[1]:
            grad_w = torch.mm(grad_y, cols.view(-1, n).t()).view(weight.shape)
        if need[2] and ctx.has_bias:
            grad_b = grad_y.sum(1)
        return (grad_h, grad_w, grad_b, grad_gamma if need[3] else None,
                grad_beta if need[4] else None,
                None if grad_res is None else grad_res.transpose(0, 1),
                None, None, None, None, None, None)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.gemm:  # every gradient by GEMMs (see GEMM_MAX_ROWS)
            return _StageFunction._gemm_backward(ctx, grad_out)
        h, w4, gamma, y, out, mean, invstd = ctx.saved_tensors
        geo = ctx.geo
        need = ctx.needs_input_grad
        c_out = w4.shape[0]
        grad_y = _alloc.empty(tuple(y.shape), dtype=y.dtype, device=y.device)
        grad_gamma = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_beta = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_res = _alloc.empty(tuple(out.shape), dtype=out.dtype, device=out.device) \
            if ctx.has_residual and need[5] else None
        bn_backward = torch.ops.fastres_ext.ncl_bn_train_backward if geo.ncl \
            else torch.ops.fastres_ext.nlc_bn_train_backward
        bn_backward(grad_out.contiguous(), out, y, mean, invstd, gamma, grad_y, grad_gamma,
                    grad_beta, grad_res, ctx.relu)
        grad_h = grad_w = grad_b = None
        if need[0] and ctx.winograd is not None and geo.winograd_dgrad:
            v, gain_t = ctx.winograd
            grad_h, ok = torch.ops.fastres_ext.winograd_ncl(
                grad_y, v, None, geo.dilation, 2 * geo.dilation - geo.padding[1], h.shape[2],
                True, gain_t)
            if not ok:  # non-finite or overflowing: oneDNN's data gradient
                grad_h = None
        # oneDNN's weight gradient only at stride 1; strided: the GEMM (see above)
        onednn_w = need[1] and geo.stride == 1
        need_h = need[0] and grad_h is None
        if need_h or onednn_w or (need[2] and ctx.has_bias):
            ncl = geo.ncl
            grad_h4, grad_w, grad_b = _aten.convolution_backward(
                grad_y.unsqueeze(2) if ncl else _conv_view(grad_y),
                h.unsqueeze(2) if ncl else _conv_view(h), w4,
                [c_out] if ctx.has_bias else None, geo.strides, geo.padding, geo.dilations,
                False, [0, 0], 1,
                [need_h, onednn_w, need[2] and ctx.has_bias])
            if grad_h4 is not None:
                grad_h = grad_h4.squeeze(2).contiguous() if ncl else _rows(grad_h4)
            if grad_w is not None:
                grad_w = grad_w.squeeze(2).contiguous() if ncl \
                    else _weight_from_channels_last(grad_w)
        if need[1] and not onednn_w:
            grad_w = _weight_grad_ncl(grad_y[:, :, :out.shape[2]], h, geo) if geo.ncl \
                else _weight_grad_by_rows(grad_y[:, :out.shape[1]], h, geo)
        return (grad_h, grad_w, grad_b, grad_gamma if need[3] else None,
                grad_beta if need[4] else None, grad_res, None, None, None, None, None, None)


class _Stage:
    """One conv -> BatchNorm1d (training) (-> ReLU) stage, read from the module at each call
    (the parameters change every step)."""

    def __init__(self, conv: nn.Conv1d, bn: nn.BatchNorm1d, pad_left: int, pad_right: int,
                 relu: bool = True, name: str = "conv", ncl: bool = False):
        if type(conv) is not nn.Conv1d or conv.groups != 1 or conv.padding_mode != "zeros":
            raise _Refused(f"{name} is not a plain nn.Conv1d (groups=1, zero padding)")
        if type(bn) is not nn.BatchNorm1d:
            raise _Refused(f"{name}'s norm is a {type(bn).__name__}, not nn.BatchNorm1d")
        if bn.num_features != conv.out_channels:
            raise _Refused(f"{name}'s BatchNorm1d has {bn.num_features} features for "
                           f"{conv.out_channels} channels")
        if bn.running_mean is not None and bn.running_mean.dtype != torch.float32:
            raise _Refused(f"{name}'s running statistics are not float32")
        self.conv, self.bn, self.relu = conv, bn, relu
        self.geo = _Geometry(conv, pad_left, pad_right, ncl)

    def out_length(self, length: int) -> int:
        return self.geo.out_length(length)

    def __call__(self, h: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # read through the modules' dicts, not nn.Module.__getattr__ (a ResNet1d step read
        # about 180 names through it: 0.15 ms under cProfile)
        bn = self.bn
        buffers, bn_params = bn._buffers, bn._parameters
        conv_params = self.conv._parameters
        factor = 0.0
        count = buffers.get("num_batches_tracked")
        if bn.track_running_stats and count is not None:
            count.add_(1)  # an integer buffer: nothing for autograd to record
            factor = 1.0 / float(count) if bn.momentum is None else bn.momentum
        running_mean = buffers.get("running_mean")
        tracked = bn.track_running_stats and running_mean is not None
        return _StageFunction.apply(
            h, conv_params["weight"], conv_params.get("bias"), bn_params.get("weight"),
            bn_params.get("bias"), residual, self.geo, self.relu,
            running_mean if tracked else None, buffers.get("running_var") if tracked else None,
            bn.eps, factor)


def _causal_stage(conv: nn.Conv1d, bn: nn.BatchNorm1d, name: str, ncl: bool) -> _Stage:
    """A TemporalBlock's stage: stride 1, causal padding."""
    if conv.stride != (1,):
        raise _Refused(f"{name} is not a stride-1 conv")
    return _Stage(conv, bn, (conv.kernel_size[0] - 1) * conv.dilation[0], 0, name=name,
                  ncl=ncl)


class _Block:
    """TemporalBlock(norm="batch"): relu(stage2(relu(stage1(x))) + shortcut(x))."""

    def __init__(self, block: nn.Module, ncl: bool):
        if block.norm != "batch":
            raise _Refused(f"a TemporalBlock with norm={block.norm!r}; norm='batch' is built")
        down = block.downsample
        if down is not None and (type(down) is not nn.Conv1d or down.kernel_size != (1,)
                                 or down.stride != (1,) or down.groups != 1
                                 or down.padding != (0,)):
            raise _Refused("the downsample is not a 1x1 nn.Conv1d")
        self.block, self.ncl = block, ncl
        self.first = _causal_stage(block.conv1, block.bn1, "conv1", ncl)
        self.second = _causal_stage(block.conv2, block.bn2, "conv2", ncl)
        self.in_channels = block.conv1.in_channels

    def out_length(self, length: int) -> int:
        return length

    def min_rows(self, batch: int, length: int) -> int:
        return batch * length

    def dropout_reason(self) -> Optional[str]:
        d = self.block.dropout
        if d.training and d.p > 0 and d.inplace:
            return "an in-place dropout (the plain block overwrites the first stage's output)"
        return None

    def __call__(self, h: Tensor) -> Tensor:
        down = self.block.downsample
        res = h if down is None else _conv_rows(down, h, 0, self.ncl)
        mid = _dropout_rows(self.block.dropout, self.first(h), self.ncl)
        return self.second(mid, res.contiguous())


def _dropout_rows(dropout: nn.Dropout, rows: Tensor, ncl: bool = False) -> Tensor:
    """`dropout` on (B, L, C) rows (ncl: (B, C, L) activations) with the mask the plain
    module draws over (B, C, L) (see the module docstring), under autograd."""
    if not dropout.training or dropout.p == 0:
        return rows
    if dropout.p == 1:
        return rows * 0.0
    if ncl:
        batch, channels, length = rows.shape
    else:
        batch, length, channels = rows.shape
    mask = torch.empty((batch, channels, length), dtype=rows.dtype, device=rows.device)
    mask.bernoulli_(1 - dropout.p).div_(1 - dropout.p)
    return rows * mask if ncl else (rows * mask.transpose(1, 2)).contiguous()


def _conv_rows(conv: nn.Conv1d, h: Tensor, left: int, ncl: bool = False) -> Tensor:
    """conv(h) on (B, L, C) rows under autograd, padded `left` zeros on the left (causal);
    ncl: a 1x1 conv (left 0) on (B, C, L) activations, ATen's conv1d as plain runs it.
    oneDNN's NHWC conv pads symmetrically: where the padding is small against L it runs so
    and keeps the first L output rows (a view), otherwise it runs on a left-padded copy of
    the rows, which costs one copy instead of the conv's work on `left` unused rows (at
    L = 512, K = 4: the former faster at dilation 1 and 8, the latter at 32;
    benchmarks/NOTES.md)."""
    if ncl:
        assert left == 0 and conv.kernel_size == (1,)
        return F.conv1d(h, conv.weight, conv.bias)
    weight = conv.weight.unsqueeze(2)
    if left * _PAD_COPY_RATIO > h.shape[1]:
        return _rows(F.conv2d(_conv_view(F.pad(h, [0, 0, left, 0])), weight, conv.bias, 1,
                              0, (1, conv.dilation[0])))
    y = _rows(F.conv2d(_conv_view(h), weight, conv.bias, 1, (0, left),
                       (1, conv.dilation[0])))
    return y[:, :h.shape[1]] if left else y


# A conv padded by more than 1/_PAD_COPY_RATIO of its rows runs on a padded copy.
_PAD_COPY_RATIO = 8


class _ReluDropout(torch.autograd.Function):
    """dropout(relu(z)) on (B, L, C) rows, given the dropout's (B, C, L) mask of 0 and
    `scale` read transposed: the output is saved, and relu's and dropout's gradient are
    one: grad * scale where the output is positive (the mask is 0 or scale >= 1, so the
    output is positive exactly where z is and the mask keeps it), the values plain's
    grad * mask, then relu's zeros, give."""

    @staticmethod
    def forward(ctx, z, mask_t, scale):
        out = torch.relu(z).mul_(mask_t)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        return _aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None, None


def _relu_dropout_rows(dropout: nn.Dropout, z: Tensor) -> Tensor:
    """dropout(relu(z)) on (B, L, C) rows, the mask drawn as the plain module draws it."""
    if not dropout.training or dropout.p == 0:
        return F.relu(z)
    if dropout.p == 1:
        return F.relu(z) * 0.0
    batch, length, channels = z.shape
    mask = torch.empty((batch, channels, length), dtype=z.dtype, device=z.device)
    scale = 1 / (1 - dropout.p)
    mask.bernoulli_(1 - dropout.p).div_(1 - dropout.p)
    return _ReluDropout.apply(z, mask.transpose(1, 2), scale)


class _TCNBlock:
    """fastres's TCNBlock (pytorch-tcn's layout) with norm "batch", "weight" or None, ReLU
    everywhere, causal, no gate: (relu(out + res), out) with
    out = dropout2(relu(norm2(conv2(dropout1(relu(norm1(conv1(h)))))))), res = h or
    downsample(h), the norms batch norm or none. With batch norm a stage is the program's
    _Stage (conv -> BN with batch statistics -> ReLU, running statistics updated); its
    ReLU comes before the residual add here (pytorch-tcn's order), so the add and the final
    ReLU stay under autograd on the rows. Without batch norm a stage is a conv, its bias
    and ReLU, all under autograd on the rows (weight-normed convs: `conv.weight` is the
    parametrization's weight, read once per call, so gradients reach g and v); the dropouts
    draw in the plain block's order."""

    def __init__(self, block: nn.Module, ncl: bool):
        if block.norm not in ("batch", "weight", None):
            raise _Refused(f"a TCNBlock with norm={block.norm!r}; 'batch', 'weight' and None "
                           "are built")
        if not block.causal or block.gate:
            raise _Refused("a TCNBlock that is not causal, or gated")
        for name in ("activation1", "activation2", "activation_final"):
            if type(getattr(block, name)) is not nn.ReLU:
                raise _Refused(f"{name} is a {type(getattr(block, name)).__name__}, not "
                               "nn.ReLU")
        for name in ("conv1", "conv2", "downsample"):
            conv = getattr(block, name)
            if conv is None:
                continue
            if not isinstance(conv, nn.Conv1d) or conv.groups != 1 or conv.stride != (1,) \
                    or conv.padding_mode != "zeros":
                raise _Refused(f"{name} is not a stride-1 nn.Conv1d (groups=1, zero padding)")
        if block.downsample is not None and (block.downsample.kernel_size != (1,)
                                             or block.downsample.padding != (0,)):
            raise _Refused("the downsample is not a 1x1 nn.Conv1d")
        self.block, self.ncl = block, ncl and block.norm == "batch"
        self.in_channels = block.conv1.in_channels
        self.stages = None
        if block.norm == "batch":
            self.stages = (_causal_stage(block.conv1, block.norm1, "conv1", self.ncl),
                           _causal_stage(block.conv2, block.norm2, "conv2", self.ncl))

    def min_rows(self, batch: int, length: int) -> int:
        return batch * length if self.stages is not None else sys.maxsize

    def dropout_reason(self) -> Optional[str]:
        for d in (self.block.dropout1, self.block.dropout2):
            if d.training and d.p > 0 and d.inplace:
                return "an in-place dropout"
        return None

    def __call__(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        b = self.block
        res = h if b.downsample is None else _conv_rows(b.downsample, h, 0, self.ncl)
        if self.stages is not None:
            first, second = self.stages
            out = _dropout_rows(b.dropout2, second(_dropout_rows(b.dropout1, first(h),
                                                                 self.ncl)), self.ncl)
            return F.relu(out + res), out
        k1, d1 = b.conv1.kernel_size[0], b.conv1.dilation[0]
        k2, d2 = b.conv2.kernel_size[0], b.conv2.dilation[0]
        mid = _relu_dropout_rows(b.dropout1, _conv_rows(b.conv1, h, (k1 - 1) * d1))
        out = _relu_dropout_rows(b.dropout2, _conv_rows(b.conv2, mid, (k2 - 1) * d2))
        return F.relu(out + res), out


class _TCNBlockNetwork:
    """A TemporalConvNet of such TCNBlocks, with or without pytorch-tcn's skip
    connections: relu(sum of every level's out (1x1-projected where its width differs)
    but the last's, plus the last level's output), summed as the plain network sums."""

    def __init__(self, model: nn.Module, ncl: bool):
        for i, block in enumerate(model.network):
            if type(block).__name__ != "TCNBlock" or \
                    not type(block).__module__.startswith("fastres.nn."):
                raise _Refused(f"network[{i}] is a {type(block).__name__}, not a TCNBlock")
        # (B, C, L) activations only where every conv is a batch-norm stage's
        self.ncl = ncl and all(block.norm == "batch" for block in model.network)
        self.blocks = [_TCNBlock(block, self.ncl) for block in model.network]
        self.model = model
        if model.skip_connections:
            if type(model.activation_skip_out) is not nn.ReLU:
                raise _Refused("the skip connections' activation is not nn.ReLU")
            for conv in model.downsample_skip_connection:
                if conv is not None and (type(conv) is not nn.Conv1d or conv.kernel_size != (1,)
                                         or conv.stride != (1,) or conv.padding != (0,)
                                         or conv.groups != 1):
                    raise _Refused("a skip projection is not a 1x1 nn.Conv1d")
        self.in_channels = self.blocks[0].in_channels

    def out_length(self, length: int) -> int:
        return length

    def min_rows(self, batch: int, length: int) -> int:
        return min(block.min_rows(batch, length) for block in self.blocks)

    def dropout_reason(self) -> Optional[str]:
        for block in self.blocks:
            reason = block.dropout_reason()
            if reason is not None:
                return reason
        return None

    def __call__(self, h: Tensor) -> Tensor:
        if not self.model.skip_connections:
            for block in self.blocks:
                h, _ = block(h)
            return h
        skips = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h, out = block(h)
            if i < last:
                projection = self.model.downsample_skip_connection[i]
                skips.append(out if projection is None
                             else _conv_rows(projection, out, 0, self.ncl))
        return F.relu(torch.stack(skips + [h]).sum(0))


class _BasicBlock:
    """fastres.BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the
    shortcut x or downsample = 1x1 conv (stride s) -> BN, itself a stage without ReLU."""

    def __init__(self, block: nn.Module, ncl: bool):
        k, d = block.conv1.kernel_size[0], block.conv1.dilation[0]
        mode = "causal" if block.causal else "same"
        if block.conv2.stride != (1,):
            raise _Refused("conv2 is strided")
        self.first = _Stage(block.conv1, block.bn1,
                            *conv_padding(k, d, block.conv1.stride[0], mode), name="conv1",
                            ncl=ncl)
        k2, d2 = block.conv2.kernel_size[0], block.conv2.dilation[0]
        self.second = _Stage(block.conv2, block.bn2, *conv_padding(k2, d2, 1, mode),
                             name="conv2", ncl=ncl)
        down = block.downsample
        self.shortcut = None
        if down is not None:
            if not (type(down) is nn.Sequential and len(down) == 2
                    and type(down[0]) is nn.Conv1d and down[0].kernel_size == (1,)
                    and down[0].padding == (0,) and down[0].dilation == (1,)):
                raise _Refused("the downsample is not nn.Sequential(1x1 nn.Conv1d, "
                               "nn.BatchNorm1d)")
            self.shortcut = _Stage(down[0], down[1], 0, 0, relu=False, name="downsample.0",
                                   ncl=ncl)
            if down[0].stride != block.conv1.stride:
                raise _Refused("the downsample's stride is not conv1's")
        self.in_channels, self.ncl = block.conv1.in_channels, ncl

    def out_length(self, length: int) -> int:
        return self.second.out_length(self.first.out_length(length))

    def min_rows(self, batch: int, length: int) -> int:
        return batch * self.out_length(length)

    def dropout_reason(self) -> Optional[str]:
        return None

    def __call__(self, h: Tensor) -> Tensor:
        res = h if self.shortcut is None else self.shortcut(h)
        mid = self.first(h)
        return self.second(mid, res)


class _MaxPool:
    """nn.MaxPool1d on (B, L, C) rows: ATen's channels-last max_pool2d on the (B, C, 1, L)
    view (its forward and backward read the rows in place), under autograd; on (B, C, L)
    activations (ncl) ATen's max_pool1d, as plain runs it."""

    def __init__(self, pool: nn.MaxPool1d, ncl: bool):
        k, s, p, d = (v[0] if isinstance(v, tuple) else v for v in (
            pool.kernel_size, pool.stride, pool.padding, pool.dilation))
        if pool.return_indices:
            raise _Refused("the max pool returns indices")
        self.args = ((1, k), (1, s), (0, p), (1, d), pool.ceil_mode)
        self.kernel_size, self.stride, self.padding, self.dilation = k, s, p, d
        self.ceil_mode, self.ncl = pool.ceil_mode, ncl

    def out_length(self, length: int) -> int:
        span = self.dilation * (self.kernel_size - 1) + 1
        num = length + 2 * self.padding - span
        n = (-(-num // self.stride) if self.ceil_mode else num // self.stride) + 1
        if self.ceil_mode and (n - 1) * self.stride >= length + self.padding:
            n -= 1
        return n

    def __call__(self, h: Tensor) -> Tensor:
        if self.ncl:
            return F.max_pool1d(h, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        out = _rows(F.max_pool2d(_conv_view(h), *self.args))
        return out if out.is_contiguous() else out.contiguous()


class _ResNet:
    """fastres.ResNet1d: stem stage -> max pool -> the BasicBlocks -> mean over L -> fc."""

    def __init__(self, model: nn.Module, ncl: bool):
        k, s = model.conv1.kernel_size[0], model.conv1.stride[0]
        self.ncl = ncl
        self.stem = _Stage(model.conv1, model.bn1,
                           *conv_padding(k, model.conv1.dilation[0], s,
                                         "causal" if model.causal else "same"), name="conv1",
                           ncl=ncl)
        if type(model.maxpool) is nn.MaxPool1d:
            self.pool = _MaxPool(model.maxpool, ncl)
        elif type(model.maxpool) is nn.Identity:
            self.pool = None
        else:
            raise _Refused(f"maxpool is a {type(model.maxpool).__name__}")
        self.blocks = []
        for i in range(1, 5):
            layer = getattr(model, f"layer{i}")
            if type(layer) is not nn.Sequential:
                raise _Refused(f"layer{i} is a {type(layer).__name__}, not nn.Sequential")
            for j, block in enumerate(layer):
                if _kind(block) != "basic":
                    raise _Refused(f"layer{i}[{j}] is a {type(block).__name__}, not a "
                                   "fastres BasicBlock")
                self.blocks.append(_BasicBlock(block, ncl))
        pool = model.avgpool
        if type(pool) is not nn.AdaptiveAvgPool1d or pool.output_size not in (1, (1,)):
            raise _Refused("avgpool is not nn.AdaptiveAvgPool1d(1)")
        if type(model.fc) is not nn.Linear:
            raise _Refused(f"fc is a {type(model.fc).__name__}, not nn.Linear")
        self.fc = model.fc
        self.in_channels = model.conv1.in_channels

    def _lengths(self, length: int) -> List[int]:
        lengths = [self.stem.out_length(length)]
        if self.pool is not None:
            lengths.append(self.pool.out_length(lengths[-1]))
        for block in self.blocks:
            lengths.append(block.first.out_length(lengths[-1]))
        return lengths

    def out_length(self, length: int) -> int:
        return 1

    def min_rows(self, batch: int, length: int) -> int:
        return batch * min(self._lengths(length))

    def dropout_reason(self) -> Optional[str]:
        return None

    def __call__(self, h: Tensor) -> Tensor:
        h = self.stem(h)
        if self.pool is not None:
            h = self.pool(h)
        for block in self.blocks:
            h = block(h)
        # AdaptiveAvgPool1d(1) and flatten: the mean over the positions
        return F.linear(h.mean(dim=2 if self.ncl else 1), self.fc.weight, self.fc.bias)


def _kind(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if not cls.__module__.startswith("fastres.nn."):
        return None
    return {"TemporalBlock": "block", "TemporalConvNet": "tcn", "BasicBlock": "basic",
            "ResNet1d": "resnet"}.get(cls.__name__)


def _blocks(module: nn.Module, kind: str, ncl: bool) -> list:
    if kind == "block":
        return [_Block(module, ncl)]
    if kind == "basic":
        return [_BasicBlock(module, ncl)]
    if kind == "resnet":
        return [_ResNet(module, ncl)]
    reason = _stack_options(module, skips=type(module.network[0]).__name__ == "TCNBlock")
    if reason is not None:
        raise _Refused(reason)
    if type(module.network[0]).__name__ == "TCNBlock":
        if getattr(module, "input_layout", "NCL") != "NCL":
            raise _Refused("input_layout='NLC' beyond the stack of blocks")
        return [_TCNBlockNetwork(module, ncl)]
    blocks = []
    for i, block in enumerate(module.network):
        if _kind(block) != "block":
            raise _Refused(f"network[{i}] is a {type(block).__name__}, not a TemporalBlock")
        blocks.append(_Block(block, ncl))
    return blocks


def _stack_options(model: nn.Module, skips: bool = False) -> Optional[str]:
    """Which options add to the stack of blocks, or None (skips: the skip connections are
    built, as for TCNBlock networks)."""
    extra = [name for name, used in (
        ("skip_connections", not skips and getattr(model, "skip_connections", False)),
        ("embedding_shapes", getattr(model, "embedding_shapes", None) is not None),
        ("output_projection", getattr(model, "projection_out", None) is not None),
        ("output_activation", getattr(model, "activation_out", None) is not None)) if used]
    return ", ".join(extra) + " beyond the stack of blocks" if extra else None


# ----------------------------------------------------------------------------- program

class TrainProgram:
    """A TemporalBlock's, TemporalConvNet's, BasicBlock's or ResNet1d's training forward on
    (B, L, C) rows; see the module docstring. A ResNet1d's output is (B, num_classes),
    whatever the layout.

    `program(x)` computes the module's forward on its (B, C, L) input, as FusedModule.forward
    hands it to the dispatch (also for input_layout="NLC" modules: LayoutIO has transposed by
    then); the result carries autograd to x and the module's parameters, and the running
    statistics are updated. A channels-last-strided input (the transpose of (B, L, C) data)
    is read in place and the output then keeps that layout; NCL input is converted once at
    entry, the output once at exit. `program(x, layout="NLC")` takes and returns (B, L, C).
    """

    def __init__(self, module: nn.Module, blocks: list, conv_layout: str):
        self._blocks = blocks
        self.conv_layout = conv_layout
        # the activations' layout between the stages: (B, C, L) where the convs run NCL
        # (a TCNBlock network without batch norm keeps rows: see _TCNBlockNetwork)
        self.ncl = blocks[0].ncl
        self._root = weakref.ref(module)
        self._slots, self._sizes, self._values = _structure(module)
        # the parameters unsupported_reason reads (their dtype can change in place: .data)
        self._params = list(module.parameters())
        self.module_name = type(module).__name__
        self.in_channels = blocks[0].in_channels

    def _min_rows(self, batch: int, length: int) -> int:
        """The fewest values per channel any batch norm of the program sees."""
        rows = []
        for block in self._blocks:
            rows.append(block.min_rows(batch, length))
            length = block.out_length(length)
        return min(rows)

    def stale(self, module: nn.Module) -> bool:
        """Whether `module`'s structure changed since this program read it (a submodule or
        parameter replaced, a training flag). Parameter values are read at every call."""
        if module is not self._root():
            return True
        for mapping, key, obj in self._slots:
            if mapping.get(key, _MISSING) is not obj:
                return True
        for mapping, size in self._sizes:
            if len(mapping) != size:
                return True
        for attributes, name, value in self._values:
            if attributes.get(name, _MISSING) != value:
                return True
        return False

    def unsupported_reason(self, x: Tensor) -> Optional[str]:
        """Why this program cannot compute module(x) exactly, or None."""
        if not isinstance(x, Tensor):
            return f"input is a {type(x).__name__}, not a Tensor"
        if x.device.type != "cpu":
            return f"input on {x.device}; this program runs on CPU"
        if x.dtype != torch.float32:
            return f"input is {x.dtype}; this program is built for float32"
        if x.dim() != 3:
            return f"input has {x.dim()} dims, not 3"
        if torch.is_autocast_enabled("cpu"):
            return "autocast is on"
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in self._params):
            return "the module's parameters are not all float32 on CPU"
        if x.shape[0] == 0 or x.shape[-1] == 0:
            return "empty input"
        if self._min_rows(x.shape[0], x.shape[-1]) <= 1:
            return "one value per channel: batch statistics are undefined"
        for block in self._blocks:
            reason = block.dropout_reason()
            if reason is not None:
                return reason
        return None

    def __call__(self, x: Tensor, layout: str = "NCL") -> Tensor:
        if layout not in ("NCL", "NLC"):
            raise ValueError(f"layout must be 'NCL' or 'NLC', got {layout!r}")
        reason = self.unsupported_reason(x)
        if reason is not None:
            raise RuntimeError(f"oneDNN training program for {self.module_name}: {reason}")
        ncl = x.transpose(1, 2) if layout == "NLC" else x
        if ncl.shape[1] != self.in_channels:
            raise ValueError(f"{self.module_name} expects {self.in_channels} channels, got "
                             f"input of shape {tuple(x.shape)} ({layout})")
        keep_nlc = layout == "NLC" or onednn.is_channels_last(ncl)
        if self.ncl:  # (B, C, L) activations: a conversion only for (B, L, C) data
            h = _Transposed.apply(ncl.transpose(1, 2)) if keep_nlc else ncl.contiguous()
        else:  # (B, L, C): a copy only for NCL data
            h = ncl.transpose(1, 2).contiguous() if keep_nlc else _Transposed.apply(ncl)
        for block in self._blocks:
            h = block(h)
        if h.dim() == 2:  # a ResNet1d's (B, num_classes): no layout
            return h
        if self.ncl:
            if not keep_nlc:
                return h
            rows = _Transposed.apply(h)
            return rows if layout == "NLC" else rows.transpose(1, 2)
        if layout == "NLC":
            return h
        out = h.transpose(1, 2)
        return out if keep_nlc else _Transposed.apply(h)


_MISSING = object()


def _structure(module: nn.Module) -> Tuple[list, list, list]:
    """What stale() compares, read through the modules' own dicts (no __getattr__, no
    module walk per call: the walk cost about 0.2 ms of a ResNet1d step): identity slots
    (every submodule, parameter and buffer entry), each of those dicts' size (an entry
    added), and value slots (training flags, BN eps, momentum and track_running_stats)."""
    slots, sizes, values = [], [], []
    for m in module.modules():
        values.append((m.__dict__, "training", m.training))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            values += [(m.__dict__, name, getattr(m, name))
                       for name in ("eps", "momentum", "track_running_stats")]
        for mapping in (m._modules, m._parameters, m._buffers):
            sizes.append((mapping, len(mapping)))
            slots.extend((mapping, key, obj) for key, obj in mapping.items())
    return slots, sizes, values


def _hooked(module: nn.Module) -> Optional[str]:
    reason = onednn._hooked(module)
    if reason is not None:
        return reason
    for name, m in module.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return f"{name or 'the module'} has backward hooks (they would not fire)"
    return None


CONV_LAYOUTS = ("NLC", "NCL")


def default_conv_layout(module: nn.Module) -> str:
    """The conv layout program_for builds a module with: "NLC" (channels-last convs) for the
    temporal blocks and stacks, "NCL" for BasicBlock and ResNet1d, whose convs run at few
    rows (B * L) and many channels, where oneDNN's blocked NCL kernels measured faster than
    its NHWC ones (benchmarks/NOTES.md). The dispatch may time the other (program_for)."""
    return "NCL" if _kind(module) in ("basic", "resnet") else "NLC"


def _stages(blocks: list) -> List[_Stage]:
    """Every _Stage of a program's blocks (walking this module's own objects only)."""
    found, seen = [], set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, _Stage):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif type(obj).__module__ == __name__ and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                walk(value)

    walk(blocks)
    return found


def build_or_reason(module: nn.Module, conv_layout: Optional[str] = None,
                    winograd: Optional[str] = None):
    """(TrainProgram, None), or (None, why this module cannot be built). conv_layout: "NLC"
    or "NCL" (see default_conv_layout, the default). winograd (WINOGRAD_MODES; None:
    WINOGRAD): which directions of the stride-1 3-tap convs run as Winograd F(2,3), at
    WINOGRAD_MIN_ROWS rows or more, where _Geometry.winograd_reason allows (the NCL layout,
    the extension built): "forward", "forward+dgrad", or "off" (every conv on oneDNN)."""
    if conv_layout is None:
        conv_layout = default_conv_layout(module)
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {conv_layout!r}")
    winograd = WINOGRAD if winograd is None else winograd
    if winograd not in WINOGRAD_MODES:
        raise ValueError(f"winograd must be one of {WINOGRAD_MODES}, got {winograd!r}")
    reason = unavailable_reason()
    if reason is not None:
        return None, reason
    kind = _kind(module)
    if kind is None:
        return None, (f"{type(module).__name__} is not a fastres TemporalBlock, "
                      "TemporalConvNet, BasicBlock or ResNet1d")
    if not all(m.training for m in module.modules()):
        return None, "the module (or a submodule) is in eval mode; the program is for training"
    hooked = _hooked(module)
    if hooked is not None:
        return None, hooked
    params = list(module.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return None, "the module's parameters are not all float32 on CPU"
    try:
        blocks = _blocks(module, kind, conv_layout == "NCL")
    except _Refused as refused:
        return None, str(refused)
    for stage in _stages(blocks):
        geo = stage.geo
        geo.winograd = winograd != "off" and geo.winograd_reason() is None
        geo.winograd_dgrad = geo.winograd and winograd == "forward+dgrad"
    return TrainProgram(module, blocks, conv_layout), None


# one cache per conv layout: the default one, and the other for the dispatch to time
_CACHES = {layout: onednn.ProgramCache(
    lambda module, layout=layout: build_or_reason(module, layout),
    f"oneDNN training program ({layout} convs)") for layout in CONV_LAYOUTS}


def program_for(module: nn.Module, conv_layout: Optional[str] = None
                ) -> Optional[TrainProgram]:
    """The module's training program as the module is now (rebuilt when its structure
    changed), or None (see onednn.ProgramCache); conv_layout None: default_conv_layout."""
    return _CACHES[conv_layout or default_conv_layout(module)].program_for(module)


def run(module: nn.Module, x: Tensor, conv_layout: Optional[str] = None) -> Tensor:
    """module(x) in training through its program; x in the module's own input_layout.

    For tests and benchmarks (the dispatch decides when the program runs): raises
    RuntimeError when the module or the call cannot run here.
    """
    return _CACHES[conv_layout or default_conv_layout(module)].run(module, x)
