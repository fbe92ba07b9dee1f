"""oneDNN training program: a TemporalBlock's (or a stack of them) train step in channels-last.

What exists, not what runs: `build_or_reason(module)` turns a fused TemporalBlock
(norm="batch") or a TemporalConvNet of them, in training mode, into a `TrainProgram` whose
call computes the module's forward with autograd attached (gradients for the input, every
conv weight and bias, BN gamma and beta) and updates the running statistics as
nn.BatchNorm1d does; the dispatch decides whether it runs. The eval counterpart is
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
- Only the conv output is saved per stage (oneDNN's weight gradient reads the conv input,
  which is the previous stage's output, saved anyway); x-hat is recomputed from it.

Dropout after the first stage draws its mask over (B, C, L), as the plain block's
F.dropout does, and reads it through the channels-last view: under the same seed it drops
the same values as the plain block (ATen's CPU dropout is bernoulli_(1-p) then div_(1-p) on
a tensor of the input's shape; tests/backends/test_onednn_train.py checks it against plain).

Refused (`build_or_reason` or `unsupported_reason` says why): eval mode (the eval program
runs there), an in-place dropout, norm="weight" blocks, hooks, dtypes other than float32 (oneDNN has no float64
conv; 16-bit training is not built), autocast, and a missing compiled extension.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _alloc, _ext
from . import onednn

__all__ = ["TrainProgram", "build_or_reason", "program_for", "run", "unavailable_reason"]

_aten = torch.ops.aten


def unavailable_reason() -> Optional[str]:
    """Why this program cannot run in this process, or None."""
    reason = onednn.unavailable_reason()
    if reason is not None:
        return reason
    reason = _ext.load_error()
    if reason is not None:
        return reason
    if not hasattr(torch.ops.fastres_ext, "nlc_bn_train_forward"):
        return "the compiled extension predates the channels-last training kernels; rebuild it"
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

class _StageFunction(torch.autograd.Function):
    """relu(BN_batch(causal_conv(h)) (+ residual)) on channels-last tensors; BN's running
    statistics updated in place. h: (B, C_in, 1, L) channels_last; residual and the output:
    (B, L, C_out) contiguous."""

    @staticmethod
    def forward(ctx, h4, weight, bias, gamma, beta, residual, dilation, running_mean,
                running_var, eps, momentum_factor):
        k = weight.shape[2]
        pad = (k - 1) * dilation
        w4 = weight.unsqueeze(2)
        # oneDNN's own entry, not aten.convolution: ATen sends small batch-1 dilated convs to
        # its im2col path (slow_conv_dilated2d), which measured slower here at B1 L256
        y4 = torch.ops.mkldnn._convolution_pointwise(
            h4, w4, bias, [0, pad], [1, 1], [1, dilation], 1, "none", [], "")
        y = _rows(y4)
        if not y.is_contiguous():  # oneDNN answered in another layout: one copy
            y = y.contiguous()
        batch, length, c_out = h4.shape[0], h4.shape[3], weight.shape[0]
        out = _alloc.empty((batch, length, c_out), dtype=h4.dtype, device=h4.device)
        mean = _alloc.empty((c_out,), dtype=torch.float32, device=h4.device)
        invstd = _alloc.empty((c_out,), dtype=torch.float32, device=h4.device)
        torch.ops.fastres_ext.nlc_bn_train_forward(
            y, length, gamma, beta, running_mean, running_var, eps, momentum_factor,
            None if residual is None else residual.contiguous(), out, mean, invstd)
        ctx.save_for_backward(h4, weight, gamma, y, out, mean, invstd)
        ctx.geometry = (pad, dilation)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h4, weight, gamma, y, out, mean, invstd = ctx.saved_tensors
        pad, dilation = ctx.geometry
        need = ctx.needs_input_grad
        c_out = weight.shape[0]
        grad_y = _alloc.empty(tuple(y.shape), dtype=y.dtype, device=y.device)
        grad_gamma = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_beta = _alloc.empty((c_out,), dtype=torch.float32, device=y.device)
        grad_res = _alloc.empty(tuple(out.shape), dtype=out.dtype, device=out.device) \
            if ctx.has_residual and need[5] else None
        torch.ops.fastres_ext.nlc_bn_train_backward(
            grad_out.contiguous(), out, y, mean, invstd, gamma, grad_y, grad_gamma, grad_beta,
            grad_res)
        grad_h = grad_w = grad_b = None
        if need[0] or need[1] or need[2]:
            grad_h, grad_w, grad_b = _aten.convolution_backward(
                _conv_view(grad_y), h4, weight.unsqueeze(2), [c_out] if ctx.has_bias else None,
                [1, 1], [0, pad], [1, dilation], False, [0, 0], 1,
                [need[0], need[1], need[2] and ctx.has_bias])
            if grad_w is not None:
                grad_w = grad_w.squeeze(2).contiguous()
        return (grad_h, grad_w, grad_b, grad_gamma if need[3] else None,
                grad_beta if need[4] else None, grad_res, None, None, None, None, None)


class _Stage:
    """One conv -> BatchNorm1d (training) stage of a block, read from the module at each call
    (the parameters change every step)."""

    def __init__(self, conv: nn.Conv1d, bn: nn.BatchNorm1d):
        self.conv, self.bn = conv, bn
        self.dilation = conv.dilation[0]

    def __call__(self, h: Tensor, residual: Optional[Tensor]) -> Tensor:
        bn = self.bn
        factor = 0.0
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None \
                else bn.momentum
        tracked = bn.track_running_stats and bn.running_mean is not None
        return _StageFunction.apply(
            _conv_view(h), self.conv.weight, self.conv.bias, bn.weight, bn.bias, residual,
            self.dilation, bn.running_mean if tracked else None,
            bn.running_var if tracked else None, bn.eps, factor)


class _Block:
    """TemporalBlock(norm="batch"): relu(stage2(relu(stage1(x))) + shortcut(x))."""

    def __init__(self, block: nn.Module):
        if block.norm != "batch":
            raise _Refused(f"a TemporalBlock with norm={block.norm!r}; norm='batch' is built")
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            if type(conv) is not nn.Conv1d or conv.groups != 1 or conv.stride != (1,):
                raise _Refused(f"{name} is not a plain stride-1 nn.Conv1d")
        for name in ("bn1", "bn2"):
            bn = getattr(block, name)
            if type(bn) is not nn.BatchNorm1d:
                raise _Refused(f"{name} is a {type(bn).__name__}, not nn.BatchNorm1d")
            if bn.running_mean is not None and bn.running_mean.dtype != torch.float32:
                raise _Refused(f"{name}'s running statistics are not float32")
        down = block.downsample
        if down is not None and (type(down) is not nn.Conv1d or down.kernel_size != (1,)
                                 or down.stride != (1,) or down.groups != 1
                                 or down.padding != (0,)):
            raise _Refused("the downsample is not a 1x1 nn.Conv1d")
        self.block = block
        self.first = _Stage(block.conv1, block.bn1)
        self.second = _Stage(block.conv2, block.bn2)
        self.in_channels = block.conv1.in_channels

    def dropout_reason(self) -> Optional[str]:
        d = self.block.dropout
        if d.training and d.p > 0 and d.inplace:
            return "an in-place dropout (the plain block overwrites the first stage's output)"
        return None

    def _dropout(self, mid: Tensor) -> Tensor:
        """The block's dropout on the first stage's (B, L, C) output, with the plain
        block's mask (drawn over (B, C, L): see the module docstring)."""
        d = self.block.dropout
        if not d.training or d.p == 0:
            return mid
        if d.p == 1:
            return mid * 0.0
        batch, length, channels = mid.shape
        mask = torch.empty((batch, channels, length), dtype=mid.dtype, device=mid.device)
        mask.bernoulli_(1 - d.p).div_(1 - d.p)
        return (mid * mask.transpose(1, 2)).contiguous()

    def __call__(self, h: Tensor) -> Tensor:
        down = self.block.downsample
        if down is None:
            res = h
        else:
            # a 1x1 conv under autograd: oneDNN's NHWC forward and backward
            res = _rows(F.conv2d(_conv_view(h), down.weight.unsqueeze(2), down.bias))
        mid = self._dropout(self.first(h, None))
        return self.second(mid, res.contiguous())


