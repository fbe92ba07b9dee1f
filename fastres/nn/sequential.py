"""ConvBNReLUSequential: an nn.Sequential whose Conv1d -> BatchNorm1d -> ReLU runs are fused.

It keeps the Sequential's children (and so its state_dict keys and indices) exactly and
only changes how forward walks them: each registered run calls fastres.conv_bn_relu
with the run's conv and BN, every other child runs as usual. fastres.convert builds it;
fastres.unfuse turns it back into an nn.Sequential.

A run is [Conv1d, BatchNorm1d, ReLU] with the conv "same"-padded, or
[ConstantPad1d((P, 0), 0) / ZeroPad1d((P, 0)), Conv1d (no padding), BatchNorm1d, ReLU]
with P = (kernel_size - 1) * dilation: a causal conv.
"""
from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor, nn

from ._stage import FusedModule, conv_bn_relu_stage, retyped
from .sync_batchnorm import BATCH_NORMS

__all__ = ["ConvBNReLUSequential"]


class ConvBNReLUSequential(FusedModule, nn.Sequential):
    """nn.Sequential with fused Conv1d -> BatchNorm1d -> ReLU runs.

    Args:
        *modules: the children, as nn.Sequential takes them.
        runs: {index of the run's first child: (number of children in the run, padding)},
            padding "same" (3 children: conv, BN, ReLU) or "causal" (4: zero pad, conv,
            BN, ReLU).
    """

    def __init__(self, *modules: nn.Module, runs: Dict[int, Tuple[int, str]]):
        super().__init__(*modules)
        children = list(self)
        for start, (length, padding) in runs.items():
            run = children[start:start + length]
            expected = {"same": 3, "causal": 4}.get(padding)
            if expected is None or length != expected or len(run) != length:
                raise ValueError(f"bad run at {start}: {length} children, padding={padding!r}")
            conv, bn, relu = run[-3:]
            if not (isinstance(conv, nn.Conv1d) and isinstance(bn, BATCH_NORMS)
                    and isinstance(relu, nn.ReLU)):
                raise ValueError(f"children {start}..{start + length - 1} are not "
                                 "Conv1d -> BatchNorm1d (or SyncBatchNorm) -> ReLU")
        self.fused_runs = dict(runs)

    # Its plain twin is nn.Sequential itself; convert recognises the runs by structure.
    LEAF = False

    def plain_twin(self) -> type:
        return nn.Sequential

    def unfused(self) -> nn.Module:
        seq = retyped(self, nn.Sequential)
        del seq.__dict__["fused_runs"]
        return seq

    def fused_forward(self, x: Tensor) -> Tensor:
        children = list(self)
        i = 0
        while i < len(children):
            run = self.fused_runs.get(i)
            if run is None:
                x = children[i](x)
                i += 1
                continue
            length, padding = run
            conv, bn = children[i + length - 3], children[i + length - 2]
            x = conv_bn_relu_stage(x, conv, bn, padding)
            i += length
        return x

    def extra_repr(self) -> str:
        return f"fused_runs={self.fused_runs}"
