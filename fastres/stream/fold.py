"""Folding: a model as a flat list of streamable layers, batch norm folded into the convs.

fold(model) walks the model (TemporalConvNet, TemporalBlock, causal BasicBlock, nn.Sequential
of these, 1x1 nn.Conv1d, nn.ReLU, nn.Identity, nn.Dropout in eval mode) and returns one Layer
per residual block, pointwise conv or ReLU, every conv in float64 with batch norm's running
statistics, eps and affine parameters folded in (and weight norm's g * v / ||v|| applied).
Anything else raises StreamError naming the module and why.

Snapshot records everything a fold depends on -- every parameter and buffer value, every
module's train/eval mode and every attribute that changes what a module computes (batch
norm's eps, a conv's dilation, padding, ...) -- so a stream can tell when its fold is stale.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _ext
from .._copies import WeightCopies
from ..nn.resnet import _BasicBlockLayout, _ResNet1dLayout
from ..nn.sequential import ConvBNReLUSequential
from ..nn.temporal import TemporalConvNet, _TemporalBlockLayout, stack_only_reason
from .errors import StreamError
from .layout import BLOCK, POINTWISE, RELU

@dataclasses.dataclass
class FoldedConv:
    """A conv with batch norm folded in, in float64: weight (C_out, C_in, K), bias (C_out,)."""

    weight: Tensor
    bias: Tensor
    dilation: int = 1


@dataclasses.dataclass
class Layer:
    """One streamable layer: a residual block (conv1 -> ReLU -> conv2, + residual, ReLU), a
    1x1 conv, or a ReLU."""

    kind: int
    name: str
    c_in: int
    c_out: int
    conv1: Optional[FoldedConv] = None        # block: first conv; pointwise: the conv
    conv2: Optional[FoldedConv] = None
    downsample: Optional[FoldedConv] = None   # block: 1x1 projection of the residual, or identity
    relu_before_add: bool = False        # block: relu(relu(conv2) + res) (weight-norm blocks)

    @property
    def taps(self) -> int:
        return self.conv1.weight.shape[2] if self.kind == BLOCK else 1

    @property
    def dilation(self) -> int:
        return self.conv1.dilation if self.kind == BLOCK else 1

    @property
    def slots(self) -> int:
        """Ring slots: the (K-1)*d past inputs a causal conv reads, plus the current one."""
        return (self.taps - 1) * self.dilation + 1


def _refuse(path: str, module: nn.Module, why: str) -> StreamError:
    return StreamError(f"fastres.stream: cannot stream {path or '<model>'} "
                       f"({type(module).__name__}): {why}")


_KNOWN = ("TemporalConvNet, TemporalBlock, causal BasicBlock (stride 1), nn.Sequential of "
          "these, 1x1 nn.Conv1d, nn.ReLU, nn.Dropout (eval) and nn.Identity")


def _check_eval_bn(path: str, bn: nn.Module) -> None:
    if not isinstance(bn, nn.BatchNorm1d):
        raise _refuse(path, bn, "expected nn.BatchNorm1d")
    if bn.training:
        raise _refuse(path, bn, "batch norm in training mode normalizes with the statistics "
                      "of the whole batch and sequence, which a step cannot see; call "
                      "model.eval()")
    if bn.running_mean is None or bn.running_var is None:
        raise _refuse(path, bn, "batch norm without running statistics normalizes with "
                      "the batch's statistics even in eval mode")


def _check_dropout(path: str, dropout: nn.Module) -> None:
    if dropout.training and dropout.p > 0:
        raise _refuse(path, dropout, f"dropout (p={dropout.p}) is active in training mode: "
                      "its output is random per call; call model.eval()")


def _conv_weight(conv: nn.Conv1d) -> Tensor:
    """The weight the conv computes with: weight norm's g * v / ||v|| when it has one."""
    if hasattr(conv, "weight_g") and hasattr(conv, "weight_v"):   # old-style weight_norm hook
        hook = next(h for h in conv._forward_pre_hooks.values() if hasattr(h, "dim"))
        return torch._weight_norm(conv.weight_v, conv.weight_g, hook.dim)
    return conv.weight   # plain, or the parametrization's normalized weight


def _fold(path: str, conv: nn.Conv1d, bn: Optional[nn.BatchNorm1d] = None,
          bn_path: str = "") -> FoldedConv:
    """conv (-> bn, at bn_path, in eval mode) as one conv, in float64."""
    if not isinstance(conv, nn.Conv1d):
        raise _refuse(path, conv, "expected nn.Conv1d")
    if conv.stride[0] != 1:
        raise _refuse(path, conv, f"stride {conv.stride[0]}: a strided conv produces one "
                      "output per stride steps, not one per step")
    if conv.groups != 1:
        raise _refuse(path, conv, "grouped convs are not supported")
    with torch.no_grad():
        weight = _conv_weight(conv).detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None \
            else weight.new_zeros(weight.shape[0])
        if bn is not None:
            _check_eval_bn(bn_path, bn)
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.double()
            weight = weight * scale[:, None, None]
            bias = bias * scale + shift
    return FoldedConv(weight, bias, conv.dilation[0])


