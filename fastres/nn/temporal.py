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

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .. import dispatch
from ._layout import LayoutIO, check_layout
from ._stage import (FusedModule, RecordsConvGeometry, check_block_args, conv_bn_relu_stage,
                     identity_shortcut_link, padded_conv1d)
from .tcn_block import TCNBlock, activation_module, check_activation, kernel_initializer_call

__all__ = ["TemporalBlock", "TemporalConvNet", "PlainTemporalBlock",
           "PlainWeightNormTemporalBlock", "Chomp1d", "receptive_field", "dilation_schedule",
           "stack_only_reason"]

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


INPUT_LAYOUTS = ("NCL", "NLC")


def dilation_schedule(levels: int, dilations: Optional[Sequence[int]] = None,
                      dilation_reset: Optional[int] = None) -> List[int]:
    """Each level's dilation: `dilations` as given, else 2**i, restarting at 1 after the
    level whose dilation is `dilation_reset` (pytorch-tcn's rule: 2**(i % log2(2 * reset)),
    so dilation_reset=4 gives 1, 2, 4, 1, 2, 4, ...)."""
    if dilations is not None:
        if dilation_reset is not None:
            raise ValueError("dilations and dilation_reset: pass one of them (dilations lists "
                             "every level's dilation already)")
        dilations = list(dilations)
        if len(dilations) != levels:
            raise ValueError(f"dilations lists {len(dilations)} levels, num_channels "
                             f"{levels}")
        return dilations
    if dilation_reset is None:
        return [2 ** i for i in range(levels)]
    if isinstance(dilation_reset, bool) or not isinstance(dilation_reset, int) \
            or dilation_reset < 1:
        raise ValueError(f"dilation_reset must be an int >= 1, got {dilation_reset!r}")
    period = int(math.log2(dilation_reset * 2))
    return [2 ** (i % period) for i in range(levels)]


