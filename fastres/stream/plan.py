"""Packing: a folded model as the buffers the stream kernels read (layout.py states them).

Plan(model) folds the model (fold.py) and packs its convs into one weights buffer of the
compute dtype (float32; float64 for float64 models) on the model's device; meta(batch) is
the int64 layer table for `batch` streams (it holds the state offsets, which depend on the
batch size) and state_size(batch) the length of the flat state.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import StreamError
from .fold import FoldedConv, fold
from .layout import (ALIGN, BLOCK, F_BD, F_KIND, F_RELU_BEFORE_ADD, F_RING_MID, F_W1,
                     META_FIELDS, META_VERSION, aligned)

class Plan:
    """A model folded and packed for the stream kernels (one per stream, rebuilt by refold).

    weights: every conv as K taps of W_k[C_in][C_out] then its bias, in one contiguous
    buffer of the compute dtype on the model's device; `meta(batch)` the int64 layer table
    the kernels read (it holds the state offsets, which depend on the batch size).
    """

    def __init__(self, model: nn.Module, weight_dtype: Optional[torch.dtype] = None):
        self.layers = fold(model)
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
        # The bf16 weights single steps compute with on the cpp backend (csrc/cpu/
        # stream_cpu.cpp, "bf16 weights"), or None: float32 weights everywhere.
        self.weight_dtype = weight_dtype if weight_dtype == torch.bfloat16 else None
        if weight_dtype not in (None, torch.bfloat16, self.compute_dtype):
            raise StreamError(f"fastres.stream: weight_dtype must be None or torch.bfloat16, "
                              f"got {weight_dtype}")
        if self.weight_dtype is not None and self.compute_dtype != torch.float32:
            raise StreamError("fastres.stream: bf16 weights serve float32 and 16-bit models "
                              "only (a float64 model computes in float64)")
        self.weights16 = self._pack_bf16() if self.weight_dtype is not None else None
        self._metas: Dict[int, Tensor] = {}
        self._cast: Optional[List[Tuple[Optional[FoldedConv], ...]]] = None
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
            pad = -flat.numel() % ALIGN
            chunks.append(torch.cat([flat, flat.new_zeros(pad)]))
            offset += flat.numel() + pad
            return start

        def taps(conv: Optional[FoldedConv]) -> Optional[Tensor]:
            return None if conv is None else conv.weight.permute(2, 1, 0).contiguous()

        for layer in self.layers:
            self.offsets.append({
                "w1": add(taps(layer.conv1)), "b1": add(layer.conv1 and layer.conv1.bias),
                "w2": add(taps(layer.conv2)), "b2": add(layer.conv2 and layer.conv2.bias),
                "wd": add(taps(layer.downsample)),
                "bd": add(layer.downsample and layer.downsample.bias)})
        self.weights = torch.cat(chunks).to(device=self.device, dtype=self.compute_dtype)

    def _pack_bf16(self) -> Tensor:
        """The bf16 weights: each conv's K taps as one (K*C_in, C_out) matrix (rows (k, c_in),
        as the float32 taps), rows in pairs interleaved per output channel
        ([rows/2][C_out][2], a zero row added to an odd count), at twice the conv's float32
        offset: the same byte offset, so as aligned (half the buffer is unused)."""
        packed = torch.zeros(2 * self.weights.numel(), dtype=torch.bfloat16)
        for layer, off in zip(self.layers, self.offsets):
            for conv, key in ((layer.conv1, "w1"), (layer.conv2, "w2"),
                              (layer.downsample, "wd")):
                if conv is None or off[key] < 0:
                    continue
                c_out, c_in, taps = conv.weight.shape
                rows = conv.weight.permute(2, 1, 0).reshape(taps * c_in, c_out)
                if rows.shape[0] % 2:
                    rows = torch.cat([rows, rows.new_zeros(1, c_out)])
                pairs = rows.reshape(-1, 2, c_out).permute(0, 2, 1).reshape(-1)
                start = 2 * off[key]
                packed[start:start + pairs.numel()] = pairs.to(torch.bfloat16)
        return packed.to(self.device)

    def ring_offsets(self, batch: int) -> Tuple[List[Tuple[int, int]], int]:
        """Per layer (input ring offset, h ring offset or -1) in the state; the state size."""
        rings, offset = [], 0
        for layer in self.layers:
            ring_in = offset
            offset += aligned(layer.slots * batch * layer.c_in)
            ring_mid = -1
            if layer.kind == BLOCK:
                ring_mid = offset
                offset += aligned(layer.slots * batch * layer.c_out)
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


    def rings(self, state: Tensor, batch: int) -> List[Tuple[Tensor, Optional[Tensor]]]:
        """Per layer, (its input ring, a block's h ring or None) as (slots, B, C) views of
        the flat `state` of `batch` streams."""
        views = []
        for layer, (ring_in, ring_mid) in zip(self.layers, self.ring_offsets(batch)[0]):
            def view(offset, channels):
                if offset < 0:
                    return None
                size = layer.slots * batch * channels
                return state[offset:offset + size].view(layer.slots, batch, channels)
            views.append((view(ring_in, layer.c_in), view(ring_mid, layer.c_out)))
        return views

    def cast_convs(self) -> List[Tuple[Optional[FoldedConv], ...]]:
        """Per layer (conv1, conv2, downsample) in the compute dtype on the device (cached):
        what the pure-PyTorch step (core.step_ref) and the ONNX export compute with."""
        if self._cast is None:
            def cast(conv: Optional[FoldedConv]) -> Optional[FoldedConv]:
                return None if conv is None else FoldedConv(
                    conv.weight.to(self.device, self.compute_dtype),
                    conv.bias.to(self.device, self.compute_dtype), conv.dilation)
            self._cast = [(cast(layer.conv1), cast(layer.conv2), cast(layer.downsample))
                          for layer in self.layers]
        return self._cast