def _pointwise(path: str, conv: nn.Conv1d, bn: Optional[nn.BatchNorm1d] = None,
               bn_path: str = "") -> FoldedConv:
    """A 1x1 conv (-> BN); any other kernel size is not causal here."""
    if isinstance(conv, nn.Conv1d) and (conv.kernel_size[0] != 1 or conv.padding not in
                                        ((0,), "valid")):
        raise _refuse(path, conv, f"a Conv1d with kernel_size {conv.kernel_size[0]} and "
                      f"padding {conv.padding} outside a block is not a causal conv; outside "
                      "blocks only pointwise (1x1, unpadded) convs stream")
    return _fold(path, conv, bn, bn_path)


def _block(path: str, block: nn.Module, conv1: FoldedConv, conv2: FoldedConv,
           downsample: Optional[FoldedConv], relu_before_add: bool = False) -> Layer:
    if conv1.weight.shape[2] != conv2.weight.shape[2] or conv1.dilation != conv2.dilation:
        raise _refuse(path, block, "its two convs differ in kernel size or dilation")
    c_in, c_out = conv1.weight.shape[1], conv1.weight.shape[0]
    if conv2.weight.shape[:2] != (c_out, c_out):
        raise _refuse(path, block, "conv2 must map conv1's output channels to themselves")
    if (downsample is None and c_in != c_out) or \
            (downsample is not None and downsample.weight.shape[:2] != (c_out, c_in)):
        raise _refuse(path, block, "its residual does not map the input channels to the "
                      "output channels")
    return Layer(BLOCK, path, c_in, c_out, conv1, conv2, downsample, relu_before_add)


def _temporal_block(path: str, block: _TemporalBlockLayout) -> Layer:
    if block.norm == "batch":
        _check_dropout(f"{path}.dropout", block.dropout)
        conv1 = _fold(f"{path}.conv1", block.conv1, block.bn1, f"{path}.bn1")
        conv2 = _fold(f"{path}.conv2", block.conv2, block.bn2, f"{path}.bn2")
    else:
        for name in ("dropout1", "dropout2"):
            _check_dropout(f"{path}.{name}", getattr(block, name))
        conv1 = _fold(f"{path}.conv1", block.conv1)
        conv2 = _fold(f"{path}.conv2", block.conv2)
    down = None if block.downsample is None else \
        _pointwise(f"{path}.downsample", block.downsample)
    return _block(path, block, conv1, conv2, down, relu_before_add=block.norm == "weight")


def _basic_block(path: str, block: _BasicBlockLayout) -> Layer:
    if not block.causal:
        raise _refuse(path, block, "'same' padding: its output at step t depends on inputs "
                      "after t, which a stream has not seen yet")
    if block.stride != 1:
        raise _refuse(path, block, f"stride {block.stride}: a strided block produces one "
                      "output per stride steps, not one per step")
    down = block.downsample
    if down is None:
        projection = None
    elif isinstance(down, nn.Conv1d):
        projection = _pointwise(f"{path}.downsample", down)
    elif type(down) is nn.Sequential and len(down) == 2:
        projection = _pointwise(f"{path}.downsample.0", down[0], down[1],
                                f"{path}.downsample.1")
    else:
        raise _refuse(f"{path}.downsample", down, "a residual branch other than a 1x1 conv "
                      "(-> BatchNorm1d) is not supported")
    return _block(path, block, _fold(f"{path}.conv1", block.conv1, block.bn1, f"{path}.bn1"),
                  _fold(f"{path}.conv2", block.conv2, block.bn2, f"{path}.bn2"), projection)


def _unknown_hint(module: nn.Module) -> str:
    stacks = [name for name, child in module.named_children()
              if type(child) is nn.Sequential or isinstance(child, TemporalConvNet)]
    if len(stacks) == 1:
        return f"; if its forward runs .{stacks[0]}, stream that instead"
    return "; if it holds plain TCN blocks, fastres.convert(model) first"


