"""Temporal convolutional networks: TemporalBlock and TemporalConvNet, fused.

TemporalBlock(norm="batch") is the BatchNorm TCN block

    x -> causal conv1 -> bn1 -> relu -> dropout -> causal conv2 -> bn2 -> (+ res) -> relu
    res = x, or downsample(x) (a 1x1 conv) when the channel counts differ

run as two fastres.conv_bn_relu calls (the second adds the residual before its ReLU).
TemporalBlock(norm="weight") is locuslab/TCN's block (Bai et al. 2018): weight-normed
convs, no batch norm, relu + dropout after each conv, relu(out + res); same submodules,
same state_dict keys and same initialisation, so its checkpoints load strictly.

Each fused module has a plain twin (PlainTemporalBlock, PlainWeightNormTemporalBlock) with
the same attributes and a plain-PyTorch forward; fastres.unfuse swaps to it for export.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .. import dispatch
from ._layout import LayoutIO, check_layout
from ._stage import (FusedModule, RecordsConvGeometry, check_block_args, conv_bn_relu_stage,
                     identity_shortcut_link, padded_conv1d)

__all__ = ["TemporalBlock", "TemporalConvNet", "PlainTemporalBlock",
           "PlainWeightNormTemporalBlock", "Chomp1d", "receptive_field"]

NORMS = ("batch", "weight")


def receptive_field(kernel_size: int, dilations: Sequence[int], convs_per_block: int = 2) -> int:
    """Steps of input one output of a stack of causal dilated convs sees.

    `dilations` has one entry per block, each block holding `convs_per_block` convs with
    that dilation (2 in a TemporalBlock; pass 1 for a plain stack of convs):
    1 + convs_per_block * (kernel_size - 1) * sum(dilations).
    """
    check_block_args(kernel_size, 1)
    for d in dilations:
        check_block_args(kernel_size, d)
    return 1 + convs_per_block * (kernel_size - 1) * sum(dilations)


class Chomp1d(nn.Module):
    """Drops the last `chomp_size` steps: turns a both-sides-padded conv into a causal one.

    locuslab/TCN's module (kept for its layout); chomp_size 0 keeps everything.
    """

    def __init__(self, chomp_size: int):
        super().__init__()
        self.chomp_size = chomp_size

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :x.shape[-1] - self.chomp_size].contiguous()

    def extra_repr(self) -> str:
        return f"chomp_size={self.chomp_size}"


class _TemporalBlockLayout(nn.Module):
    """Constructor and submodules shared by TemporalBlock and its plain twins."""

    def __init__(self, n_inputs: int, n_outputs: int, kernel_size: int, dilation: int = 1, *,
                 stride: int = 1, padding: Optional[int] = None, dropout: float = 0.0,
                 norm: str = "batch", input_layout: str = "NCL"):
        super().__init__()
        check_block_args(kernel_size, dilation, dropout, stride)
        self.input_layout = check_layout(input_layout)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if stride != 1:
            raise ValueError(f"TemporalBlock needs stride=1 (the residual keeps the sequence "
                             f"length, as in locuslab/TCN), got stride={stride}")
        causal_pad = (kernel_size - 1) * dilation
        if isinstance(padding, (tuple, list)) and len(padding) == 1:
            padding = padding[0]
        if padding is not None and padding != causal_pad:
            raise ValueError(
                f"TemporalBlock is always causal: padding must be None or (kernel_size - 1) * "
                f"dilation = {causal_pad} (locuslab/TCN's value), got padding={padding!r}")
        self.norm = norm
        if norm == "batch":
            # The convs carry locuslab's both-sides padding so that conv(x)[..., :L] is the
            # causal output; the block itself pads causally and never uses conv.forward.
            self.conv1 = nn.Conv1d(n_inputs, n_outputs, kernel_size, padding=causal_pad,
                                   dilation=dilation)
            self.bn1 = nn.BatchNorm1d(n_outputs)
            self.dropout = nn.Dropout(dropout)
            self.conv2 = nn.Conv1d(n_outputs, n_outputs, kernel_size, padding=causal_pad,
                                   dilation=dilation)
            self.bn2 = nn.BatchNorm1d(n_outputs)
            self.downsample = nn.Conv1d(n_inputs, n_outputs, 1) if n_inputs != n_outputs \
                else None
        else:
            self._build_locuslab(n_inputs, n_outputs, kernel_size, dilation, causal_pad, dropout)

    def _build_locuslab(self, n_inputs, n_outputs, kernel_size, dilation, causal_pad, dropout):
        # locuslab/TCN's modules, created in its order so that one seed gives one model.
        conv = lambda c_in: weight_norm(nn.Conv1d(  # noqa: E731
            c_in, n_outputs, kernel_size, padding=causal_pad, dilation=dilation))
        self.conv1 = conv(n_inputs)
        self.chomp1 = Chomp1d(causal_pad)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = conv(n_outputs)
        self.chomp2 = Chomp1d(causal_pad)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        # `net` holds the same modules again: locuslab's state_dicts list both key sets.
        self.net = nn.Sequential(self.conv1, self.chomp1, self.relu1, self.dropout1,
                                 self.conv2, self.chomp2, self.relu2, self.dropout2)
        self.downsample = nn.Conv1d(n_inputs, n_outputs, 1) if n_inputs != n_outputs else None
        self.relu = nn.ReLU()
        # locuslab's init_weights. On the weight-normed convs, `weight` is recomputed from
        # weight_g / weight_v (original0 / original1) at every use, so normal_ there writes
        # a temporary and only the downsample's draw takes effect, as in locuslab/TCN. It is
        # kept so that the same seed gives the same parameters as locuslab's code.
        self.conv1.weight.data.normal_(0, 0.01)
        self.conv2.weight.data.normal_(0, 0.01)
        if self.downsample is not None:
            self.downsample.weight.data.normal_(0, 0.01)

    def extra_repr(self) -> str:
        conv = self.conv1
        layout = "" if self.input_layout == "NCL" else f", input_layout={self.input_layout!r}"
        return (f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size[0]}, "
                f"dilation={conv.dilation[0]}, norm={self.norm!r}{layout}")

    def forward(self, x: Tensor) -> Tensor:
        # (B, L, C) in and out with input_layout="NLC"; forward_ncl is the block itself.
        if self.input_layout == "NLC":
            if x.dim() != 3:
                raise ValueError("input_layout='NLC' expects a 3D input (B, L, C)")
            return self.forward_ncl(x.transpose(1, 2)).transpose(1, 2)
        return self.forward_ncl(x)

    def forward_ncl(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class PlainTemporalBlock(RecordsConvGeometry, _TemporalBlockLayout):
    """TemporalBlock(norm="batch") in plain PyTorch (what fastres.unfuse returns)."""

    def forward_ncl(self, x: Tensor) -> Tensor:
        (k1, s1, d1), (k2, s2, d2) = self.geometry
        h = padded_conv1d(x, self.conv1.weight, self.conv1.bias, k1, s1, d1, True)
        h = self.dropout(F.relu(self.bn1(h)))
        out = self.bn2(padded_conv1d(h, self.conv2.weight, self.conv2.bias, k2, s2, d2, True))
        if self.downsample is not None:
            return F.relu(out + self.downsample(x))
        return F.relu(out + x)


class PlainWeightNormTemporalBlock(_TemporalBlockLayout):
    """TemporalBlock(norm="weight") in plain PyTorch: locuslab/TCN's forward."""

    def forward_ncl(self, x: Tensor) -> Tensor:
        out = self.net(x)
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res)