def _kind(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if not cls.__module__.startswith("fastres.nn."):
        return None
    return {"TemporalBlock": "block", "TemporalConvNet": "tcn"}.get(cls.__name__)


def _blocks(module: nn.Module, kind: str) -> List[_Block]:
    if kind == "block":
        return [_Block(module)]
    reason = _stack_options(module)
    if reason is not None:
        raise _Refused(reason)
    blocks = []
    for i, block in enumerate(module.network):
        if _kind(block) != "block":
            raise _Refused(f"network[{i}] is a {type(block).__name__}, not a TemporalBlock")
        blocks.append(_Block(block))
    return blocks


def _stack_options(model: nn.Module) -> Optional[str]:
    extra = [name for name, used in (
        ("skip_connections", getattr(model, "skip_connections", False)),
        ("embedding_shapes", getattr(model, "embedding_shapes", None) is not None),
        ("output_projection", getattr(model, "projection_out", None) is not None),
        ("output_activation", getattr(model, "activation_out", None) is not None)) if used]
    return ", ".join(extra) + " beyond the stack of blocks" if extra else None


# ----------------------------------------------------------------------------- program

class TrainProgram:
    """A TemporalBlock's or TemporalConvNet's training forward in channels-last; see the
    module docstring.

    `program(x)` computes the module's forward on its (B, C, L) input, as FusedModule.forward
    hands it to the dispatch (also for input_layout="NLC" modules: LayoutIO has transposed by
    then); the result carries autograd to x and the module's parameters, and the running
    statistics are updated. A channels-last-strided input (the transpose of (B, L, C) data)
    is read in place and the output then keeps that layout; NCL input is converted once at
    entry, the output once at exit. `program(x, layout="NLC")` takes and returns (B, L, C).
    """

    def __init__(self, module: nn.Module, blocks: List[_Block]):
        self._blocks = blocks
        self._root = weakref.ref(module)
        self._structure = _structure(module)
        self.module_name = type(module).__name__
        self.in_channels = blocks[0].in_channels

    def stale(self, module: nn.Module) -> bool:
        """Whether `module`'s structure changed since this program read it (a submodule or
        parameter replaced, a training flag). Parameter values are read at every call."""
        return module is not self._root() or _structure(module) != self._structure

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
        root = self._root()
        params = [] if root is None else list(root.parameters())
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
            return "the module's parameters are not all float32 on CPU"
        if x.shape[0] * x.shape[-1] <= 1 and x.numel() > 0:
            return "one value per channel: batch statistics are undefined"
        if x.shape[0] == 0 or x.shape[-1] == 0:
            return "empty input"
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
        h = ncl.transpose(1, 2).contiguous()  # (B, L, C): a copy only for NCL data
        for block in self._blocks:
            h = block(h)
        if layout == "NLC":
            return h
        out = h.transpose(1, 2)
        return out if keep_nlc else out.contiguous()


def _structure(module: nn.Module) -> Tuple:
    """Identities and flags stale() compares: every submodule, parameter and buffer slot,
    training flags, BN eps and momentum."""
    parts = []
    for m in module.modules():
        parts.append((id(m), m.training))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parts.append((m.eps, m.momentum, m.track_running_stats))
        for mapping in (m._modules, m._parameters, m._buffers):
            parts.extend((key, id(obj)) for key, obj in mapping.items())
    return tuple(parts)


def _hooked(module: nn.Module) -> Optional[str]:
    reason = onednn._hooked(module)
    if reason is not None:
        return reason
    for name, m in module.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return f"{name or 'the module'} has backward hooks (they would not fire)"
    return None


def build_or_reason(module: nn.Module):
    """(TrainProgram, None), or (None, why this module cannot be built)."""
    reason = unavailable_reason()
    if reason is not None:
        return None, reason
    kind = _kind(module)
    if kind is None:
        return None, (f"{type(module).__name__} is not a fastres TemporalBlock or "
                      "TemporalConvNet")
    if not all(m.training for m in module.modules()):
        return None, "the module (or a submodule) is in eval mode; the program is for training"
    hooked = _hooked(module)
    if hooked is not None:
        return None, hooked
    params = list(module.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return None, "the module's parameters are not all float32 on CPU"
    try:
        blocks = _blocks(module, kind)
    except _Refused as refused:
        return None, str(refused)
    return TrainProgram(module, blocks), None


_CACHE = onednn.ProgramCache(build_or_reason, "oneDNN training program")
_PROGRAMS = _CACHE.programs


def program_for(module: nn.Module) -> Optional[TrainProgram]:
    """The module's training program as the module is now (rebuilt when its structure
    changed), or None (see onednn.ProgramCache)."""
    return _CACHE.program_for(module)


def run(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) in training through its program; x in the module's own input_layout.

    For tests and benchmarks (the dispatch decides when the program runs): raises
    RuntimeError when the module or the call cannot run here.
    """
    return _CACHE.run(module, x)
