"""Streaming inference: run a causal TCN one time step, or one chunk, at a time.

    s = fastres.stream(model.eval())   # TemporalConvNet, TemporalBlocks, nn.Sequential of them
    y_t = s.step(x_t)                  # x_t (B, C_in) -> (B, C_out)
    y = s.step(chunk)                  # chunk (B, C_in, n) -> (B, C_out, n)
    saved = s.state()                  # a copy; s.load_state(saved) restores it
    s.reset()                          # back to the zero state

Feeding x[..., 0], x[..., 1], ... gives at every step the output the full causal forward
(eval mode) gives at that step: a causal conv only needs its last (K-1)*d inputs, kept in a
ring buffer per conv, zero at the start as the causal padding is. A step then costs one
small matrix-vector product per conv tap instead of a re-run of the receptive field.

What streams: fastres.TemporalConvNet whose forward is its stack of blocks alone (not with
skip connections, an output projection or activation, NLC layout or embeddings, nor
pytorch-tcn's TCNBlocks); TemporalBlock (norm="batch" with its batch norms in
eval mode, or norm="weight"), also the plain twins fastres.unfuse makes and the blocks
fastres.convert makes of seed and locuslab/TCN blocks; causal BasicBlocks at stride 1;
nn.Sequential stacks of these, with 1x1 nn.Conv1d (pointwise heads), nn.ReLU, nn.Identity
and nn.Dropout (eval mode, or p=0) between them. Anything else raises StreamError naming
the module and why: "same" padding (BasicBlock, ResNet1d) looks at future steps, stride > 1
changes the step rate, batch norm in training mode and active dropout depend on the whole
batch or on chance, an unknown module's per-step behaviour cannot be derived.

The stream is a snapshot. Building it folds batch norm into the conv weights (and takes
weight norm's normalized weight) once; changing the model afterwards (an optimizer step,
load_state_dict) does not reach the stream: call `refold()` (keeps the state) or build a new
stream. `stale()` says whether the model changed since the last fold.

Batch size is fixed by the constructor's `batch_size`, else by the first step; a step with
another batch size raises. `reset(batch_size=...)` changes it.

Backends (`backend=`, default: the fastest available for the model's device):
    "cpp"     CPU: the C++ kernel csrc/cpu/stream_cpu.cpp, one op call per step or chunk
              for the whole stack, weights packed in one buffer, no tensor allocated per
              step beyond the output (none with step(x, out=...)).
    "triton"  CUDA: one Triton launch per step or chunk for the whole stack
              (fastres/backends/triton/stream_step.py); single steps replay a CUDA graph.
              On CPU only under TRITON_INTERPRET=1, for tests.
    "torch"   anywhere: the same semantics in plain PyTorch (F.conv1d over [ring, chunk]);
              what runs when the extension is not built.
Every backend keeps the same state layout, so a state moves between them.

Computation is float32 (float64 for float64 models); 16-bit inputs and outputs are
converted once per call on the CPU backends. A stream is for inference: no gradient flows
through it (its outputs never require grad). `whole_sequence` (below) lets TemporalConvNet.forward run the
C++ kernel on a fresh zero state for small-batch inference, where that measured faster.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _alloc, _ext, backends
from .conventions import triton_interpreting
from .nn.resnet import _BasicBlockLayout, _ResNet1dLayout
from .nn.sequential import ConvBNReLUSequential
from .nn.temporal import (TemporalBlock, TemporalConvNet, _TemporalBlockLayout,
                          register_whole_network_path, stack_only_reason)

__all__ = ["BACKENDS", "Stream", "StreamError", "stream", "whole_sequence"]

BACKENDS = ("cpp", "triton", "torch")


class StreamError(ValueError):
    """A model, input or state the stream cannot take; the message says which and why."""


# ----------------------------------------------------------------------------- the layers

# Layer kinds and the packed meta layout: mirrored in csrc/cpu/stream_cpu.cpp and the Triton
# kernel. Header: n_layers, batch, c_in, c_out, max_c, state size, weights size, version.
BLOCK, POINTWISE, RELU = 0, 1, 2
META_HEADER, META_FIELDS, META_VERSION = 8, 16, 1
(F_KIND, F_C_IN, F_C_OUT, F_TAPS, F_DILATION, F_SLOTS, F_RING_IN, F_RING_MID, F_W1, F_B1,
 F_W2, F_B2, F_WD, F_BD, F_RELU_BEFORE_ADD) = range(15)
_ALIGN = 16  # offsets in the packed buffers are multiples of 16 values (64 bytes in float32)


@dataclasses.dataclass
class _Conv:
    """A conv with batch norm folded in, in float64: weight (C_out, C_in, K), bias (C_out,)."""

    weight: Tensor
    bias: Tensor
    dilation: int = 1


@dataclasses.dataclass
class _Layer:
    """One streamable layer: a residual block (conv1 -> ReLU -> conv2, + residual, ReLU), a
    1x1 conv, or a ReLU."""

    kind: int
    name: str
    c_in: int
    c_out: int
    conv1: Optional[_Conv] = None        # block: first conv; pointwise: the conv
    conv2: Optional[_Conv] = None
    downsample: Optional[_Conv] = None   # block: 1x1 projection of the residual, or identity
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
          bn_path: str = "") -> _Conv:
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
    return _Conv(weight, bias, conv.dilation[0])


def _pointwise(path: str, conv: nn.Conv1d, bn: Optional[nn.BatchNorm1d] = None,
               bn_path: str = "") -> _Conv:
    """A 1x1 conv (-> BN); any other kernel size is not causal here."""
    if isinstance(conv, nn.Conv1d) and (conv.kernel_size[0] != 1 or conv.padding not in
                                        ((0,), "valid")):
        raise _refuse(path, conv, f"a Conv1d with kernel_size {conv.kernel_size[0]} and "
                      f"padding {conv.padding} outside a block is not a causal conv; outside "
                      "blocks only pointwise (1x1, unpadded) convs stream")
    return _fold(path, conv, bn, bn_path)


def _block(path: str, block: nn.Module, conv1: _Conv, conv2: _Conv, downsample: Optional[_Conv],
           relu_before_add: bool = False) -> _Layer:
    if conv1.weight.shape[2] != conv2.weight.shape[2] or conv1.dilation != conv2.dilation:
        raise _refuse(path, block, "its two convs differ in kernel size or dilation")
    c_in, c_out = conv1.weight.shape[1], conv1.weight.shape[0]
    if conv2.weight.shape[:2] != (c_out, c_out):
        raise _refuse(path, block, "conv2 must map conv1's output channels to themselves")
    if (downsample is None and c_in != c_out) or \
            (downsample is not None and downsample.weight.shape[:2] != (c_out, c_in)):
        raise _refuse(path, block, "its residual does not map the input channels to the "
                      "output channels")
    return _Layer(BLOCK, path, c_in, c_out, conv1, conv2, downsample, relu_before_add)


def _temporal_block(path: str, block: _TemporalBlockLayout) -> _Layer:
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


def _basic_block(path: str, block: _BasicBlockLayout) -> _Layer:
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


def _layers(module: nn.Module, path: str = "") -> List[_Layer]:
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
        return [_Layer(POINTWISE, path, module.in_channels, module.out_channels, conv)]
    if isinstance(module, nn.ReLU):
        return [_Layer(RELU, path, 0, 0)]   # channels set by _check_chain
    if isinstance(module, nn.Dropout):
        _check_dropout(path, module)
        return []
    if isinstance(module, nn.Identity):
        return []
    raise _refuse(path, module, "unknown module: fastres does not know its forward, so what "
                  f"it computes per step cannot be derived. fastres.stream runs {_KNOWN}"
                  + _unknown_hint(module))


def _check_chain(layers: List[_Layer]) -> None:
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


# ----------------------------------------------------------------------------- the plan


def _sources(model: nn.Module) -> Tuple[List[Tensor], tuple]:
    """What a folded plan depends on: every parameter and buffer, every module's train/eval
    mode and every norm's eps (one traversal: this runs on every whole_sequence call)."""
    tensors, modes = [], []
    for module in model.modules():
        modes.append((module.training, getattr(module, "eps", None)))
        tensors += [t for t in module._parameters.values() if t is not None]
        tensors += [t for t in module._buffers.values() if t is not None]
    return tensors, tuple(modes)