class TemporalBlock(LayoutIO, FusedModule, _TemporalBlockLayout):
    """Causal residual TCN block; both conv -> norm -> ReLU stages fused.

    Args:
        n_inputs, n_outputs: channels in and out.
        kernel_size, dilation: of both convs (causal: left-padded by (kernel_size-1)*dilation).
        stride: must be 1 (accepted for locuslab/TCN's call).
        padding: None, or (kernel_size-1)*dilation as locuslab/TCN passes it; anything else
            raises (the block is always causal).
        dropout: after the first stage (norm="batch"); after both stages (norm="weight").
        norm: "batch" (BatchNorm1d after each conv) or "weight" (locuslab/TCN's block).
        input_layout: "NCL" (default) or "NLC": (B, L, n_inputs) -> (B, L, n_outputs), the
            stages run on the transposed view (fastres/nn/_layout.py).

    Input (B, n_inputs, L) -> output (B, n_outputs, L).
    """

    PLAIN_TWINS = (PlainTemporalBlock, PlainWeightNormTemporalBlock)

    def plain_twin(self) -> type:
        return PlainTemporalBlock if self.norm == "batch" else PlainWeightNormTemporalBlock

    def fused_forward(self, x: Tensor) -> Tensor:
        res = x if self.downsample is None else self.downsample(x)
        link = identity_shortcut_link(x, res)
        if self.norm == "batch":
            h = self.dropout(conv_bn_relu_stage(x, self.conv1, self.bn1, "causal",
                                                residual_grad_link=link))
            return conv_bn_relu_stage(h, self.conv2, self.bn2, "causal", residual=res,
                                      residual_grad_link=link)
        if self.training and self.dropout2.p > 0:
            # Dropout sits between relu(conv2) and the add: the add cannot be fused here.
            h = self.dropout1(conv_bn_relu_stage(x, self.conv1, None, "causal"))
            out = self.dropout2(conv_bn_relu_stage(h, self.conv2, None, "causal"))
            return F.relu(out + res)
        h = self.dropout1(conv_bn_relu_stage(x, self.conv1, None, "causal",
                                             residual_grad_link=link))
        return conv_bn_relu_stage(h, self.conv2, None, "causal", residual=res,
                                  relu_before_add=True, residual_grad_link=link)