class TemporalConvNet(nn.Module):
    """A TCN: one residual block per level, fused; locuslab/TCN's and pytorch-tcn's options.

    With the defaults this is locuslab/TCN's TemporalConvNet of fused TemporalBlocks: level
    i is a TemporalBlock with dilation 2**i from num_channels[i-1] (num_inputs for i = 0)
    to num_channels[i] channels; `norm="weight"` gives locuslab's weight-normed network,
    whose state_dicts then load strictly.

    The other arguments are pytorch-tcn's `TCN` options (its name in brackets), which
    `fastres.convert` maps from a pytorch-tcn model:

        dilations, dilation_reset  [same]: each level's dilation, or 2**i restarting after
            dilation_reset (dilation_schedule).
        causal  [causal]: False pads "same" (centred) instead of on the left.
        norm  [use_norm]: "batch" (default), "weight" (weight-normed convs), "layer"
            (LayerNorm over channels at each step) or None.
        activation  [activation]: a name in fastres.nn.tcn_block.ACTIVATIONS or an nn.Module
            class; used after each conv and after the residual add.
        kernel_initializer  [kernel_initializer]: None (PyTorch's init) or pytorch-tcn's
            names, with its gains.
        skip_connections  [use_skip_connections]: WaveNet-style skips: every level's
            pre-residual output (1x1-projected to the last width where it differs) summed
            with the last level's output, then the activation.
        input_layout  [input_shape]: "NCL" or "NLC" (the input and output are (B, L, C);
            the blocks take a transposed view, never a copy).
        embedding_shapes, embedding_mode  [same]: conditioning inputs passed as
            forward(x, embeddings), each (channels,) or (channels, steps), projected and
            added ("add") or concatenated ("concat") after every level's first norm.
        gate  [use_gate]: gated first stage (2n channels, then nn.GLU).
        output_projection, output_activation  [same]: a final 1x1 conv to that many
            channels, then that activation.
        block: which block each level is. None picks TemporalBlock where the options
            allow it (relu, batch or weight norm, causal, no gate, conditioning, skips or
            kernel_initializer) and TCNBlock (pytorch-tcn's layout, fastres/nn/tcn_block.py)
            otherwise; "temporal" or "pytorch-tcn" ask for one. The two differ with batch
            norm: TemporalBlock computes relu(bn2(conv2) + res), pytorch-tcn
            act(act(norm2(conv2)) + res).

    pytorch-tcn's `lookahead` exists only as 0 there: lookahead=0 is accepted, any other
    value refused. Its buffered
    streaming (forward(..., inference=True)) is fastres.stream(model), for networks whose
    forward is the stack of blocks alone (see stack_only_reason). `block_kw` goes to every
    TemporalBlock (e.g. stride/padding as locuslab passes them).
    """

    __jit_unused_properties__ = ["receptive_field", "block_type"]

    def __init__(self, num_inputs: int, num_channels: Sequence[int], kernel_size: int = 2,
                 dropout: float = 0.2, *, norm: Optional[str] = "batch",
                 dilations: Optional[Sequence[int]] = None,
                 dilation_reset: Optional[int] = None, causal: bool = True,
                 activation="relu", kernel_initializer: Optional[str] = None,
                 skip_connections: bool = False, input_layout: str = "NCL",
                 embedding_shapes: Optional[Sequence[Sequence[int]]] = None,
                 embedding_mode: str = "add", gate: bool = False,
                 output_projection: Optional[int] = None, output_activation=None,
                 block: Optional[str] = None, **block_kw):
        super().__init__()
        if len(num_channels) == 0:
            raise ValueError("num_channels must list at least one level")
        if block_kw.pop("lookahead", 0) != 0:
            raise ValueError("lookahead: pytorch-tcn accepts only 0 (it is deprecated there); "
                             "fastres has no lookahead, leave it out")
        if input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got "
                             f"{input_layout!r}")
        for name, value in (("causal", causal), ("gate", gate),
                            ("skip_connections", skip_connections)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if output_activation is not None:
            check_activation(output_activation, "output_activation")
        if output_projection is not None and (isinstance(output_projection, bool) or not
                                              isinstance(output_projection, int)
                                              or output_projection < 1):
            raise ValueError(f"output_projection must be None or an int >= 1, got "
                             f"{output_projection!r}")
        dilation_list = dilation_schedule(len(num_channels), dilations, dilation_reset)
        needs_tcn_block = [name for name, needed in (
            ("norm=" + repr(norm), norm not in NORMS), ("activation=" + repr(activation),
                                                        activation != "relu"),
            ("causal=False", not causal), ("gate=True", gate),
            ("embedding_shapes", embedding_shapes is not None),
            ("skip_connections=True", skip_connections),
            ("kernel_initializer=" + repr(kernel_initializer), kernel_initializer is not None))
            if needed]
        if block is None:
            block = "pytorch-tcn" if needs_tcn_block else "temporal"
        if block not in ("temporal", "pytorch-tcn"):
            raise ValueError(f"block must be None, 'temporal' or 'pytorch-tcn', got "
                             f"{block!r}")
        if block == "temporal" and needs_tcn_block:
            raise ValueError(f"block='temporal' (TemporalBlock) cannot take "
                             f"{', '.join(needs_tcn_block)}: use block='pytorch-tcn' or None")
        if block == "pytorch-tcn" and block_kw:
            raise ValueError(f"block='pytorch-tcn' takes no TemporalBlock arguments "
                             f"({', '.join(sorted(block_kw))})")
        self.input_layout = input_layout
        self.skip_connections = bool(skip_connections)
        self.embedding_shapes = embedding_shapes
        tcn_kw = dict(dropout=dropout, causal=causal, norm=norm, activation=activation,
                      kernel_initializer=kernel_initializer,
                      embedding_shapes=embedding_shapes, embedding_mode=embedding_mode,
                      gate=gate)
        # pytorch-tcn creates the skip projections before the blocks: same order, same draws.
        if skip_connections:
            self.downsample_skip_connection = nn.ModuleList(
                nn.Conv1d(c, num_channels[-1], 1) if c != num_channels[-1] else None
                for c in num_channels)
            if kernel_initializer is not None:
                init, kwargs = kernel_initializer_call(kernel_initializer, activation)
                for conv in self.downsample_skip_connection:
                    if conv is not None:
                        init(conv.weight, **kwargs)
            self.activation_skip_out = activation_module(activation)
        else:
            self.downsample_skip_connection = None
        layers: List[nn.Module] = []
        for i, out_channels in enumerate(num_channels):
            in_channels = num_inputs if i == 0 else num_channels[i - 1]
            if block == "temporal":
                layers.append(TemporalBlock(in_channels, out_channels, kernel_size,
                                            dilation=dilation_list[i], dropout=dropout,
                                            norm=norm, **block_kw))
            else:
                layers.append(TCNBlock(in_channels, out_channels, kernel_size,
                                       dilation=dilation_list[i], **tcn_kw))
        self.network = nn.Sequential(*layers)
        self.projection_out = None if output_projection is None else \
            nn.Conv1d(num_channels[-1], output_projection, 1)
        self.activation_out = None if output_activation is None else \
            activation_module(output_activation)
        # Whether forward is self.network(x) alone: the whole-network paths and
        # fastres.stream run only such networks.
        self.stack_only = stack_only_reason(self) is None
        # Whether forward is the blocks with skip connections alone (NCL, no conditioning
        # or output projection): in training the module level then chooses how it runs,
        # as for a stack (fused_forward and plain_forward run the skips).
        self.skips_only = skips_only(self)

    @property
    def receptive_field(self) -> int:
        """Input steps each output step sees, from the blocks' actual convs."""
        return 1 + sum((conv.kernel_size[0] - 1) * conv.dilation[0]
                       for block in self.network for conv in (block.conv1, block.conv2))

    @property
    def block_type(self) -> type:
        return type(self.network[0])

    def forward(self, x: Tensor, embeddings: Optional[List[Tensor]] = None) -> Tensor:
        if torch.jit.is_scripting():
            if not self.stack_only:
                raise RuntimeError("TorchScript runs a TemporalConvNet whose forward is its "
                                   "stack of blocks alone; trace this one (torch.jit.trace) "
                                   "instead")
            return self.network(x)
        if embeddings is not None or not (self.stack_only
                                          or (self.skips_only and self.training)):
            # Each block is then the outermost fused module of its own choice. (A skip
            # network's one whole-network path is the training program; in eval the module
            # level would only add its measurement to the stages' own choices.)
            return self._forward_with_options(x, embeddings)
        return self._dispatched_forward(x)

    @torch.jit.unused
    def _dispatched_forward(self, x: Tensor) -> Tensor:
        # How the blocks run is the module level's choice (fastres/dispatch/module.py):
        # plain, stage by stage, all on one backend, or the whole stack in one call.
        # Blocks that are all plain twins (fastres.unfuse) leave nothing to choose: measuring
        # would time the same plain network under every policy name.
        if not any(isinstance(block, FusedModule) for block in self.network):
            return self.plain_forward(x)
        return dispatch.module.run(self, x)

    def fused_forward(self, x: Tensor) -> Tensor:
        if self.skip_connections:
            return self._skip_forward(x, None, fused=True)
        return self.network(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        # The blocks follow the enclosing policy (plain: each its plain twin); the skip
        # network's blocks return two tensors and are called past their forward, so the
        # plain policy asks them for their plain computation itself.
        if self.skip_connections:
            return self._skip_forward(x, None, fused=False)
        return self.network(x)

    def _skip_forward(self, x: Tensor, embeddings, fused: bool) -> Tensor:
        """The blocks with WaveNet-style skips, on (B, C, L): every level's pre-residual
        output (projected where its width differs) summed with the last level's output."""
        skips = []
        last = len(self.network) - 1
        for i, block in enumerate(self.network):
            x, out = block.forward_with_skip(x, embeddings) if fused else \
                block.compute_with_skip(x, embeddings, fused=False)
            projection = self.downsample_skip_connection[i]
            if i < last:  # the last level contributes its output, not its skip
                skips.append(out if projection is None else projection(out))
        return self.activation_skip_out(torch.stack(skips + [x]).sum(0))

    def _forward_with_options(self, x: Tensor, embeddings=None) -> Tensor:
        if self.input_layout == "NLC":
            x = x.transpose(1, 2)  # a view: the blocks take channels-strided input
        if embeddings is not None and self.embedding_shapes is None:
            raise ValueError("embeddings were passed to a TemporalConvNet built without "
                             "embedding_shapes")
        if self.skip_connections:
            x = self._skip_forward(x, embeddings, fused=True)
        elif embeddings is not None:
            for block in self.network:
                x = block(x, embeddings)
        else:
            x = self.network(x)
        if self.projection_out is not None:
            x = self.projection_out(x)
        if self.activation_out is not None:
            x = self.activation_out(x)
        if self.input_layout == "NLC":
            x = x.transpose(1, 2)
        return x


def _options_beyond_the_stack(model: TemporalConvNet) -> List[str]:
    """The options that add to model's stack of blocks in its forward, by name."""
    return [name for name, used in (
        ("input_layout='NLC'", model.input_layout != "NCL"),
        ("skip_connections", model.skip_connections),
        ("embedding_shapes", model.embedding_shapes is not None),
        ("output_projection", model.projection_out is not None),
        ("output_activation", model.activation_out is not None)) if used]


def stack_only_reason(model: TemporalConvNet) -> Optional[str]:
    """None where model's forward is its stack of blocks alone, else which options add to it
    (what fastres.stream and the whole-network paths refuse)."""
    extra = _options_beyond_the_stack(model)
    return ", ".join(extra) + " beyond the stack of blocks" if extra else None


def skips_only(model: TemporalConvNet) -> bool:
    """Whether model's forward is its blocks with skip connections and nothing else."""
    return _options_beyond_the_stack(model) == ["skip_connections"]