def _layers(module: nn.Module, path: str = "") -> List[Layer]:
    """The model as a flat list of streamable layers (StreamError for anything else)."""
    if isinstance(module, TemporalConvNet):
        extra = stack_only_reason(module)
        if extra is not None:
            raise _refuse(path, module, f"{extra}: streaming runs a TemporalConvNet whose "
                          "forward is its stack of blocks alone")
        return _layers(module.network, f"{path}.network" if path else "network")
    if isinstance(module, _TemporalBlockLayout):
        return [_temporal_block(path, module)]
    if isinstance(module, _BasicBlockLayout):
        return [_basic_block(path, module)]
    if isinstance(module, _ResNet1dLayout):
        raise _refuse(path, module, "'same' padding, a strided stem, max pooling and global "
                      "average pooling: a ResNet1d needs the whole sequence")
    if isinstance(module, ConvBNReLUSequential):
        raise _refuse(path, module, "fused Conv1d -> BatchNorm1d -> ReLU runs of "
                      "fastres.convert do not stream; streaming runs " + _KNOWN)
    if type(module) is nn.Sequential:
        layers = []
        for name, child in module.named_children():
            layers += _layers(child, f"{path}.{name}" if path else name)
        return layers
    if isinstance(module, nn.Conv1d):
        conv = _pointwise(path, module)
        return [Layer(POINTWISE, path, module.in_channels, module.out_channels, conv)]
    if isinstance(module, nn.ReLU):
        return [Layer(RELU, path, 0, 0)]   # channels set by _check_chain
    if isinstance(module, nn.Dropout):
        _check_dropout(path, module)
        return []
    if isinstance(module, nn.Identity):
        return []
    raise _refuse(path, module, "unknown module: fastres does not know its forward, so what "
                  f"it computes per step cannot be derived. fastres.stream runs {_KNOWN}"
                  + _unknown_hint(module))


def _check_chain(layers: List[Layer]) -> None:
    """Channel counts agree from layer to layer (ReLUs take their neighbour's)."""
    channels = None
    for layer in layers:
        if layer.kind == RELU:
            if channels is None:
                raise StreamError(f"fastres.stream: {layer.name}: a stack cannot start with a "
                                  "ReLU (its channel count is unknown)")
            layer.c_in = layer.c_out = channels
        elif channels is not None and layer.c_in != channels:
            raise StreamError(f"fastres.stream: {layer.name} takes {layer.c_in} channels but "
                              f"the layer before it gives {channels}")
        channels = layer.c_out


def fold(model: nn.Module) -> List[Layer]:
    """The model as streamable layers (StreamError for anything that does not stream)."""
    layers = _layers(model)
    if not layers:
        raise StreamError("fastres.stream: the model has no layer to stream")
    _check_chain(layers)   # (so the stack starts with a conv: it has parameters)
    return layers


# ----------------------------------------------------------------------------- staleness

# Attributes (in a module's __dict__) that change what a module computes, beside its tensors
# and mode: batch norm's eps and affine flags, a conv's geometry, dropout's p, a block's
# causality. Changing one makes a fold stale.
_RESULT_ATTRS = ("eps", "affine", "track_running_stats", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode", "p", "causal", "norm",
                 "relu_before_add")


def _sources(model: nn.Module) -> Tuple[List[Tensor], Tuple]:
    """What a fold depends on: every parameter and buffer; every module's type, mode and
    result-changing attributes. whole_sequence runs this on every call: one C++ walk of the
    modules' dicts where the extension is built (fastres._C.stream_sources), else this
    walk, each module once in model.modules()'s order (model.modules()'s recursive
    generators cost more than the walk)."""
    walk = _ext.direct("stream_sources")
    return walk(model, _RESULT_ATTRS) if walk is not None else _walk_sources(model)


def _walk_sources(model: nn.Module) -> Tuple[List[Tensor], Tuple]:
    tensors, modes = [], []
    seen = set()
    todo = [model]
    names = _RESULT_ATTRS
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        d = module.__dict__
        modes.append((type(module), module.training, tuple([d[n] for n in names if n in d])))
        tensors += [t for t in d["_parameters"].values() if t is not None]
        tensors += [t for t in d["_buffers"].values() if t is not None]
        children = [c for c in d["_modules"].values() if c is not None]
        children.reverse()   # popped first to last: the order of model.modules()
        todo += children
    return tensors, tuple(modes)


class Snapshot:
    """What a fold was made from, to tell whether the model changed: every module's type,
    mode and result-changing attributes, and copies of every parameter and buffer
    (fastres/_copies.py)."""

    def __init__(self, model: nn.Module):
        tensors, self.modes = _sources(model)
        self.copies = WeightCopies(model, tensors)

    def matches(self, model: nn.Module, exact: bool = True) -> bool:
        """Whether the model is as it was. exact: every value compared (values, not
        version counters: writes through .data leave counters alone); else by the rule of
        fastres/_copies.py, for a path that checks on every call."""
        tensors, modes = _sources(model)
        return modes == self.modes and (self.copies.equal(tensors) if exact
                                        else self.copies.unchanged(tensors))