class TemporalConvNet(nn.Module):
    """locuslab/TCN's TemporalConvNet of fused TemporalBlocks.

    Level i is a TemporalBlock with dilation 2**i from num_channels[i-1] (num_inputs for
    i = 0) to num_channels[i] channels. `block_kw` goes to every block (e.g. norm="weight"
    for locuslab's weight-normed network, whose state_dicts then load strictly).
    """

    __jit_unused_properties__ = ["receptive_field"]

    def __init__(self, num_inputs: int, num_channels: Sequence[int], kernel_size: int = 2,
                 dropout: float = 0.2, **block_kw):
        super().__init__()
        if len(num_channels) == 0:
            raise ValueError("num_channels must list at least one level")
        layers: List[nn.Module] = []
        for i, out_channels in enumerate(num_channels):
            in_channels = num_inputs if i == 0 else num_channels[i - 1]
            layers.append(TemporalBlock(in_channels, out_channels, kernel_size,
                                        dilation=2 ** i, dropout=dropout, **block_kw))
        self.network = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Input steps each output step sees, from the blocks' actual convs."""
        return 1 + sum((conv.kernel_size[0] - 1) * conv.dilation[0]
                       for block in self.network for conv in (block.conv1, block.conv2))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.network(x)
        return self._dispatched_forward(x)

    @torch.jit.unused
    def _dispatched_forward(self, x: Tensor) -> Tensor:
        # How the blocks run is the module level's choice (fastres/dispatch/module.py):
        # plain, stage by stage, all on one backend, or the whole stack in one call.
        return dispatch.module.run(self, x)

    def fused_forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        # The blocks follow the enclosing policy (plain: each its plain twin).
        return self.network(x)

    def dispatch_candidates(self, x: Tensor) -> Dict[str, Callable[[Tensor], Optional[Tensor]]]:
        """Whole-network paths the module level may time against the blocks: each returns
        model(x), or None where it cannot run this input or this model as it is now."""
        return {name: functools.partial(path, self) for name, path in _WHOLE_NETWORK_PATHS.items()
                if path(self, None) is not False}


# Paths that may run a whole TemporalConvNet forward at once, by name: path(model, x) returns
# model(x), or None where it cannot; path(model, None) returns False where it can never
# run for this model. fastres/stream registers its stacked C++ kernel as "stack": it builds
# on this module, so this module cannot import it.
_WHOLE_NETWORK_PATHS: Dict[str, Callable[[TemporalConvNet, Optional[Tensor]], object]] = {}


def register_whole_network_path(name: str):
    """Decorator: let `path(model, x)` be the module level's candidate `name`."""
    def register(path):
        _WHOLE_NETWORK_PATHS[name] = path
        return path
    return register
