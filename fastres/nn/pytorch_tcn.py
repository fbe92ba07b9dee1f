"""pytorch-tcn's `TCN` <-> fastres.TemporalConvNet(block="pytorch-tcn"): options and keys.

A pytorch-tcn TCN is read by its structure (its blocks' convs, norms, activations and
dropouts, and the options it stores on itself), never by class name alone, so fastres
does not import pytorch-tcn. `tcn_options` gives the TemporalConvNet arguments that
rebuild it, each of pytorch-tcn's options mapped to one fastres argument:

    pytorch-tcn            fastres.TemporalConvNet
    num_inputs             num_inputs
    num_channels           num_channels
    kernel_size            kernel_size
    dilations              dilations (dilation_reset is read back as the dilations it gave)
    dropout                dropout
    causal                 causal
    use_norm               norm: 'batch_norm' -> "batch", 'weight_norm' -> "weight",
                           'layer_norm' -> "layer", None -> None
    activation             activation (the same name or nn.Module class)
    kernel_initializer     kernel_initializer (only at construction: convert copies weights)
    use_skip_connections   skip_connections
    input_shape            input_layout
    embedding_shapes       embedding_shapes
    embedding_mode         embedding_mode
    use_gate               gate
    lookahead              (pytorch-tcn accepts only 0)
    output_projection      output_projection
    output_activation      output_activation

The state_dict keys are pytorch-tcn's, except its streaming buffers (`*.padder.buffer`: the
last inputs of each conv, zero outside its inference=True mode), which fastres keeps in
fastres.stream's state instead. `state_dict_from_pytorch_tcn` drops them and
`state_dict_to_pytorch_tcn` adds them back as zeros, so checkpoints load both ways.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .tcn_block import ACTIVATIONS, _TCNBlockLayout
from .temporal import TemporalConvNet

__all__ = ["is_pytorch_tcn", "tcn_options", "state_dict_from_pytorch_tcn",
           "state_dict_to_pytorch_tcn"]

_NORMS = {"batch_norm": "batch", "weight_norm": "weight", "layer_norm": "layer", None: None}
_TCN_ATTRIBUTES = ("use_skip_connections", "input_shape", "embedding_shapes",
                   "embedding_mode", "use_gate", "causal", "activation", "output_activation",
                   "projection_out", "network")
_BUFFER_SUFFIXES = (".padder.buffer",)


def is_pytorch_tcn(module: nn.Module) -> bool:
    """Whether `module` has pytorch-tcn TCN's structure: its option attributes and a
    ModuleList `network` of blocks with conv1/conv2 (padded by a `padder`) and norm1/norm2."""
    if not all(hasattr(module, name) for name in _TCN_ATTRIBUTES):
        return False
    network = module.network
    return isinstance(network, nn.ModuleList) and len(network) > 0 and all(
        isinstance(getattr(b, "conv1", None), nn.Conv1d)
        and isinstance(getattr(b, "conv2", None), nn.Conv1d)
        and hasattr(b.conv1, "padder") and hasattr(b, "norm1") and hasattr(b, "use_norm")
        for b in network)


def _activation_of(value, option: str):
    """pytorch-tcn's activation argument as fastres's (a name or an nn.Module class)."""
    if value is None or (isinstance(value, str) and value in ACTIVATIONS):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return value
    raise ValueError(f"{option}={value!r}: not a name fastres knows "
                     f"({sorted(ACTIVATIONS)}) nor an nn.Module class")


def tcn_options(model: nn.Module) -> dict:
    """fastres.TemporalConvNet's arguments for a pytorch-tcn TCN (ValueError naming the
    option where fastres cannot rebuild it)."""
    if not is_pytorch_tcn(model):
        raise ValueError("not a pytorch-tcn TCN (expected its option attributes and a "
                         "ModuleList `network` of blocks with conv1/conv2/norm1)")
    blocks = list(model.network)
    first = blocks[0]
    use_norm = first.use_norm
    if use_norm not in _NORMS:
        raise ValueError(f"use_norm={use_norm!r}: fastres runs {sorted(_NORMS, key=str)}")
    for i, b in enumerate(blocks):
        for name in ("conv1", "conv2"):
            conv = getattr(b, name)
            if conv.groups != 1 or conv.stride[0] != 1 or conv.padding_mode != "zeros":
                raise ValueError(f"network.{i}.{name}: grouped, strided or not zero-padded")
            padder = conv.padder
            if getattr(padder, "causal", model.causal) != model.causal:
                raise ValueError(f"network.{i}.{name}: causal differs from the model's")
            if getattr(padder, "pad_len", None) != (conv.kernel_size[0] - 1) * conv.dilation[0]:
                raise ValueError(f"network.{i}.{name}: padding other than (K-1)*dilation")
            if getattr(getattr(padder, "pad", None), "value", 0.0) != 0.0:
                raise ValueError(f"network.{i}.{name}: padding_mode other than zeros")
        if b.use_norm != use_norm:
            raise ValueError(f"network.{i}: use_norm {b.use_norm!r} differs from block 0's")
        if b.conv1.kernel_size != first.conv1.kernel_size:
            raise ValueError(f"network.{i}: kernel_size differs from block 0's")
        if b.dropout1.p != first.dropout1.p or b.dropout2.p != first.dropout1.p:
            raise ValueError(f"network.{i}: dropout differs between blocks or stages")
        if b.conv1.dilation != b.conv2.dilation:
            raise ValueError(f"network.{i}: conv1 and conv2 have different dilations")
        weight_normed = parametrize.is_parametrized(b.conv1, "weight")
        if weight_normed != (use_norm == "weight_norm"):
            raise ValueError(f"network.{i}: weight norm does not match use_norm={use_norm!r}")
    projection = model.projection_out
    return dict(
        num_inputs=first.conv1.in_channels,
        num_channels=[b.conv2.out_channels for b in blocks],
        kernel_size=first.conv1.kernel_size[0],
        dropout=first.dropout1.p,
        dilations=[b.conv1.dilation[0] for b in blocks],
        causal=bool(model.causal),
        norm=_NORMS[use_norm],
        activation=_activation_of(model.activation, "activation"),
        skip_connections=bool(model.use_skip_connections),
        input_layout=model.input_shape,
        embedding_shapes=None if model.embedding_shapes is None else
        [tuple(s) for s in model.embedding_shapes],
        embedding_mode=model.embedding_mode,
        gate=bool(model.use_gate),
        output_projection=None if projection is None else projection.out_channels,
        output_activation=_activation_of(model.output_activation, "output_activation"),
        block="pytorch-tcn")


def state_dict_from_pytorch_tcn(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A pytorch-tcn TCN's state_dict for fastres: its streaming buffers dropped."""
    return {k: v for k, v in state_dict.items() if not k.endswith(_BUFFER_SUFFIXES)}


def state_dict_to_pytorch_tcn(model: TemporalConvNet,
                              state_dict: Optional[Dict[str, Tensor]] = None
                              ) -> Dict[str, Tensor]:
    """A state_dict of `model` (a TemporalConvNet of TCNBlocks) that pytorch-tcn's TCN
    loads strictly: its keys plus a zero streaming buffer (1, C_in, (K-1)*dilation) per conv,
    which is what pytorch-tcn holds outside streaming."""
    if not all(isinstance(b, _TCNBlockLayout) for b in model.network):
        raise ValueError("state_dict_to_pytorch_tcn: the model's blocks are not pytorch-tcn's "
                         "layout (build it with block='pytorch-tcn', or fastres.convert a "
                         "pytorch-tcn TCN)")
    out = dict(model.state_dict() if state_dict is None else state_dict)
    for i, block in enumerate(model.network):
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            ref = conv.bias if conv.bias is not None else next(conv.parameters())
            pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
            out[f"network.{i}.{name}.padder.buffer"] = torch.zeros(
                1, conv.in_channels, pad, dtype=ref.dtype, device=ref.device)
    return out
