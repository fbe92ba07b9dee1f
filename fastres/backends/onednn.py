"""oneDNN eval executor: a whole fused module's forward in channels-last, as inductor runs convs.

What exists, not what runs: `build(module)` turns a fused module in eval mode (TemporalBlock
with norm="batch" or "weight", TemporalConvNet, BasicBlock, ResNet1d) into a `Program` that
computes the module's forward for any input it accepts; the dispatch decides whether it runs.

How the program runs, and why:
- **Activations channels-last (NLC)** from the module's entry to its exit. A (B, C, L)
  activation lives as a (B, C, 1, L) tensor with channels_last strides (memory (B, L, C)), so
  oneDNN's brgemm convolution reads and writes it directly. Eager conv1d makes its input NCL
  contiguous and runs a 2D conv on (B, C, 1, L); oneDNN then reorders the activation to its
  blocked layout and the output back on every conv (measured in benchmarks/NOTES.md). Here
  the input is converted once (no copy at all when it is already NLC-strided, i.e. the
  transpose of a (B, L, C) tensor) and the output once.
- **Ops: torch's own oneDNN bindings, as inductor's freezing passes call them**:
  `torch.ops.mkldnn._reorder_convolution_weight` packs a conv weight once into oneDNN's
  layout for the input shape it will see; `torch.ops.mkldnn._convolution_pointwise` runs a
  conv with a fused unary post-op ("relu", or "none"), and its `.binary` overload adds a
  tensor and applies ReLU in the same primitive (`binary_attr="add", unary_attr="relu"`):
  the residual add and the last ReLU of a block. They ship with every CPU build of torch
  that has oneDNN (`torch.backends.mkldnn.is_available()`), need no extension build, and
  are what `torch.compile` itself calls for 2D convs. (Inductor packs only 4D/5D convs:
  for conv1d it keeps aten.convolution in NCL and fuses the padding and ReLU around it.)
- **Winograd F(2,3) for the stride-1 3-tap convs** (float32, any dilation or padding,
  where the compiled extension loads; csrc/cpu/winograd_cpu.cpp): two outputs' six products
  become four GEMMs over channels through torch's sgemm, so a third of the multiply-adds go
  at the same GEMM speed as oneDNN's direct conv (benchmarks/NOTES.md measures both), and
  the bias, residual add and ReLU run in the output transform, which reads the padding as
  zeros in place (no padded copy). It runs on the fast path only: the exact path below
  keeps oneDNN's direct conv. `build(module, winograd=0)` leaves every conv on oneDNN;
  `winograd=4` builds F(4,3) (half the multiply-adds, more transform adds and rounding:
  faster per conv from 128 channels on, not on the whole models measured).
- **BatchNorm folded** into the conv weight and bias (computed in float64, then cast to the
  parameters' dtype: the binary post-op wants the bias in the input's dtype).
- **NaN and inf as torch.relu treats them.** oneDNN's ReLU post-op (alone, or after the
  binary add) maps NaN to 0 where torch.relu keeps NaN (docs/spec.md: NaN propagates). So
  the post-ops run only when no NaN can arise: every call reads max|x| (one pass over the
  input, torch.aminmax) and compares it with a bound built with the program (per conv, the
  largest row sum of |folded weight| and |bias|, composed through the blocks): while every
  conv's sums stay below 1e38 no inf, hence no NaN, can appear. A non-finite input, one
  large enough to overflow, or non-finite weights take the exact path instead: the same
  convs without post-ops, then torch's add and ReLU.
- **Where oneDNN cannot fuse, torch elementwise ops**: ReLU *before* the residual add
  (norm="weight" blocks: relu(relu(conv) + res)) is the conv's "relu" post-op followed by an
  in-place add and ReLU. oneDNN's padding is symmetric: a causal stack (TemporalBlock,
  TemporalConvNet) runs on the batch-flat layout of `_FlatRows`, whose zero gap rows
  between the samples are the padding; elsewhere (a stack whose gaps would be long next to
  its input, BasicBlock and ResNet1d) causal and asymmetric "same" padding are a
  zero-padded NLC copy of the conv input. Max pool is the maximum of its strided
  taps, average pool a mean over L and the classifier `F.linear`, all on the channels-last
  tensor.
- **Weights follow the module.** A program records the identity of every submodule and
  tensor it read (conv weights or weight-norm g/v, biases, BN affine and running
  statistics), BN's eps and momentum and the training flags; `Program.stale(module)` says
  when any changed, or when a value changed by the rule of fastres/_copies.py (version
  counters, data pointers, a probe of each tensor: an optimizer step, load_state_dict,
  nn.init, a new Parameter, `.data` assignment, a whole-tensor write through `.data`), and
  `run` rebuilds then. After a partial write through `.data`, `fastres.forget_weights(model)`
  (or `forget(module)` here) makes it rebuild.
- Inference only: the program computes no gradients, so `unsupported_reason` refuses a call
  that needs them, as it refuses float64 (oneDNN has no float64 convolution) and 16-bit
  dtypes oneDNN cannot run on this CPU.

Modules are recognised by their class (defined in fastres.nn), checked by name and module
path rather than imported: fastres.nn builds on fastres.backends, so importing it here would
close an import cycle once the dispatch reaches this module.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .. import _ext
from .._copies import WeightCopies
from ..conventions import conv_padding, output_length

__all__ = ["Program", "ProgramCache", "build", "build_or_reason", "forget", "program_for", "run",
           "unavailable_reason",
           "to_channels_last", "is_channels_last"]

# A conv whose sums of |terms| stay below this cannot overflow float32 (3.4e38), nor
# bfloat16 after rounding.
_SAFE_SUM = 1e38

# The outputs per tile m of the Winograd F(m, 3) build() runs the stride-1 3-tap convs as
# (_Conv.use_winograd); 0: none.
WINOGRAD = 2

# Packed weights kept per conv for this many input shapes (batch, length); the oldest goes.
_PACKS_PER_CONV = 4


def unavailable_reason() -> Optional[str]:
    """Why this executor cannot run in this process, or None."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    ops = torch.ops.mkldnn
    for name in ("_convolution_pointwise", "_reorder_convolution_weight"):
        if not hasattr(ops, name):
            return f"this torch has no torch.ops.mkldnn.{name}"
    return None


