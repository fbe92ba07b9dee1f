"""The modules' input_layout option: (B, C, L) or (B, L, C) data in and out.

pytorch-tcn and most sequence code feed (B, L, C) batches. With input_layout="NLC" a fused
module takes (B, L, C) and returns (B, L, C) (a classifier's (B, classes) stays as it is),
running its stages on x.transpose(1, 2): a view, never a copy, whose (B, C, L) strides are
channels-last. Paths that want NCL memory copy it themselves; the oneDNN executor
(fastres/backends/onednn.py) reads it as it lies.

The plain twins take the option too (so unfuse and export keep the model's interface): their
`forward` converts and calls `forward_ncl`, which the fused module's plain_forward runs on
the (B, C, L) view it already made.
"""
from __future__ import annotations

from torch import Tensor


LAYOUTS = ("NCL", "NLC")


def check_layout(input_layout) -> str:
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout must be one of {LAYOUTS}, got {input_layout!r}")
    return input_layout


def ncl_view(module_name: str, x: Tensor, in_channels: int) -> Tensor:
    """(B, L, C) input -> its (B, C, L) view, with the errors a wrong shape deserves."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{module_name}(input_layout='NLC') expects a 3D input (B, L, C), "
                         f"got {got}")
    if x.shape[2] != in_channels:
        raise ValueError(f"{module_name}(input_layout='NLC') expects {in_channels} channels in "
                         f"the last dim of (B, L, C), got shape {tuple(x.shape)}")
    return x.transpose(1, 2)


class LayoutIO:
    """Mixin, before FusedModule: converts NLC input and output around the fused forward."""

    input_layout = "NCL"  # modules pickled before the option existed
    # FusedModule.plain_forward runs the twin's (B, C, L) body: forward has converted already.
    PLAIN_BODY = "forward_ncl"

    def forward(self, x: Tensor) -> Tensor:
        if self.input_layout == "NCL":
            return super().forward(x)
        out = super().forward(ncl_view(type(self).__name__, x, self.conv1.in_channels))
        return out.transpose(1, 2) if out.dim() == 3 else out
