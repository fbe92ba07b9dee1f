"""Shared helpers of the fastres.stream tests: random models and inputs, the full causal
forward they are judged by (the model's plain twin in float64), and which backends run here.
"""
import copy
import random

import pytest
import torch
from torch import nn

import fastres
from fastres.conventions import rel_err
from fastres.stream import BACKENDS, Stream, unavailable_reason
from upstream import randomize_bn

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in BACKENDS if unavailable_reason(b, CPU) is None]
# Triton's interpreter runs a step in tens of milliseconds: its tests use tiny stacks.
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]
requires_cpp = pytest.mark.skipif(unavailable_reason("cpp", CPU) is not None,
                                  reason=f"cpp stream kernel: {unavailable_reason('cpp', CPU)}")
requires_triton = pytest.mark.skipif(
    unavailable_reason("triton", CPU) is not None,
    reason=f"triton stream kernel: {unavailable_reason('triton', CPU)}")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}



# ----------------------------------------------------------------------------- helpers


def random_tcn(rng: random.Random, norm: str, dtype=torch.float32, max_channels=10,
               max_levels=3, max_kernel=4) -> nn.Module:
    """A TemporalConvNet with random widths (some levels change width: a downsample),
    kernel size and depth, random BN statistics; in eval mode."""
    c_in = rng.randint(1, 6)
    channels, width = [], c_in
    for _ in range(rng.randint(1, max_levels)):
        width = width if rng.random() < 0.4 else rng.randint(2, max_channels)
        channels.append(width)
    torch.manual_seed(rng.randint(0, 2**31))
    net = fastres.TemporalConvNet(c_in, channels, kernel_size=rng.randint(1, max_kernel),
                                  dropout=0.3, norm=norm)
    if norm == "weight":   # locuslab's init makes tiny weights; make the outputs matter
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("original0"):
                    p.uniform_(0.5, 1.5)
    return randomize_bn(net, seed=rng.randint(0, 2**31)).eval().to(dtype)


def full_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The causal forward of the model's plain twin, in float64."""
    plain = fastres.unfuse(copy.deepcopy(model)).double().eval()
    with torch.no_grad():
        return plain(x.double())


def random_input(rng: random.Random, model_channels: int, length: int, batch: int,
                 dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    return torch.randn(batch, model_channels, length, generator=g).to(dtype)


def run_steps(s: Stream, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([s.step(x[..., t]) for t in range(x.shape[-1])], dim=-1)


def run_chunks(s: Stream, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    outs, t = [], 0
    while t < x.shape[-1]:
        n = rng.randint(1, max(1, x.shape[-1] // 2))
        outs.append(s.step(x[..., t:t + n]))
        t += n
    return torch.cat(outs, dim=-1)


def assert_parity(got, want, dtype, what=""):
    assert got.dtype == dtype
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} (bound {TOL[dtype]:g})"


def in_channels(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv1d)).in_channels

