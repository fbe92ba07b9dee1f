"""1D ResNets: BasicBlock and ResNet1d (a 1D ResNet-18 for time series), fused.

BasicBlock is torchvision's BasicBlock in 1D,

    x -> conv1 (stride s) -> bn1 -> relu -> conv2 -> bn2 -> (+ identity) -> relu
    identity = x, or downsample(x) (1x1 conv with stride s -> BN) when the shape changes

run as two fastres.conv_bn_relu calls. Submodule names and state_dict keys are
torchvision's (conv1, bn1, conv2, bn2, downsample.0, downsample.1; conv1, bn1, layer1..4,
fc for the network), so weights of a 1D port of torchvision's ResNet load strictly.
Padding is "same" (torchvision's padding for odd kernels) or causal.

PlainBasicBlock / PlainResNet1d are the plain-PyTorch twins fastres.unfuse swaps in.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import LayoutIO, check_layout
from ..upstream_kernels import plain_convs_are_routed
from ._stage import (FusedModule, RecordsConvGeometry, check_block_args, conv_bn_relu_stage,
                     identity_shortcut_link, padded_conv1d, projected)

__all__ = ["BasicBlock", "ResNet1d", "PlainBasicBlock", "PlainResNet1d"]


class _BasicBlockLayout(nn.Module):
    """Constructor and submodules shared by BasicBlock and PlainBasicBlock."""

    expansion = 1  # torchvision's attribute, read by code that builds ResNets from blocks

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 downsample: Union[None, str, nn.Module] = None, *, kernel_size: int = 3,
                 dilation: int = 1, causal: bool = False, input_layout: str = "NCL"):
        super().__init__()
        check_block_args(kernel_size, dilation, stride=stride)
        self.input_layout = check_layout(input_layout)
        shape_changes = stride != 1 or in_channels != out_channels
        if isinstance(downsample, str):
            if downsample != "auto":
                raise ValueError(f"downsample must be None, 'auto' or a module, "
                                 f"got {downsample!r}")
            downsample = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm1d(out_channels)) if shape_changes else None
        elif downsample is None and shape_changes:
            raise ValueError(
                f"BasicBlock({in_channels}, {out_channels}, stride={stride}) changes the shape, "
                "so the identity cannot be added: pass downsample='auto' (1x1 conv + BN "
                "projection) or a downsample module")
        elif downsample is not None and not isinstance(downsample, nn.Module):
            raise ValueError(f"downsample must be None, 'auto' or a module, "
                             f"got {type(downsample).__name__}")
        self.causal = bool(causal)
        pad = 0 if causal else (kernel_size - 1) * dilation // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                               padding=pad, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, padding=pad,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.downsample = downsample
        self.stride = stride

    def extra_repr(self) -> str:
        conv = self.conv1
        return (f"{conv.in_channels}, {conv.out_channels}, stride={conv.stride[0]}, "
                f"kernel_size={conv.kernel_size[0]}, dilation={conv.dilation[0]}, "
                f"causal={self.causal}"
                + ("" if self.input_layout == "NCL" else f", input_layout={self.input_layout!r}"))

    def forward(self, x: Tensor) -> Tensor:
        # (B, L, C) in and out with input_layout="NLC"; forward_ncl is the block itself.
        if self.input_layout == "NLC":
            if x.dim() != 3:
                raise ValueError("input_layout='NLC' expects a 3D input (B, L, C)")
            return self.forward_ncl(x.transpose(1, 2)).transpose(1, 2)
        return self.forward_ncl(x)

    def forward_ncl(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class PlainBasicBlock(RecordsConvGeometry, _BasicBlockLayout):
    """BasicBlock in plain PyTorch (what fastres.unfuse returns); scriptable."""

    def forward_ncl(self, x: Tensor) -> Tensor:
        (k1, s1, d1), (k2, s2, d2) = self.geometry
        h = padded_conv1d(x, self.conv1.weight, self.conv1.bias, k1, s1, d1, self.causal)
        h = F.relu(self.bn1(h))
        out = self.bn2(padded_conv1d(h, self.conv2.weight, self.conv2.bias, k2, s2, d2,
                                     self.causal))
        if self.downsample is not None:
            if not torch.jit.is_scripting():
                if plain_convs_are_routed():  # (a fused block's plain path: _stage.projected)
                    return F.relu(out + projected(self.downsample, x))
            return F.relu(out + self.downsample(x))
        return F.relu(out + x)


class BasicBlock(LayoutIO, FusedModule, _BasicBlockLayout):
    """1D ResNet basic block with both conv -> BN -> ReLU stages fused.

    Args (positional order as torchvision's BasicBlock):
        in_channels, out_channels: channels in and out.
        stride: of conv1 (and of the projection).
        downsample: None (identity; the shape must not change), "auto" (a 1x1 conv + BN
            projection when stride != 1 or the channel count changes), or a module.
        kernel_size, dilation: of both convs.
        causal: causal padding instead of "same".
        input_layout: "NCL" (default) or "NLC": (B, L, in_channels) -> (B, L_out,
            out_channels), the stages run on the transposed view (fastres/nn/_layout.py).

    Input (B, in_channels, L) -> output (B, out_channels, L_out), L_out the length a
    "same"- or causally-padded conv with that stride gives (L for stride 1).
    """

    PLAIN_TWINS = (PlainBasicBlock,)

    def fused_forward(self, x: Tensor) -> Tensor:
        padding = "causal" if self.causal else "same"
        identity = x if self.downsample is None else projected(self.downsample, x)
        link = identity_shortcut_link(x, identity)
        h = conv_bn_relu_stage(x, self.conv1, self.bn1, padding, residual_grad_link=link)
        return conv_bn_relu_stage(h, self.conv2, self.bn2, padding, residual=identity,
                                  residual_grad_link=link)


class _ResNet1dLayout(nn.Module):
    """Constructor shared by ResNet1d and PlainResNet1d (torchvision's ResNet, in 1D)."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), in_channels: int = 1,
                 num_classes: int = 10, *, widths: Sequence[int] = (64, 128, 256, 512),
                 kernel_size: int = 3, stem_kernel_size: int = 7, stem_stride: int = 2,
                 maxpool: bool = True, causal: bool = False, zero_init_residual: bool = False,
                 input_layout: str = "NCL"):
        super().__init__()
        self.input_layout = check_layout(input_layout)
        check_block_args(stem_kernel_size, 1, stride=stem_stride)
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must have 4 "
                             "entries each (one per stage, as torchvision's ResNet)")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be positive block counts, got {list(layers)}")
        self.causal = bool(causal)
        stem_pad = 0 if causal else (stem_kernel_size - 1) // 2
        self.conv1 = nn.Conv1d(in_channels, widths[0], stem_kernel_size, stride=stem_stride,
                               padding=stem_pad, bias=False)
        self.bn1 = nn.BatchNorm1d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool1d(3, stride=2, padding=1) if maxpool else nn.Identity()
        channels = widths[0]
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(self._block_cls(channels, width, stride, "auto",
                                             kernel_size=kernel_size, causal=causal))
                channels = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(channels, num_classes)
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _BasicBlockLayout):
                    nn.init.zeros_(m.bn2.weight)

    def extra_repr(self) -> str:
        return "" if self.input_layout == "NCL" else f"input_layout={self.input_layout!r}"

    def forward(self, x: Tensor) -> Tensor:
        # (B, L, C) in with input_layout="NLC"; the (B, num_classes) output has no layout.
        if self.input_layout == "NLC":
            if x.dim() != 3:
                raise ValueError("input_layout='NLC' expects a 3D input (B, L, C)")
            return self.forward_ncl(x.transpose(1, 2))
        return self.forward_ncl(x)

    def forward_ncl(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _body(self, x: Tensor) -> Tensor:
        """Max pool, the four stages, pooling and fc: everything after the stem."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PlainResNet1d(RecordsConvGeometry, _ResNet1dLayout):
    """ResNet1d in plain PyTorch (what fastres.unfuse returns); scriptable."""

    _block_cls = PlainBasicBlock
    geometry_convs = ("conv1",)  # the stem; the blocks record their own

    def forward_ncl(self, x: Tensor) -> Tensor:
        (kernel_size, stride, dilation), = self.geometry
        x = F.relu(self.bn1(padded_conv1d(x, self.conv1.weight, self.conv1.bias, kernel_size,
                                          stride, dilation, self.causal)))
        return self._body(x)


class ResNet1d(LayoutIO, FusedModule, _ResNet1dLayout):
    """1D ResNet (ResNet-18 with the default layers) for time-series classification.

    Stem conv (stem_kernel_size, stride stem_stride) -> BN -> ReLU (fused) -> max pool ->
    stages of fused BasicBlocks with widths 64/128/256/512 (stride 2 from the second
    stage on) -> global average pooling -> fc. Input (B, in_channels, L) -> (B, num_classes);
    (B, L, in_channels) with input_layout="NLC" (the blocks inside stay NCL: the stages run
    on the transposed view).
    Same attribute names and state_dict keys as torchvision's resnet18, in 1D.

    causal=True pads every conv causally (the max pool stays torchvision's centered one;
    pass maxpool=False for a network whose features never look ahead).
    """

    _block_cls = BasicBlock
    PLAIN_TWINS = (PlainResNet1d,)
    LEAF = False  # convert looks at (and fixes) its blocks

    def fused_forward(self, x: Tensor) -> Tensor:
        x = conv_bn_relu_stage(x, self.conv1, self.bn1, "causal" if self.causal else "same")
        return self._body(x)