def _dtype_reason(dtype: torch.dtype) -> Optional[str]:
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        return None if torch.ops.mkldnn._is_mkldnn_bf16_supported() else \
            "this CPU has no oneDNN bfloat16 support"
    if dtype == torch.float16:
        return None if torch.ops.mkldnn._is_mkldnn_fp16_supported() else \
            "this CPU has no oneDNN float16 support"
    return f"oneDNN convolutions take float32, bfloat16 or float16, not {dtype}"


# ----------------------------------------------------------------------------- layout

def is_channels_last(x: Tensor) -> bool:
    """Whether (B, C, L) tensor x is laid out as (B, L, C) in memory (x_nlc.transpose(1, 2))."""
    b, c, n = x.shape
    return (c == 1 or x.stride(1) == 1) and (n == 1 or x.stride(2) == c) \
        and (b == 1 or x.stride(0) == c * n)


def to_channels_last(x: Tensor) -> Tensor:
    """(B, C, L) -> the same values as a (B, C, L) view of (B, L, C) memory; no copy when x
    already is one."""
    if is_channels_last(x):
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _nlc(h: Tensor) -> Tensor:
    """(B, C, 1, L) channels_last -> the (B, L, C) view of its memory."""
    b, c, _, n = h.shape
    return h.as_strided((b, n, c), (n * c, c, 1), h.storage_offset())


def _as_4d(x: Tensor) -> Tensor:
    """(B, C, L) channels-last -> (B, C, 1, L) channels_last: a view, as oneDNN's 2D conv
    wants it (strides (L*C, 1, L*C, C))."""
    b, c, n = x.shape
    return x.as_strided((b, c, 1, n), (n * c, 1, n * c, c), x.storage_offset())


# ----------------------------------------------------------------------------- steps

