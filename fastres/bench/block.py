"""block suite: one residual block, fused (fastres) vs plain PyTorch vs torch.compile.

    TemporalBlock   the BatchNorm TCN block: two causal dilated conv -> BN -> ReLU stages,
                    the second adding the input (identity, or a 1x1 projection)
    BasicBlock      the 1D ResNet block ("same" padding; identity, or strided + projection)

Train step and inference, peak memory per step (CUDA), candidates as in _modules.py.
"""
from __future__ import annotations

from typing import List, Optional

import fastres

from . import _modules
from .task import Settings, Task

NAME = "block"
TITLE = "Residual blocks: TemporalBlock, BasicBlock"

# (label, constructor kwargs, (B, C_in, L)) per size and device type.
_TEMPORAL = {
    ("quick", "cpu"): [("TemporalBlock(16,16,k3,d2)", (16, 16, 3, 2), (2, 16, 128))],
    ("default", "cpu"): [("TemporalBlock(64,64,k3,d4)", (64, 64, 3, 4), (8, 64, 1024))],
    ("quick", "cuda"): [("TemporalBlock(64,64,k3,d2)", (64, 64, 3, 2), (8, 64, 1024))],
    ("default", "cuda"): [("TemporalBlock(128,128,k3,d4)", (128, 128, 3, 4), (32, 128, 4096))],
    ("full", "cuda"): [("TemporalBlock(128,128,k3,d4)", (128, 128, 3, 4), (32, 128, 4096)),
                       ("TemporalBlock(64,128,k3,d1)", (64, 128, 3, 1), (32, 64, 4096)),
                       ("TemporalBlock(256,256,k3,d32)", (256, 256, 3, 32), (16, 256, 8192))],
}
_BASIC = {
    ("quick", "cpu"): [],
    ("default", "cpu"): [("BasicBlock(64,64)", (64, 64, 1), (8, 64, 1024))],
    ("quick", "cuda"): [],
    ("default", "cuda"): [("BasicBlock(128,128)", (128, 128, 1), (32, 128, 4096))],
    ("full", "cuda"): [("BasicBlock(128,128)", (128, 128, 1), (32, 128, 4096)),
                       ("BasicBlock(64,128,s2)", (64, 128, 2), (32, 64, 4096))],
}


def _key(settings: Settings):
    device = "cuda" if settings.device.type == "cuda" else "cpu"
    key = (settings.size, device)
    return key if key in _TEMPORAL else ("default", device)


def unavailable_reason(settings: Settings) -> Optional[str]:
    return _modules.modules_unavailable()


def tasks(settings: Settings) -> List[Task]:
    key = _key(settings)
    specs = []
    for label, (c_in, c_out, k, d), shape in _TEMPORAL[key]:
        build = lambda c_in=c_in, c_out=c_out, k=k, d=d: fastres.TemporalBlock(  # noqa: E731
            c_in, c_out, k, dilation=d, dropout=0.0)
        specs.append((label, build, shape, (shape[0], c_out, shape[2]), None))
    for label, (c_in, c_out, stride), shape in _BASIC[key]:
        build = lambda c_in=c_in, c_out=c_out, s=stride: fastres.BasicBlock(  # noqa: E731
            c_in, c_out, s, "auto")
        specs.append((label, build, shape, (shape[0], c_out, -(-shape[2] // stride)), None))
    return _modules.model_tasks(NAME, specs, settings)


table = _modules.table
summarize = _modules.summarize
summary_lines = _modules.summary_lines


def plot(ax, rows, summary):
    _modules.plot(ax, rows, "block: speedup over plain PyTorch (higher is better)")
