"""Streaming ONNX export: one step (or a chunk of `chunk` steps) with the state as explicit
inputs and outputs, for runtimes outside Python (onnxruntime in a C++ service, a phone, a
browser).

    s = fastres.stream(model)
    s.export_onnx("step.onnx", chunk=1)
    inputs:  x (B, C_in) for chunk=1, else (B, C_in, chunk); then state_0, state_1, ...
    outputs: y (B, C_out) for chunk=1, else (B, C_out, chunk); then new_state_0, ...

The state layout (the model's order, oldest input first): for every residual block whose
convs look back ((K-1)*d > 0), two tensors,
    its input's last (K-1)*d steps         (B, C_in,  (K-1)*d)   (conv1's history)
    its h = relu(conv1)'s last (K-1)*d     (B, C_out, (K-1)*d)   (conv2's history)
1x1 convs and ReLUs keep nothing. All zeros is the zero state (the causal padding); feed
each step's new_state_i back as state_i. B is dynamic; the chunk length is fixed at export.
Stream.onnx_state() gives a stream's current state in this layout (zeros after reset), so
an ONNX run can continue from any saved state.

The exported graph is plain ONNX (Conv, Concat, Slice, Relu, Add) in the compute dtype
(float32; float64 for float64 models), batch norm folded into the convs. A shift register
rather than the kernels' ring buffers: ONNX has no in-place update, and a concatenation
then a slice is what its runtimes run well.
"""
from __future__ import annotations

import os
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import StreamError
from .layout import BLOCK, POINTWISE, RELU
from .plan import Plan


def history_shapes(plan: Plan, batch: int) -> List[Tuple[int, int, int]]:
    """The shapes of the ONNX state tensors, in order (the module docstring's layout)."""
    shapes = []
    for layer in plan.layers:
        past = (layer.taps - 1) * layer.dilation
        if layer.kind == BLOCK and past > 0:
            shapes += [(batch, layer.c_in, past), (batch, layer.c_out, past)]
    return shapes


def history_state(plan: Plan, state: Tensor, position: int, batch: int) -> List[Tensor]:
    """The ONNX state equal to the kernels' ring `state` (layout.py) after `position` steps."""
    histories = []
    for layer, (ring_in, ring_mid) in zip(plan.layers, plan.rings(state, batch)):
        past = (layer.taps - 1) * layer.dilation
        if layer.kind != BLOCK or past == 0:
            continue
        # The input of time t sits in slot t mod slots; times before 0 hit never-written
        # (zero) slots, as the causal padding.
        slots = torch.arange(position - past, position, device=state.device) % layer.slots
        for ring in (ring_in, ring_mid):
            histories.append(ring[slots].permute(1, 2, 0).contiguous())
    return histories


class StepModule(nn.Module):
    """forward(x, *state) -> (y, *new_state): the plan's step in plain PyTorch ops that
    export to ONNX (what export_onnx exports; also runnable as is)."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.kinds, self.pasts, self.dilations, self.relu_before_add = [], [], [], []
        for i, (layer, convs) in enumerate(zip(plan.layers, plan.cast_convs())):
            self.kinds.append(layer.kind)
            self.pasts.append((layer.taps - 1) * layer.dilation)
            self.dilations.append(layer.dilation)
            self.relu_before_add.append(layer.relu_before_add)
            for name, conv in zip(("conv1", "conv2", "down"), convs):
                if conv is not None:
                    self.register_buffer(f"w{i}_{name}", conv.weight.clone())
                    self.register_buffer(f"b{i}_{name}", conv.bias.clone())

    def _conv(self, i: int, name: str, x: Tensor, dilation: int = 1) -> Tensor:
        return F.conv1d(x, getattr(self, f"w{i}_{name}"), getattr(self, f"b{i}_{name}"),
                        dilation=dilation)

    def forward(self, x: Tensor, *state: Tensor):
        single = x.dim() == 2
        h = x.unsqueeze(-1) if single else x
        new_state, k = [], 0
        for i, kind in enumerate(self.kinds):
            if kind == RELU:
                h = torch.relu(h)
            elif kind == POINTWISE:
                h = self._conv(i, "conv1", h)
            else:
                past, dilation = self.pasts[i], self.dilations[i]
                full = h
                if past > 0:
                    full = torch.cat([state[k], h], dim=-1)
                    new_state.append(full[..., -past:])
                a = torch.relu(self._conv(i, "conv1", full, dilation))
                full_a = a
                if past > 0:
                    full_a = torch.cat([state[k + 1], a], dim=-1)
                    new_state.append(full_a[..., -past:])
                    k += 2
                z = self._conv(i, "conv2", full_a, dilation)
                res = self._conv(i, "down", h) if hasattr(self, f"w{i}_down") else h
                if self.relu_before_add[i]:
                    z = torch.relu(z)
                h = torch.relu(z + res)
        y = h.squeeze(-1) if single else h
        return (y, *new_state)


def export_onnx(plan: Plan, path: Union[str, os.PathLike], chunk: int = 1,
                batch_size: int = 1) -> None:
    """Write the ONNX model of one step (chunk=1) or of a chunk of `chunk` steps to `path`
    (the module docstring states its inputs, outputs and state layout)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise StreamError(f"fastres.stream: export_onnx's chunk must be an int >= 1, got "
                          f"{chunk!r}")
    module = StepModule(plan).to("cpu").eval()
    dtype = plan.compute_dtype
    example_batch = max(2, batch_size)   # 1 would be specialized away
    x = torch.zeros((example_batch, plan.c_in) + ((chunk,) if chunk > 1 else ()), dtype=dtype)
    state = [torch.zeros(shape, dtype=dtype) for shape in history_shapes(plan, example_batch)]
    names = [f"state_{i}" for i in range(len(state))]
    batch = torch.export.Dim("batch", min=1)
    dynamic = {"x": {0: batch}, "state": tuple({0: batch} for _ in state)}
    with torch.no_grad():
        program = torch.onnx.export(
            module, (x, *state), dynamo=True, dynamic_shapes=dynamic,
            input_names=["x"] + names, output_names=["y"] + [f"new_{n}" for n in names],
            verbose=False)
    program.save(os.fspath(path))