class _Conv:
    """One conv (BN folded in) with its post-op, on (B, C, 1, L) channels_last tensors."""

    def __init__(self, conv: nn.Conv1d, bn: Optional[nn.BatchNorm1d], padding: str,
                 dtype: torch.dtype):
        if conv.groups != 1:
            raise _Refused(f"{conv} has groups={conv.groups}; only groups=1 is built")
        k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        self.kernel_size, self.stride, self.dilation = k, s, d
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        left, right = conv_padding(k, d, s, padding)
        # oneDNN pads symmetrically; anything else is an explicit zero-padded copy.
        self.pad_copy = (left, right) if left != right else None
        self.pad_op = [0, 0 if left != right else left]
        self.pad = (left, right)
        self.stride_op, self.dilation_op = [1, s], [1, d]
        with torch.no_grad():
            weight = conv.weight.detach().to(torch.float64)  # weight-norm: computed from g, v
            bias = conv.bias.detach().to(torch.float64) if conv.bias is not None \
                else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
            if bn is not None:
                scale = bn.running_var.detach().to(torch.float64).add(bn.eps).rsqrt()
                if bn.weight is not None:
                    scale = scale * bn.weight.detach().to(torch.float64)
                shift = -bn.running_mean.detach().to(torch.float64) * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.detach().to(torch.float64)
                weight = weight * scale[:, None, None]
                bias = bias * scale + shift
        # (C_out, C_in, 1, K), as the 2D conv of a (B, C, 1, L) input takes it
        self.weight = weight.to(dtype).unsqueeze(2).contiguous()
        self.bias = bias.to(dtype).contiguous()
        # max|out| <= gain * max|in| + offset (before ReLU), for the overflow bound
        self.gain = weight.abs().sum(dim=(1, 2)).max().item() if weight.numel() else 0.0
        self.offset = bias.abs().max().item() if bias.numel() else 0.0
        self._packs: Dict[Tuple[int, ...], Tensor] = {}
        # Winograd F(2,3) weights (4, C_in, C_out), set by use_winograd(); None: oneDNN's conv
        self.winograd: Optional[Tensor] = None
        self._winograd_from = weight if self.winograd_reason(dtype) is None else None

    def winograd_reason(self, dtype: torch.dtype) -> Optional[str]:
        """Why this conv cannot run as Winograd F(2,3), or None."""
        if self.kernel_size != 3 or self.stride != 1:
            return f"kernel {self.kernel_size} stride {self.stride}: F(2,3) is for k3 stride 1"
        if dtype != torch.float32:
            return f"{dtype}: the Winograd kernel is float32 only"
        return _ext.load_error()

    def use_winograd(self, outputs: int = 2) -> bool:
        """Run the fast path (finite inputs) as Winograd F(outputs, 3), outputs 2 or 4,
        through the extension (csrc/cpu/winograd_cpu.cpp): a third (F(2,3)) or half (F(4,3))
        of the multiply-adds go; the exact path keeps oneDNN's direct conv (the transforms'
        inf - inf would make NaN where it gives inf). False where it cannot
        (winograd_reason). The weight transform G g runs in float64, rounded once."""
        if outputs not in (2, 4):
            raise ValueError(f"Winograd F(m, 3) is built for m = 2 or 4, not {outputs}")
        if self._winograd_from is None:
            return False
        g0, g1, g2 = self._winograd_from.unbind(2)  # float64 (C_out, C_in) each
        if outputs == 2:
            v = torch.stack([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2])
        else:
            v = torch.stack([g0 / 4, -(g0 + g1 + g2) / 6, -(g0 - g1 + g2) / 6,
                             g0 / 24 + g1 / 12 + g2 / 6, g0 / 24 - g1 / 12 + g2 / 6, g2])
        self.winograd = v.transpose(1, 2).to(torch.float32).contiguous()
        self._winograd_from = None
        return True

    def out_length(self, length: int) -> int:
        return output_length(length, self.kernel_size, self.dilation, self.stride, *self.pad)

    def _packed(self, shape: Tuple[int, ...], pad: Optional[List[int]] = None) -> Tensor:
        pad = self.pad_op if pad is None else pad
        key = shape + tuple(pad)
        packed = self._packs.get(key)
        if packed is None:
            if len(self._packs) >= _PACKS_PER_CONV:
                self._packs.pop(next(iter(self._packs)))
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, pad, self.stride_op, [1, self.dilation], 1, list(shape))
            self._packs[key] = packed
        return packed

    def bound(self, gain: float, offset: float) -> Tuple[float, float]:
        """(gain, offset) of the output's max|.| bound, given the input's. Also records
        `peak`, the bound of every value inside this conv: the output's for the direct conv;
        for Winograd the transformed inputs (up to 2x (F(2,3)) or 10x (F(4,3)) max|in|)
        times a row sum of |transformed weights| (at most the direct conv's), summed by
        the output transform (at most 2 or 19 times): 4x and 256x the direct bound."""
        out = self.gain * gain, self.gain * offset + self.offset
        factor = {None: 1.0, 4: 4.0, 6: 256.0}[None if self.winograd is None
                                               else self.winograd.shape[0]]
        self.peak = factor * out[0], factor * out[1]
        return out

    def __call__(self, h: Tensor, relu: bool, add: Optional[Tensor] = None,
                 exact: bool = False) -> Tensor:
        """conv(h) [+ add], then ReLU if `relu`: one oneDNN primitive, or (exact) the conv
        and the add in oneDNN and torch's NaN-keeping ReLU after it. Winograd (fast path
        only) reads the padding as zeros in place, any padding: no padded copy."""
        if self.winograd is not None and not exact:
            n = h.shape[3]
            out = torch.ops.fastres_ext.winograd_nlc(
                _nlc(h), self.winograd, self.bias, None if add is None else _nlc(add),
                self.dilation, self.pad[0], self.out_length(n), relu)
            return _as_4d(out.transpose(1, 2))
        if self.pad_copy is not None:
            left, right = self.pad_copy
            b, c, _, n = h.shape
            padded = F.pad(h.permute(0, 2, 3, 1).reshape(b, n, c), (0, 0, left, right))
            h = _as_4d(padded.transpose(1, 2))
        packed = self._packed(tuple(h.shape))
        post_relu = relu and not exact
        if add is None:
            out = torch.ops.mkldnn._convolution_pointwise(
                h, packed, self.bias, self.pad_op, self.stride_op, self.dilation_op, 1,
                "relu" if post_relu else "none", [], "")
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                h, add, packed, self.bias, self.pad_op, self.stride_op, self.dilation_op, 1,
                "add", None, "relu" if post_relu else None, [], "")
        return out.relu_() if relu and exact else out

    def flat(self, h: Tensor, relu: bool, add: Optional[Tensor] = None,
             exact: bool = False) -> Tensor:
        """The causal conv on the batch-flat layout (_FlatRows): h is (1, C, 1, rows); the
        output has as many rows, row r the conv of rows r - lookback .. r. oneDNN pads
        symmetrically, so the input is h's first rows - lookback rows padded by lookback on
        both sides: no copy, and the rows left out only ever fed rows past the end.
        `add` (the program's own tensor, never the caller's) is overwritten with the
        output: the in-place overload's sum post-op, one activation less to allocate."""
        lookback = self.pad[0]
        rows = h.shape[3]
        if self.winograd is not None and not exact:
            out = torch.ops.fastres_ext.winograd_nlc(
                _nlc(h), self.winograd, self.bias, None if add is None else _nlc(add),
                self.dilation, lookback, rows, relu)
            return _as_4d(out.transpose(1, 2))
        if lookback:
            h = h[..., :rows - lookback]
        packed = self._packed(tuple(h.shape), [0, lookback])
        pad = [0, lookback]
        post_relu = relu and not exact
        if add is None:
            out = torch.ops.mkldnn._convolution_pointwise(
                h, packed, self.bias, pad, self.stride_op, self.dilation_op, 1,
                "relu" if post_relu else "none", [], "")
        else:
            out = torch.ops.mkldnn._convolution_pointwise_.binary(
                add, h, packed, self.bias, pad, self.stride_op, self.dilation_op, 1,
                "add", None, "relu" if post_relu else None, [], "")
        return out.relu_() if relu and exact else out