class _Snapshot:
    """A copy of the values a plan was folded from, to tell whether the model changed.

    Values, not version counters: writes through .data (home-made EMA updates, say) leave
    version counters alone, and a fast path must never return what stale weights give. The
    comparison is one C++ call (memcmp) where the extension is built.
    """

    def __init__(self, model: nn.Module):
        tensors, self.modes = _sources(model)
        with torch.no_grad():
            self.values = [t.detach().clone() for t in tensors]

    def matches(self, model: nn.Module) -> bool:
        tensors, modes = _sources(model)
        if modes != self.modes:
            return False
        if _cpp_unavailable() is None:
            return torch.ops.fastres_ext.stream_same_values.default(tensors, self.values)
        return len(tensors) == len(self.values) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)
            for a, b in zip(tensors, self.values))


class _Plan:
    """A model folded and packed for the stream kernels (one per stream, rebuilt by refold).

    weights: every conv as K taps of W_k[C_in][C_out] then its bias, in one contiguous
    buffer of the compute dtype on the model's device; `meta(batch)` the int64 layer table
    the kernels read (it holds the state offsets, which depend on the batch size).
    """

    def __init__(self, model: nn.Module):
        self.layers = _layers(model)
        if not self.layers:
            raise StreamError("fastres.stream: the model has no layer to stream")
        _check_chain(self.layers)   # (so the stack starts with a conv: it has parameters)
        weights = [p for p in model.parameters() if p.is_floating_point()]
        self.dtype, self.device = weights[0].dtype, weights[0].device
        if any(p.dtype != self.dtype or p.device != self.device for p in weights):
            raise StreamError("fastres.stream: the model's parameters must share one dtype "
                              "and device")
        self.compute_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.c_in, self.c_out = self.layers[0].c_in, self.layers[-1].c_out
        self.max_c = max(max(layer.c_in, layer.c_out) for layer in self.layers)
        self.receptive_field = 1 + sum(2 * (layer.taps - 1) * layer.dilation
                                       for layer in self.layers if layer.kind == BLOCK)
        # What a saved state must match: per layer, its kind and ring shapes.
        self.layout = tuple((layer.kind, layer.c_in, layer.c_out, layer.slots)
                            for layer in self.layers)
        self._pack()
        self._metas: Dict[int, Tensor] = {}
        # (state, position) of a run from a fresh zero state that keeps nothing.
        self.empty_state = (self.weights.new_empty(0), torch.empty(0, dtype=torch.int64))

    def _pack(self) -> None:
        chunks, offset = [], 0
        self.offsets: List[Dict[str, int]] = []

        def add(t: Optional[Tensor]) -> int:
            nonlocal offset
            if t is None:
                return -1
            flat = t.reshape(-1)
            start = offset
            pad = -flat.numel() % _ALIGN
            chunks.append(torch.cat([flat, flat.new_zeros(pad)]))
            offset += flat.numel() + pad
            return start

        def taps(conv: Optional[_Conv]) -> Optional[Tensor]:
            return None if conv is None else conv.weight.permute(2, 1, 0).contiguous()

        for layer in self.layers:
            self.offsets.append({
                "w1": add(taps(layer.conv1)), "b1": add(layer.conv1 and layer.conv1.bias),
                "w2": add(taps(layer.conv2)), "b2": add(layer.conv2 and layer.conv2.bias),
                "wd": add(taps(layer.downsample)),
                "bd": add(layer.downsample and layer.downsample.bias)})
        self.weights = torch.cat(chunks).to(device=self.device, dtype=self.compute_dtype)

    def ring_offsets(self, batch: int) -> Tuple[List[Tuple[int, int]], int]:
        """Per layer (input ring offset, h ring offset or -1) in the state; the state size."""
        rings, offset = [], 0
        for layer in self.layers:
            ring_in = offset
            offset += -(-layer.slots * batch * layer.c_in // _ALIGN) * _ALIGN
            ring_mid = -1
            if layer.kind == BLOCK:
                ring_mid = offset
                offset += -(-layer.slots * batch * layer.c_out // _ALIGN) * _ALIGN
            rings.append((ring_in, ring_mid))
        return rings, offset

    def meta(self, batch: int) -> Tensor:
        """The int64 layer table of csrc/cpu/stream_cpu.cpp for `batch` streams (cached)."""
        if batch not in self._metas:
            rings, state_size = self.ring_offsets(batch)
            rows = [len(self.layers), batch, self.c_in, self.c_out, self.max_c, state_size,
                    self.weights.numel(), META_VERSION]
            for layer, off, (ring_in, ring_mid) in zip(self.layers, self.offsets, rings):
                record = [0] * META_FIELDS
                record[F_KIND:F_RING_MID + 1] = [layer.kind, layer.c_in, layer.c_out,
                                                 layer.taps, layer.dilation, layer.slots,
                                                 ring_in, ring_mid]
                record[F_W1:F_BD + 1] = [off["w1"], off["b1"], off["w2"], off["b2"], off["wd"],
                                         off["bd"]]
                record[F_RELU_BEFORE_ADD] = int(layer.relu_before_add)
                rows += record
            self._metas[batch] = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return self._metas[batch]

    def state_size(self, batch: int) -> int:
        return self.ring_offsets(batch)[1]


# ----------------------------------------------------------------------------- backends


def _cpp_unavailable() -> Optional[str]:
    reason = _ext.load_error()
    if reason is None and not hasattr(torch.ops.fastres_ext, "stream_forward"):
        reason = "fastres._C was built without the streaming kernel (csrc/cpu/stream_cpu.cpp); " \
                 "rebuild it"
    return reason


def _triton_unavailable(device: torch.device) -> Optional[str]:
    reason = backends.get("triton").unavailable_reason()
    if reason is None and device.type == "cpu" and not triton_interpreting():
        reason = "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return reason


def unavailable_reason(backend: str, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None if stream backend `backend` runs models of `dtype` on `device` here, else why."""
    if backend not in BACKENDS:
        raise StreamError(f"fastres.stream: unknown backend {backend!r}; choose from "
                          f"{', '.join(BACKENDS)}")
    if backend == "cpp":
        return "runs on CPU only" if device.type != "cpu" else _cpp_unavailable()
    if backend == "triton":
        if dtype == torch.float64:
            return "the Triton kernel computes in float32; float64 models stream on 'torch'"
        return _triton_unavailable(device)
    return None


def _default_backend(device: torch.device, dtype: torch.dtype) -> str:
    preferred = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(b for b in preferred if unavailable_reason(b, device, dtype) is None)


class _Runner:
    """Advances the state of `batch` streams: run(x, out) writes the outputs for x
    (B, C_in[, n]) into out; run_new(x) returns them in a new tensor."""

    direct_dtypes: Tuple[torch.dtype, ...] = ()   # input dtypes run without a conversion

    def __init__(self, plan: _Plan, batch: int, state: Tensor, position: Tensor):
        self.plan, self.batch, self.state, self.position = plan, batch, state, position

    def run_new(self, x: Tensor) -> Tensor:
        out = _alloc.empty((x.shape[0], self.plan.c_out) + tuple(x.shape[2:]), dtype=x.dtype,
                           device=x.device)
        self.run(x, out)
        return out


class _CppRunner(_Runner):
    """csrc/cpu/stream_cpu.cpp: one op call per step or chunk for the whole stack."""

    direct_dtypes = (torch.float32, torch.float64)

    def __init__(self, plan, batch, state, position):
        super().__init__(plan, batch, state, position)
        self.op = torch.ops.fastres_ext.stream_forward.default
        self.op_out = torch.ops.fastres_ext.stream_forward_out.default
        self.meta = plan.meta(batch)
        # One step's activations; a chunk's are allocated by the kernel.
        self.workspace = torch.empty(4 * batch * plan.max_c, dtype=plan.compute_dtype)
        self.no_workspace = self.workspace[:0]

    def run(self, x: Tensor, out: Tensor) -> None:
        workspace = self.workspace if x.dim() == 2 else self.no_workspace
        self.op_out(x, self.plan.weights, self.meta, self.state, self.position, workspace, out)

    def run_new(self, x: Tensor) -> Tensor:
        workspace = self.workspace if x.dim() == 2 else self.no_workspace
        return self.op(x, self.plan.weights, self.meta, self.state, self.position, workspace)


class _TorchRunner(_Runner):
    """The same semantics in plain PyTorch: per conv, F.conv1d over [its ring's history,
    the chunk], then the chunk's last inputs into the ring."""

    direct_dtypes = (torch.float32, torch.float64)

    def __init__(self, plan, batch, state, position):
        super().__init__(plan, batch, state, position)
        dtype, device = plan.compute_dtype, plan.device

        def cast(conv: Optional[_Conv]):
            return None if conv is None else \
                _Conv(conv.weight.to(device, dtype), conv.bias.to(device, dtype), conv.dilation)
        self.convs = [(cast(layer.conv1), cast(layer.conv2), cast(layer.downsample))
                      for layer in plan.layers]
        self.rings = []
        for layer, (ring_in, ring_mid) in zip(plan.layers, plan.ring_offsets(batch)[0]):
            self.rings.append((self._ring(ring_in, layer.slots, layer.c_in),
                               self._ring(ring_mid, layer.slots, layer.c_out)))

    def _ring(self, offset: int, slots: int, channels: int) -> Optional[Tensor]:
        """(slots, B, C) view of the state (None: the layer has no such ring)."""
        if offset < 0:
            return None
        size = slots * self.batch * channels
        return self.state[offset:offset + size].view(slots, self.batch, channels)

    @torch.no_grad()
    def run(self, x: Tensor, out: Tensor) -> None:
        chunk = x if x.dim() == 3 else x.unsqueeze(-1)
        pos = int(self.position)
        h = chunk
        for layer, (conv1, conv2, down), (ring_in, ring_mid) in zip(self.plan.layers,
                                                                    self.convs, self.rings):
            if layer.kind == RELU:
                _with_history(ring_in, h, pos, layer.slots)
                h = torch.relu(h)
            elif layer.kind == POINTWISE:
                _with_history(ring_in, h, pos, layer.slots)
                h = F.conv1d(h, conv1.weight, conv1.bias)
            else:
                a = torch.relu(F.conv1d(_with_history(ring_in, h, pos, layer.slots),
                                        conv1.weight, conv1.bias, dilation=conv1.dilation))
                z = F.conv1d(_with_history(ring_mid, a, pos, layer.slots), conv2.weight,
                             conv2.bias, dilation=conv2.dilation)
                res = h if down is None else F.conv1d(h, down.weight, down.bias)
                if layer.relu_before_add:
                    z = torch.relu(z)
                h = torch.relu(z + res)
        out.copy_(h if x.dim() == 3 else h.squeeze(-1))
        self.position += chunk.shape[-1]


def _with_history(ring: Tensor, chunk: Tensor, pos: int, slots: int) -> Tensor:
    """[the ring's last slots-1 inputs, chunk] along time, (B, C, slots - 1 + n); then the
    last `slots` inputs of that go into the ring (slot = time mod slots)."""
    past = slots - 1
    times = torch.arange(pos - past, pos + chunk.shape[-1], device=chunk.device)
    history = ring[times[:past] % slots].permute(1, 2, 0)
    full = torch.cat([history, chunk], dim=-1)
    ring[times[-slots:] % slots] = full[..., -slots:].permute(2, 0, 1)
    return full


class _TritonRunner(_Runner):
    """The Triton backend's stream kernel (fastres/backends/triton/stream_step.py): one launch
    per step or chunk for the whole stack; on CUDA, single steps replay a captured CUDA graph of (launch, position += 1)."""

    direct_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, plan, batch, state, position):
        super().__init__(plan, batch, state, position)
        self.kernel = backends.get("triton")
        self.meta = plan.meta(batch)
        self.scratch = torch.empty(batch * plan.c_out, dtype=torch.float32, device=plan.device)
        self.graph = None   # (graph, static input, static output), captured on the first step

    def launch(self, x: Tensor, out: Tensor, state: Tensor, position: Tensor) -> None:
        self.kernel.stream_forward(x, out, self.plan.weights, self.meta, state, position,
                                   self.scratch, self.plan.max_c)
        position += x.shape[-1] if x.dim() == 3 else 1

    def run(self, x: Tensor, out: Tensor) -> None:
        if not x.is_cuda:   # the interpreter, in tests
            self.launch(x, out, self.state, self.position)
            return
        with torch.cuda.device(x.device):   # Triton and graphs run on the current device
            if x.dim() == 3:
                self.launch(x, out, self.state, self.position)
                return
            graph, static_x, static_out = self.graph or self._capture(x, out)
            static_x.copy_(x)
            graph.replay()
            out.copy_(static_out)

    def _capture(self, x: Tensor, out: Tensor):
        static_x, static_out = torch.zeros_like(x), torch.empty_like(out)
        # Warm up (compile) on a scratch copy of the state, so capturing changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.launch(static_x, static_out, self.state.clone(), self.position.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.launch(static_x, static_out, self.state, self.position)
        self.graph = (graph, static_x, static_out)
        return self.graph


_RUNNERS = {"cpp": _CppRunner, "torch": _TorchRunner, "triton": _TritonRunner}


# ----------------------------------------------------------------------------- the stream


class Stream:
    """A causal stack run one step, or one chunk, at a time, carrying its state.

    Build with fastres.stream(model). Not thread-safe: one stream per thread.
    """

    def __init__(self, model: nn.Module, *, batch_size: Optional[int] = None,
                 backend: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise StreamError(f"fastres.stream: expected an nn.Module, got "
                              f"{type(model).__name__}")
        self._model = model
        self._plan = _Plan(model)
        self._snapshot = _Snapshot(model)
        device, dtype = self._plan.device, self._plan.dtype
        if backend is None:
            backend = _default_backend(device, dtype)
        reason = unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise StreamError(f"fastres.stream: backend {backend!r} cannot run a "
                              f"{str(dtype).replace('torch.', '')} model on {device.type}: "
                              f"{reason}")
        self.backend = backend
        self._batch: Optional[int] = None
        self._batch_origin = ""   # what fixed the batch size, for the mismatch error
        self._runner: Optional[_Runner] = None
        if batch_size is not None:
            self.reset(batch_size)
            self._batch_origin = "the constructor"

    # --- what the stream is

    @property
    def in_channels(self) -> int:
        return self._plan.c_in

    @property
    def out_channels(self) -> int:
        return self._plan.c_out

    @property
    def dtype(self) -> torch.dtype:
        return self._plan.dtype

    @property
    def device(self) -> torch.device:
        return self._plan.device

    @property
    def receptive_field(self) -> int:
        """Input steps one output depends on (the stream's memory, plus the current step)."""
        return self._plan.receptive_field

    @property
    def batch_size(self) -> Optional[int]:
        """Streams advanced together; None until the first step (or reset) fixes it."""
        return self._batch

    @property
    def position(self) -> int:
        """Steps taken since the zero state."""
        return 0 if self._runner is None else int(self._runner.position)

    # --- stepping

    def step(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Advance every stream: x (B, C_in) -> (B, C_out), or a chunk x (B, C_in, n) ->
        (B, C_out, n), the causal forward's outputs at these steps.

        `out`: a contiguous tensor of the output's shape, dtype and device to write into
        (then nothing is allocated per step).
        """
        # The checks are ordered so that a well-formed step pays only for comparisons.
        if self._runner is None or not isinstance(x, Tensor) or x.dim() not in (2, 3) \
                or x.shape[0] != self._batch:
            self._check_first(x)
        plan, runner = self._plan, self._runner
        if x.shape[1] != plan.c_in or x.dtype != plan.dtype or x.device != plan.device \
                or (x.dim() == 3 and x.shape[2] == 0):
            self._check_input(x)
        if x.dtype not in runner.direct_dtypes:
            # 16-bit on the CPU kernels: convert once, compute in float32.
            result = runner.run_new(x.to(plan.compute_dtype).contiguous())
            if out is None:
                return result.to(plan.dtype)
            self._check_out(x, out)
            return out.copy_(result)
        if out is None:
            return runner.run_new(x.contiguous())
        self._check_out(x, out)
        runner.run(x.contiguous(), out)
        return out

    def _check_out(self, x: Tensor, out: Tensor) -> None:
        plan = self._plan
        shape = (x.shape[0], plan.c_out) + tuple(x.shape[2:])
        if not isinstance(out, Tensor) or out.shape != shape or out.dtype != plan.dtype \
                or out.device != plan.device or not out.is_contiguous():
            got = f"{tuple(out.shape)} {out.dtype} on {out.device}" \
                if isinstance(out, Tensor) else type(out).__name__
            raise StreamError(f"fastres.stream: out must be a contiguous {shape} {plan.dtype} "
                              f"tensor on {plan.device}, got {got}")

    def _check_first(self, x) -> None:
        if not isinstance(x, Tensor):
            raise StreamError(f"fastres.stream: step takes a tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise StreamError(f"fastres.stream: step takes x of shape (B, C_in) or (B, C_in, "
                              f"n), got {tuple(x.shape)}")
        if self._batch is None:
            self._check_input(x)
            self.reset(x.shape[0])
            self._batch_origin = "the first step"
        elif x.shape[0] != self._batch:
            raise StreamError(
                f"fastres.stream: this stream advances {self._batch} streams (batch size set "
                f"by {self._batch_origin}), got x with batch size {x.shape[0]}; call "
                f"reset(batch_size={x.shape[0]}) to start over with that many, or use "
                "another stream")

    def _check_input(self, x: Tensor) -> None:
        plan = self._plan
        if x.shape[0] < 1:
            raise StreamError("fastres.stream: the batch size must be at least 1")
        if x.shape[1] != plan.c_in:
            raise StreamError(f"fastres.stream: x has {x.shape[1]} channels, the model takes "
                              f"{plan.c_in} (x must be (B, C_in) or (B, C_in, n))")
        if x.dim() == 3 and x.shape[2] == 0:
            raise StreamError("fastres.stream: a chunk must hold at least one step")
        if x.dtype != plan.dtype:
            raise StreamError(f"fastres.stream: x is {x.dtype}, the model is {plan.dtype}")
        if x.device != plan.device:
            raise StreamError(f"fastres.stream: x is on {x.device}, the model on {plan.device}")

    # --- state

    def reset(self, batch_size: Optional[int] = None) -> None:
        """Back to the zero state (the causal padding's zeros); `batch_size` changes how many
        streams advance together."""
        if batch_size is None:
            batch_size = self._batch
        if batch_size is None:
            return   # nothing allocated yet: the first step starts from zeros
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StreamError(f"fastres.stream: batch_size must be an int >= 1, got "
                              f"{batch_size!r}")
        if batch_size != self._batch:
            self._allocate(batch_size)
            self._batch_origin = "reset(batch_size=...)"
        self._runner.state.zero_()
        self._runner.position.zero_()

    def _allocate(self, batch: int) -> None:
        plan = self._plan
        state = torch.zeros(plan.state_size(batch), dtype=plan.compute_dtype,
                            device=plan.device)
        position_device = plan.device if self.backend == "triton" else torch.device("cpu")
        position = torch.zeros(1, dtype=torch.int64, device=position_device)
        self._runner = _RUNNERS[self.backend](plan, batch, state, position)
        self._batch = batch

    def state(self) -> dict:
        """A copy of the state: {"rings", "position", "batch_size", "layout"}. Save it with
        torch.save; load_state restores it into any stream of the same model."""
        if self._runner is None:
            raise StreamError("fastres.stream: no state yet (take a step or reset(batch_size) "
                              "first)")
        return {"rings": self._runner.state.clone(), "position": self.position,
                "batch_size": self._batch, "layout": self._plan.layout}

    def load_state(self, state: dict) -> None:
        """Continue from a state that state() returned (its batch size too)."""
        if not isinstance(state, dict) or set(state) != {"rings", "position", "batch_size",
                                                         "layout"}:
            raise StreamError("fastres.stream: load_state takes the dict state() returns")
        if tuple(map(tuple, state["layout"])) != self._plan.layout:
            raise StreamError("fastres.stream: the state comes from a model with other layers "
                              f"(layout {state['layout']}, this model {self._plan.layout})")
        rings = state["rings"]
        batch = state["batch_size"]
        size = self._plan.state_size(batch)
        if not isinstance(rings, Tensor) or rings.shape != (size,) \
                or rings.dtype != self._plan.compute_dtype:
            raise StreamError(f"fastres.stream: state['rings'] must be a {size}-value "
                              f"{self._plan.compute_dtype} tensor for batch size {batch}")
        if batch != self._batch:
            self._allocate(batch)
            self._batch_origin = "load_state"
        self._runner.state.copy_(rings)
        self._runner.position.fill_(int(state["position"]))

    # --- the model behind it

    def stale(self) -> bool:
        """Whether the model changed (parameter or buffer values, train/eval modes) since
        the stream folded it."""
        return not self._snapshot.matches(self._model)

    def refold(self) -> None:
        """Fold the model's current parameters again, keeping the state."""
        snapshot, plan = _Snapshot(self._model), _Plan(self._model)
        if plan.layout != self._plan.layout or plan.dtype != self._plan.dtype \
                or plan.device != self._plan.device:
            raise StreamError("fastres.stream: the model's layers, dtype or device changed; "
                              "build a new stream")
        runner = self._runner
        self._snapshot, self._plan = snapshot, plan
        if runner is not None:
            self._runner = _RUNNERS[self.backend](plan, self._batch, runner.state,
                                                  runner.position)

    def __repr__(self) -> str:
        return (f"fastres.Stream({self.in_channels} -> {self.out_channels} channels, "
                f"{len(self._plan.layers)} layers, receptive field {self.receptive_field}, "
                f"batch {self._batch}, position {self.position}, backend {self.backend!r})")


def stream(model: nn.Module, *, batch_size: Optional[int] = None,
           backend: Optional[str] = None) -> Stream:
    """A Stream running `model` one step (or chunk) at a time; see this module's docstring.

    Args:
        model: a causal stack in eval mode (what streams: see fastres.stream's docstring).
        batch_size: how many streams advance together; default: the first step's batch.
        backend: "cpp", "triton" or "torch"; default: the fastest available for the model's
            device (cpp on CPU when the extension is built, triton on CUDA).
    """
    return Stream(model, batch_size=batch_size, backend=backend)


# ----------------------------------------------------------------------------- whole sequences

# whole_sequence tries the stacked kernel only for batches up to this size and inputs up to
# this many steps in total: it wins through fewer calls and passes over small activations,
# and the first call of each signature pays for timing both paths.
WHOLE_SEQUENCE_MAX_BATCH = 8
WHOLE_SEQUENCE_MAX_STEPS = 1 << 16
_CACHE_ATTR = "_fastres_whole_sequence"


class _WholeSequenceCache:
    """What whole_sequence keeps on a TemporalConvNet: the folded plan (None where the model
    cannot stream) with the snapshot it was folded from. Copies and pickles of the module
    start empty."""

    def __init__(self):
        self.snapshot: Optional[_Snapshot] = None
        self.plan: Optional[_Plan] = None

    def plan_for(self, model: TemporalConvNet) -> Optional[_Plan]:
        """The plan of the model as it is now (refolded if anything changed)."""
        if self.snapshot is None or not self.snapshot.matches(model):
            self.snapshot, self.plan = _Snapshot(model), None
            try:
                self.plan = _Plan(model)
            except StreamError:
                pass   # (a BN in training mode, ...): the layered path runs
        return self.plan

    def __deepcopy__(self, memo):
        return _WholeSequenceCache()

    def __reduce__(self):
        return (_WholeSequenceCache, ())


def _stacked_forward(plan: _Plan, x: Tensor) -> Tensor:
    """The full causal forward of the plan's stack on x (B, C, L) by one C++ call from a
    fresh zero state (an empty state: nothing kept)."""
    batch = x.shape[0]
    xc = x.to(plan.compute_dtype).contiguous()
    out = _alloc.empty((batch, plan.c_out, x.shape[2]), dtype=plan.compute_dtype,
                       device=x.device)
    empty, no_position = plan.empty_state
    torch.ops.fastres_ext.stream_forward_out.default(
        xc, plan.weights, plan.meta(batch), empty, no_position, empty, out)
    return out.to(x.dtype)


@register_whole_network_path("stack")
def whole_sequence(model: TemporalConvNet, x: Optional[Tensor]) -> Optional[Tensor]:
    """TemporalConvNet's whole-stack path, a candidate of the module level
    (fastres/dispatch/module.py, which times it against the blocks): model(x) by the C++
    stream kernel from a fresh zero state, or None where it does not give the layered
    output: an eval-mode network of fused TemporalBlocks on the CPU, no gradient needed, a
    batch of at most WHOLE_SEQUENCE_MAX_BATCH, the extension built, not under tracing, no
    hook anywhere in the network (the kernel skips every module). Its folded weights are
    checked against the model's current values (eps included) on every call.
    whole_sequence(model, None) is False where it can never run for this model.
    """
    if x is None:
        return False if _cpp_unavailable() is not None else True
    if not _may_run_stacked(model, x):
        return None
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_CACHE_ATTR] = _WholeSequenceCache()
    return _run_stacked(model, cache, x)


def _may_run_stacked(model: TemporalConvNet, x: Tensor) -> bool:
    if model.training or not isinstance(x, Tensor) or x.dim() != 3 or x.device.type != "cpu" \
            or not 1 <= x.shape[0] <= WHOLE_SEQUENCE_MAX_BATCH \
            or not 1 <= x.shape[0] * x.shape[2] <= WHOLE_SEQUENCE_MAX_STEPS \
            or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                           for p in model.parameters())):
        return False
    # Plain twins (fastres.unfuse) stay plain PyTorch; options beyond the stack of blocks
    # (skips, output projection, NLC, ...) are not in the stacked kernel.
    return stack_only_reason(model) is None and all(type(block) is TemporalBlock for block in model.network) \
        and _cpp_unavailable() is None


def _plan_takes(plan: Optional[_Plan], x: Tensor) -> bool:
    return plan is not None and plan.device.type == "cpu" and x.dtype == plan.dtype \
        and x.shape[1] == plan.c_in


def _run_stacked(model: TemporalConvNet, cache: _WholeSequenceCache,
                 x: Tensor) -> Optional[Tensor]:
    """The stacked forward with the model as it is now; None where it no longer streams."""
    plan = cache.plan_for(model)
    return _stacked_forward(plan, x) if _plan_takes(plan, x) else None

