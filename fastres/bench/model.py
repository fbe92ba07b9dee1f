"""model suite: whole networks, fused (fastres) vs plain PyTorch vs torch.compile.

    TemporalConvNet  locuslab/TCN's network of BatchNorm TemporalBlocks (dilations 1, 2, 4, ...)
                     with a per-step MSE loss; on CPU also at batch 1 (B=1, L=256, 8 blocks of
                     64 channels: small-batch latency)
    ResNet1d         1D ResNet-18 (widths 64..512) classifying sequences (cross-entropy)

Train step and inference, peak memory per step (CUDA), candidates as in _modules.py.
"""
from __future__ import annotations

from typing import List, Optional

import fastres

from . import _modules
from .task import Settings, Task

NAME = "model"
TITLE = "Models: TemporalConvNet, ResNet1d"

# Per size and device type: the TCNs as (inputs, channels, kernel, (B, L)), and the ResNet as
# (layers, in, classes, (B, L)) or None. The CPU sizes include an 8-block, 64-channel TCN at
# B=1, L=256: small-batch inference, where per-call overhead decides.
_SMALL_BATCH_TCN = (64, [64] * 8, 3, (1, 256))
_SIZES = {
    ("quick", "cpu"): ([(4, [16] * 3, 3, (2, 128))], None),
    ("default", "cpu"): ([(16, [32] * 6, 3, (8, 1024)), _SMALL_BATCH_TCN],
                         ((2, 2, 2, 2), 12, 10, (4, 1024))),
    ("full", "cpu"): ([(16, [32] * 6, 3, (8, 1024)), _SMALL_BATCH_TCN],
                      ((2, 2, 2, 2), 12, 10, (4, 1024))),
    ("quick", "cuda"): ([(16, [64] * 4, 3, (8, 1024))], None),
    ("default", "cuda"): ([(32, [128] * 8, 3, (32, 4096))], ((2, 2, 2, 2), 12, 10, (64, 4096))),
    ("full", "cuda"): ([(32, [128] * 8, 3, (32, 4096))], ((2, 2, 2, 2), 12, 10, (64, 4096))),
}


def unavailable_reason(settings: Settings) -> Optional[str]:
    return _modules.modules_unavailable()


def tasks(settings: Settings) -> List[Task]:
    device = "cuda" if settings.device.type == "cuda" else "cpu"
    key = (settings.size, device)
    if key not in _SIZES:
        key = ("default", device)
    tcns, resnet = _SIZES[key]
    specs = []
    for inputs, channels, k, (batch, length) in tcns:
        specs.append((f"TemporalConvNet({inputs},{channels[0]}x{len(channels)},k{k},B{batch})",
                      lambda inputs=inputs, channels=channels, k=k: fastres.TemporalConvNet(
                          inputs, channels, kernel_size=k, dropout=0.0),
                      (batch, inputs, length), (batch, channels[-1], length), None))
    if resnet:
        layers, in_channels, classes, (batch, length) = resnet
        specs.append((f"ResNet1d({''.join(map(str, layers))},in{in_channels})",
                      lambda: fastres.ResNet1d(layers, in_channels, classes),
                      (batch, in_channels, length), (batch,), classes))
    return _modules.model_tasks(NAME, specs, settings)


table = _modules.table
summarize = _modules.summarize
summary_lines = _modules.summary_lines


def plot(ax, rows, summary):
    _modules.plot(ax, rows, "model: speedup over plain PyTorch (higher is better)")