class _Block:
    """A residual block: relu(stage2(relu(stage1(x))) + shortcut(x)), ReLU inside stage 2
    before the add when relu_before_add (locuslab's weight-normed block)."""

    def __init__(self, first: _Conv, second: _Conv, shortcut: Optional[_Conv],
                 relu_before_add: bool):
        self.first, self.second, self.shortcut = first, second, shortcut
        self.relu_before_add = relu_before_add
        self.in_channels, self.out_channels = first.in_channels, second.out_channels

    def out_length(self, length: int) -> int:
        return self.second.out_length(self.first.out_length(length))

    def bound(self, gain: float, offset: float) -> Tuple[float, float]:
        g, o = self.second.bound(*self.first.bound(gain, offset))
        sg, so = (gain, offset) if self.shortcut is None else self.shortcut.bound(gain, offset)
        return g + sg, o + so

    def __call__(self, h: Tensor, exact: bool) -> Tensor:
        res = h if self.shortcut is None else self.shortcut(h, relu=False, exact=exact)
        mid = self.first(h, relu=True, exact=exact)
        if self.relu_before_add:  # not a oneDNN post-op chain: relu, then add and relu
            return self.second(mid, relu=True, exact=exact).add_(res).relu_()
        return self.second(mid, relu=True, add=res, exact=exact)

    def flat(self, h: Tensor, rows: "_FlatRows", exact: bool) -> Tensor:
        """The block on the batch-flat layout: each conv output's gap rows zeroed again."""
        res = h if self.shortcut is None else self.shortcut.flat(h, relu=False, exact=exact)
        mid = rows.clear_gaps(self.first.flat(h, relu=True, exact=exact))
        if self.relu_before_add:
            out = self.second.flat(mid, relu=True, exact=exact).add_(res).relu_()
        else:
            out = self.second.flat(mid, relu=True, add=res, exact=exact)
        return rows.clear_gaps(out)


class _FlatRows:
    """The batch-flat layout of a causal stack (TemporalBlock, TemporalConvNet): the batch's
    B samples of L positions as one sequence of rows (channels innermost), each sample
    behind a gap of `gap` zero rows (the stack's largest conv lookback), then `tail` spare
    rows: a (1, C, 1, B * (gap + L) + tail) channels_last tensor.

    Why: oneDNN pads symmetrically, so a causal conv on (B, C, 1, L) needs a left-padded
    copy of its input, a pass over every activation per conv (measured in
    benchmarks/NOTES.md). On the flat layout a conv reads the zero gap as its padding
    (a window never reaches the sample before), runs as one sequence of B * (gap + L) rows
    (a larger GEMM for oneDNN's brgemm), and writes garbage only into the gap rows, which a
    strided fill of B * gap rows zeroes. It computes B * gap + tail extra rows, so it is
    used where those are at most 1/FLAT_MAX_EXTRA of the B * L useful ones: not for deep
    stacks whose dilations reach the input's length, which keep the per-conv copy."""

    FLAT_MAX_EXTRA = 8

    def __init__(self, gap: int, batch: int, length: int):
        self.gap, self.batch, self.length = gap, batch, length
        self.used = batch * (gap + length)
        self.tail = gap

    @classmethod
    def plan(cls, steps: list, batch: int, length: int) -> Optional["_FlatRows"]:
        if not steps or not all(isinstance(s, _Block) for s in steps):
            return None
        gap = max(c.pad[0] for s in steps for c in (s.first, s.second))
        if (batch * gap + gap) * cls.FLAT_MAX_EXTRA > batch * length:
            return None
        return cls(gap, batch, length)

    def _rows(self, h: Tensor) -> Tensor:
        return h.permute(0, 2, 3, 1).reshape(h.shape[3], h.shape[1])  # a view

    def _samples(self, h: Tensor) -> Tensor:
        """(B, gap + L, C) view of the used rows."""
        return self._rows(h)[:self.used].view(self.batch, self.gap + self.length, -1)

    def clear_gaps(self, h: Tensor) -> Tensor:
        if self.gap:
            self._samples(h)[:, :self.gap].zero_()
        return h

    def enter(self, nlc: Tensor) -> Tensor:
        """(B, L, C) (any strides) -> the flat layout."""
        c = nlc.shape[2]
        rows = torch.empty(self.used + self.tail, c, dtype=nlc.dtype, device=nlc.device)
        rows[self.used:].zero_()
        samples = rows[:self.used].view(self.batch, self.gap + self.length, c)
        samples[:, :self.gap].zero_()
        _copy_per_sample(samples[:, self.gap:], nlc)
        return _as_4d(rows.t()[None])

    def leave(self, h: Tensor) -> Tensor:
        """The flat layout -> (B, L, C), contiguous."""
        return self._samples(h)[:, self.gap:].contiguous()

    def leave_ncl(self, h: Tensor) -> Tensor:
        """The flat layout -> (B, C, L), contiguous: one transposing copy, not leave()'s
        copy and a transpose of it."""
        out = torch.empty(self.batch, h.shape[1], self.length, dtype=h.dtype, device=h.device)
        _copy_per_sample(out.transpose(1, 2), self._samples(h)[:, self.gap:])
        return out


def _copy_per_sample(dst: Tensor, src: Tensor) -> None:
    """dst.copy_(src) for (B, X, Y) tensors, one sample at a time where a sample is a
    transpose between a contiguous (X, Y) and a (Y, X) one of at least 3600 elements: ATen
    copies such a 2D transpose in 60 x 60 blocks (its copy_transpose path), a 3D strided
    copy element by element (about 1.3x the time at 64 channels, benchmarks/NOTES.md)."""
    if dst.shape[0] > 1 and dst[0].numel() >= 3600:
        if not dst[0].is_contiguous():  # copy into the contiguous side: out[b] = src[b].t()
            dst, src = dst.transpose(1, 2), src.transpose(1, 2)
        if dst[0].is_contiguous() and src[0].t().is_contiguous():
            for d, s in zip(dst, src):
                d.copy_(s)
            return
    dst.copy_(src)


class _Stem:
    """ResNet1d's stem: conv -> BN -> ReLU (fused), then its max pool (or none)."""

    def __init__(self, conv: _Conv, pool: nn.Module):
        self.conv = conv
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.pool = None
        if isinstance(pool, nn.MaxPool1d):
            k, s, p, d = (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
            one = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
            self.pool = (one(k), one(s), one(p), one(d), bool(pool.ceil_mode))
        elif not isinstance(pool, nn.Identity):
            raise _Refused(f"ResNet1d.maxpool is a {type(pool).__name__}; MaxPool1d or "
                           "Identity are built")

    def out_length(self, length: int) -> int:
        length = self.conv.out_length(length)
        return length if self.pool is None else self._pool_length(length)

    def bound(self, gain: float, offset: float) -> Tuple[float, float]:
        return self.conv.bound(gain, offset)  # max pooling keeps the bound

    def __call__(self, h: Tensor, exact: bool) -> Tensor:
        h = self.conv(h, relu=True, exact=exact)
        if self.pool is None:
            return h
        return _max_pool_nlc(h, *self.pool, out_length=self._pool_length(h.shape[3]))

    def _pool_length(self, length: int) -> int:
        k, s, p, d, ceil = self.pool
        span = length + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= length + p:
            out -= 1
        return out


def _max_pool_nlc(h: Tensor, k: int, s: int, p: int, d: int, ceil: bool,
                  out_length: int) -> Tensor:
    """MaxPool1d on a (B, C, 1, L) channels_last tensor, as the elementwise maximum of its k
    strided (B, L_out, C) taps. F.max_pool2d on channels_last computes indices it then
    drops, 10x the time of these k - 1 maximum passes. Each tap is read only over the
    outputs whose window it reaches inside the input: max pooling ignores its padding
    (torch bounds p so that every window holds an input element), so no -inf padded copy of
    the input is made. The output starts as a tap that reaches every output where one does
    (the centre tap of a kernel-3 stride-2 pool), as -inf otherwise. NaN propagates, as it
    does through max_pool (torch.maximum keeps NaN)."""
    del ceil  # in out_length
    b, c, _, n = h.shape
    nlc = h.permute(0, 2, 3, 1).reshape(b, n, c)  # a view: the memory is (B, L, C)
    taps = []  # (first output, end output, input view)
    for j in range(k):
        offset = j * d - p  # the input index of tap j for output 0
        first = max(0, -(offset // s))  # the first output whose tap index is >= 0
        end = min(out_length, (n - 1 - offset) // s + 1)
        if end > first:
            start = first * s + offset
            taps.append((first, end, nlc[:, start:start + (end - first - 1) * s + 1:s]))
    out = torch.empty(b, out_length, c, dtype=h.dtype, device=h.device)
    full = next((i for i, (first, end, _) in enumerate(taps)
                 if first == 0 and end == out_length), None)
    if full is None:
        out.fill_(float("-inf"))
    else:
        out.copy_(taps.pop(full)[2])
    for first, end, tap in taps:
        part = out[:, first:end]
        torch.maximum(part, tap, out=part)
    return _as_4d(out.transpose(1, 2))


class _Head:
    """ResNet1d's global average pool and fc: (B, C, 1, L) -> (B, num_classes)."""

    def __init__(self, fc: nn.Linear, pool: nn.Module, dtype: torch.dtype):
        if not isinstance(pool, nn.AdaptiveAvgPool1d) or pool.output_size not in (1, (1,)):
            raise _Refused("ResNet1d.avgpool is not AdaptiveAvgPool1d(1)")
        if not isinstance(fc, nn.Linear):
            raise _Refused(f"ResNet1d.fc is a {type(fc).__name__}, not nn.Linear")
        self.fc = fc
        self.in_channels = fc.in_features

    def bound(self, gain: float, offset: float) -> Tuple[float, float]:
        return gain, offset  # torch's own ops: NaN and inf as torch makes them

    def __call__(self, h: Tensor, exact: bool) -> Tensor:
        return self.fc(h.mean(dim=(2, 3)))


class _Refused(Exception):
    """A module (or part) this executor does not build, with the reason."""


# ----------------------------------------------------------------------------- recognition

def _kind(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if not cls.__module__.startswith("fastres.nn."):
        return None
    return {"TemporalBlock": "tcn_block", "TemporalConvNet": "tcn", "BasicBlock": "basic",
            "ResNet1d": "resnet"}.get(cls.__name__)


def _check_bn(bn: nn.Module, where: str) -> None:
    if type(bn) is not nn.BatchNorm1d:
        raise _Refused(f"{where} is a {type(bn).__name__}, not nn.BatchNorm1d")
    if bn.running_mean is None or bn.running_var is None:
        raise _Refused(f"{where} tracks no running statistics, so eval normalizes with batch "
                       "statistics: nothing to fold")


def _weight_sources(conv: nn.Conv1d) -> List[Tensor]:
    """The tensors conv.weight is computed from (g and v under weight_norm)."""
    if _weight_normed(conv):
        return list(conv.parametrizations.weight.parameters())
    return [conv.weight]


class _Reads:
    """The tensors a program read from its module (whose requires_grad decide if it may run)."""

    def __init__(self):
        self.tensors: List[Tensor] = []
        self.scalars: List[object] = []

    def conv(self, conv: nn.Conv1d) -> None:
        self.tensors += _weight_sources(conv)
        if conv.bias is not None:
            self.tensors.append(conv.bias)
        self.scalars.append(conv.bias is None)

    def bn(self, bn: Optional[nn.BatchNorm1d]) -> None:
        if bn is None:
            return
        self.tensors += [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                         if t is not None]
        self.scalars += [bn.eps, bn.momentum, bn.weight is None, bn.bias is None]


def _weight_normed(conv: nn.Module) -> bool:
    return hasattr(conv, "parametrizations") and "weight" in conv.parametrizations


def _plain_conv(conv: nn.Module, where: str) -> nn.Conv1d:
    if not isinstance(conv, nn.Conv1d) or (type(conv) is not nn.Conv1d and not _weight_normed(conv)):
        raise _Refused(f"{where} is a {type(conv).__name__}, not nn.Conv1d")
    return conv


def _tcn_block(block: nn.Module, reads: _Reads, dtype: torch.dtype) -> _Block:
    conv1 = _plain_conv(block.conv1, "conv1")
    conv2 = _plain_conv(block.conv2, "conv2")
    bn1 = bn2 = None
    if block.norm == "batch":
        _check_bn(block.bn1, "bn1")
        _check_bn(block.bn2, "bn2")
        bn1, bn2 = block.bn1, block.bn2
    shortcut = None
    if block.downsample is not None:
        down = _plain_conv(block.downsample, "downsample")
        reads.conv(down)
        shortcut = _Conv(down, None, "causal", dtype)
    for conv, bn in ((conv1, bn1), (conv2, bn2)):
        reads.conv(conv)
        reads.bn(bn)
    return _Block(_Conv(conv1, bn1, "causal", dtype), _Conv(conv2, bn2, "causal", dtype),
                  shortcut, relu_before_add=block.norm == "weight")


def _basic_block(block: nn.Module, reads: _Reads, dtype: torch.dtype) -> _Block:
    padding = "causal" if block.causal else "same"
    _check_bn(block.bn1, "bn1")
    _check_bn(block.bn2, "bn2")
    conv1, conv2 = _plain_conv(block.conv1, "conv1"), _plain_conv(block.conv2, "conv2")
    shortcut = None
    down = block.downsample
    if down is not None:
        # The "auto" projection: Sequential(1x1 conv with the block's stride, BatchNorm1d).
        if not (type(down) is nn.Sequential and len(down) == 2
                and type(down[0]) is nn.Conv1d and down[0].kernel_size == (1,)):
            raise _Refused("the BasicBlock's downsample is not a 1x1 Conv1d -> BatchNorm1d")
        _check_bn(down[1], "downsample.1")
        reads.conv(down[0])
        reads.bn(down[1])
        shortcut = _Conv(down[0], down[1], padding, dtype)
    for conv, bn in ((conv1, block.bn1), (conv2, block.bn2)):
        reads.conv(conv)
        reads.bn(bn)
    return _Block(_Conv(conv1, block.bn1, padding, dtype), _Conv(conv2, block.bn2, padding, dtype),
                  shortcut, relu_before_add=False)


def _hooked(module: nn.Module) -> Optional[str]:
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "global module hooks are registered (they would not fire)"
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the module'} has forward hooks (they would not fire)"
    return None


def _steps(module: nn.Module, kind: str, reads: _Reads, dtype: torch.dtype) -> list:
    if kind == "tcn_block":
        return [_tcn_block(module, reads, dtype)]
    if kind == "basic":
        return [_basic_block(module, reads, dtype)]
    if kind == "tcn":
        steps = []
        for i, block in enumerate(module.network):
            if _kind(block) != "tcn_block":
                raise _Refused(f"network[{i}] is a {type(block).__name__}, not a TemporalBlock")
            steps.append(_tcn_block(block, reads, dtype))
        return steps
    # ResNet1d
    _check_bn(module.bn1, "bn1")
    reads.conv(module.conv1)
    reads.bn(module.bn1)
    padding = "causal" if module.causal else "same"
    steps = [_Stem(_Conv(_plain_conv(module.conv1, "conv1"), module.bn1, padding, dtype),
                   module.maxpool)]
    for i in range(1, 5):
        for j, block in enumerate(getattr(module, f"layer{i}")):
            if _kind(block) != "basic":
                raise _Refused(f"layer{i}[{j}] is a {type(block).__name__}, not a BasicBlock")
            steps.append(_basic_block(block, reads, dtype))
    steps.append(_Head(module.fc, module.avgpool, dtype))
    reads.tensors += [t for t in (module.fc.weight, module.fc.bias) if t is not None]
    return steps


# ----------------------------------------------------------------------------- program

class Program:
    """A fused module's eval forward on oneDNN in channels-last; see the module docstring.

    `program(x)` computes the module's forward on its (B, C, L) input: what
    FusedModule.forward hands the dispatch, also for a module with input_layout="NLC"
    (LayoutIO has transposed by then). A (B, C, L) input that is already channels-last
    strided (the transpose of (B, L, C) data) is read in place, and the output then keeps that
    layout. `program(x, layout="NLC")` takes and returns (B, L, C) itself, as `run` does for
    an NLC module.
    """

    def __init__(self, module: nn.Module, steps: list, reads: _Reads, dtype: torch.dtype,
                 device: torch.device):
        self._steps = steps
        # TemporalBlock and TemporalConvNet: stride-1 causal convs, which the batch-flat
        # layout runs without padded copies (_FlatRows)
        self._causal_stack = all(isinstance(s, _Block) and all(
            c.stride == 1 and c.pad[1] == 0 for c in (s.first, s.second)) for s in steps) \
            and all(s.shortcut is None or (s.shortcut.kernel_size == 1
                                           and s.shortcut.stride == 1) for s in steps)
        self._reads = reads
        self._root = weakref.ref(module)
        self._slots, self._values, self._tensors = _snapshot(module)
        self._weights = WeightCopies(module, self._tensors)
        self.dtype, self.device = dtype, device
        self.in_channels = steps[0].in_channels
        self.classifier = isinstance(steps[-1], _Head)
        self.module_name = type(module).__name__
        # Inputs with max|x| <= threshold run the post-ops: every conv's sums stay below
        # _SAFE_SUM, so no inf (and no NaN from inf - inf) can reach a ReLU post-op. Bounds
        # are (gain, offset) pairs, composed from each step's gain and offset.
        bounds = [(1.0, 0.0)]
        for step in steps:
            bounds.append(step.bound(*bounds[-1]))
        bounds += [conv.peak for conv in _convs(steps)]  # inside each conv (_Conv.bound)
        gain = max(g for g, _ in bounds)
        offset = max(o for _, o in bounds)
        limit = (_SAFE_SUM - offset) / gain if gain > 0 else _SAFE_SUM
        self.threshold = limit if limit == limit and limit > 0 else -1.0  # NaN weights: never

    def stale(self, module: nn.Module) -> bool:
        """Whether `module` changed since this program read it (parameters, buffers, BN eps
        or momentum, a submodule's training flag, a tensor replaced, a value written)."""
        if module is not self._root():
            return True
        for mapping, key, obj in self._slots:
            if mapping.get(key, _MISSING) is not obj:
                return True
        for mapping, key, value in self._values:
            if mapping.get(key, _MISSING) != value:
                return True
        return not self._weights.unchanged(self._tensors)

    def unsupported_reason(self, x: Tensor) -> Optional[str]:
        """Why this program cannot compute module(x) exactly, or None."""
        if not isinstance(x, Tensor):
            return f"input is a {type(x).__name__}, not a Tensor"
        if x.device != self.device:
            return f"input on {x.device}, weights on {self.device}"
        if x.dtype != self.dtype:
            return f"input is {x.dtype}, parameters are {self.dtype}"
        if torch.is_grad_enabled() and (x.requires_grad or any(
                t.requires_grad for t in self._reads.tensors)):
            return "gradients are needed and this program computes none (eval inference only)"
        if torch.is_autocast_enabled("cpu"):
            return "autocast is on"
        if x.dim() >= 1 and x.shape[0] == 0:
            return "empty batch (B = 0): nothing for oneDNN to run"
        return None

    def _check(self, x: Tensor, layout: str) -> None:
        reason = self.unsupported_reason(x)
        if reason is not None:
            raise RuntimeError(f"oneDNN program for {self.module_name}: {reason}")
        if x.dim() != 3:
            shape = "(B, L, C)" if layout == "NLC" else "(B, C, L)"
            raise ValueError(f"{self.module_name} expects a 3D input {shape}, got shape "
                             f"{tuple(x.shape)}")
        c = x.shape[2] if layout == "NLC" else x.shape[1]
        if c != self.in_channels:
            where = "last" if layout == "NLC" else "second"
            raise ValueError(f"{self.module_name} expects {self.in_channels} channels in the "
                             f"{where} dim ({layout} input), got shape {tuple(x.shape)}")
        length = x.shape[1] if layout == "NLC" else x.shape[2]
        for step in self._steps:
            if isinstance(step, _Head):
                break
            length = step.out_length(length)
            if length < 1:
                raise ValueError(f"{self.module_name}: input length "
                                 f"{x.shape[1] if layout == 'NLC' else x.shape[2]} "
                                 "is too short (an output length below 1)")

    def __call__(self, x: Tensor, layout: str = "NCL") -> Tensor:
        if layout not in ("NCL", "NLC"):
            raise ValueError(f"layout must be 'NCL' or 'NLC', got {layout!r}")
        self._check(x, layout)
        ncl = x.transpose(1, 2) if layout == "NLC" else x
        keep_nlc = layout == "NLC" or is_channels_last(ncl)
        with torch.no_grad():
            low, high = torch.aminmax(x)
            largest = max(-low.item(), high.item())  # NaN when x holds one
            exact = not largest <= self.threshold
            rows = _FlatRows.plan(self._steps, ncl.shape[0], ncl.shape[2]) \
                if self._causal_stack else None
            if rows is not None:
                h = rows.enter(ncl.transpose(1, 2))
                for step in self._steps:
                    h = step.flat(h, rows, exact)
                if not keep_nlc:
                    return rows.leave_ncl(h)
                nlc = rows.leave(h)
                return nlc if layout == "NLC" else nlc.transpose(1, 2)
            h = _as_4d(to_channels_last(ncl))
            for step in self._steps:
                h = step(h, exact)
        if self.classifier:
            return h
        b, c, _, n = h.shape
        out = h.as_strided((b, c, n), (n * c, 1, c), h.storage_offset())  # (B, C, L), NLC
        if layout == "NLC":
            return out.transpose(1, 2)  # (B, L, C), contiguous
        return out if keep_nlc else out.contiguous()


_MISSING = object()


def _snapshot(module: nn.Module):
    """What stale() compares, read through the modules' own dicts (cheap: no __getattr__):
    identity slots (every submodule, parameter and buffer entry), value slots (training
    flags, BN eps and momentum) and the tensors (fastres/_copies.py compares their values)."""
    slots, values, tensors = [], [], []
    for m in module.modules():
        values.append((m.__dict__, "training", m.training))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            values += [(m.__dict__, "eps", m.eps), (m.__dict__, "momentum", m.momentum)]
        for mapping in (m._modules, m._parameters, m._buffers):
            for key, obj in mapping.items():
                slots.append((mapping, key, obj))
                if isinstance(obj, Tensor):
                    tensors.append(obj)
    return slots, values, tensors


def _convs(steps: list) -> List[_Conv]:
    convs = []
    for step in steps:
        if isinstance(step, _Stem):
            convs.append(step.conv)
        elif isinstance(step, _Block):
            convs += [c for c in (step.first, step.second, step.shortcut) if c is not None]
    return convs


def build_or_reason(module: nn.Module, winograd: int = WINOGRAD):
    """(Program, None), or (None, why this module cannot be built). `winograd` = m in 2, 4:
    run the stride-1 3-tap convs as Winograd F(m, 3) where the extension is built
    (_Conv.use_winograd); 0: every conv through oneDNN."""
    reason = unavailable_reason()
    if reason is not None:
        return None, reason
    kind = _kind(module)
    if kind is None:
        return None, (f"{type(module).__name__} is not a fastres TemporalBlock, "
                      "TemporalConvNet, BasicBlock or ResNet1d")
    if any(m.training for m in module.modules()):
        return None, "the module (or a submodule) is in training mode; the program is eval only"
    hooked = _hooked(module)
    if hooked is not None:
        return None, hooked
    params = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    if not params:
        return None, "the module has no parameters"
    dtype, device = params[0].dtype, params[0].device
    if device.type != "cpu":
        return None, f"the module is on {device}; oneDNN runs here on CPU"
    if any(p.dtype != dtype for p in module.parameters()):
        return None, "the module's parameters have mixed dtypes"
    reason = _dtype_reason(dtype)
    if reason is not None:
        return None, reason
    reads = _Reads()
    try:
        steps = _steps(module, kind, reads, dtype)
    except _Refused as refused:
        return None, str(refused)
    if winograd:
        for conv in _convs(steps):
            conv.use_winograd(winograd)
    return Program(module, steps, reads, dtype, device), None


def build(module: nn.Module, winograd: int = WINOGRAD) -> Optional[Program]:
    """A Program for module's eval forward, or None (build_or_reason says why)."""
    return build_or_reason(module, winograd)[0]


class ProgramCache:
    """Each module's program (None where it cannot be built), kept beside the module rather
    than in it: copies and pickles of a module never carry packed weights. Shared by the
    eval program here and the training program (onednn_train.py)."""

    def __init__(self, build_or_reason, what: str):
        self._build_or_reason = build_or_reason
        self._what = what
        self.programs: "weakref.WeakKeyDictionary[nn.Module, object]" = \
            weakref.WeakKeyDictionary()

    def program_for(self, module: nn.Module):
        """The module's program as the module is now (built on first use, rebuilt when
        stale), or None where none can be built (build_or_reason says why)."""
        program = self.programs.get(module)
        if program is None or program.stale(module):
            program = self.programs[module] = self._build_or_reason(module)[0]
        return program

    def run(self, module: nn.Module, x: Tensor) -> Tensor:
        """module(x) through its program; x in the module's own input_layout. RuntimeError
        when the module or the call cannot run here."""
        program = self.program_for(module)
        if program is None:
            raise RuntimeError(f"no {self._what} for {type(module).__name__}: "
                               f"{self._build_or_reason(module)[1]}")
        return program(x, getattr(module, "input_layout", "NCL"))


_CACHE = ProgramCache(build_or_reason, "oneDNN program")
_PROGRAMS = _CACHE.programs


def program_for(module: nn.Module) -> Optional[Program]:
    """The module's eval program as the module is now, or None (see ProgramCache)."""
    return _CACHE.program_for(module)


def forget(module: nn.Module) -> None:
    """Drop module's eval program: the next call builds it from the module as it is. For a
    partial write that left the version counters alone (through `.data`), which the
    program's probe may not see (module docstring)."""
    _CACHE.programs.pop(module, None)


def run(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) through its oneDNN program; x in the module's own input_layout.

    For tests and benchmarks (the dispatch decides when the program runs): raises
    RuntimeError when the module or the call cannot run here.
    """
    return _CACHE.run(module, x)
