"""The reference: conv -> batch norm -> ReLU (+ residual) in plain PyTorch.

This file is the executable form of docs/spec.md. Every backend is tested against it,
run in float64. It is written for clarity, not speed, and imports nothing else
from fastres so that a bug in shared code cannot hide in both sides of a test.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

PADDING_MODES = ("causal", "same")


def conv_padding(kernel_size: int, dilation: int, stride: int, padding: str) -> Tuple[int, int]:
    """(left, right) zero padding of the conv input for a padding mode.

    causal: (K-1)*d zeros on the left, none on the right.
    same, stride 1: PyTorch's padding="same" (the extra zero goes right when odd).
    same, stride > 1: the ResNet convention, (K-1)*d // 2 on both sides.
    """
    total = (kernel_size - 1) * dilation
    if padding == "causal":
        return total, 0
    if padding == "same":
        if stride == 1:
            return total // 2, total - total // 2
        return total // 2, total // 2
    raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")


def output_length(length: int, kernel_size: int, dilation: int, stride: int, padding: str) -> int:
    """Length of the conv output for an input of `length` steps."""
    left, right = conv_padding(kernel_size, dilation, stride, padding)
    return (length + left + right - dilation * (kernel_size - 1) - 1) // stride + 1


def conv1d(x, weight, bias, *, stride=1, dilation=1, padding="causal"):
    """F.conv1d with the causal / same padding of docs/spec.md, without a padded copy of x.

    Symmetric padding goes to the conv itself. Causal pads (K-1)*d on both sides and drops
    the trailing outputs that only the right padding produced: docs/spec.md's definition (the
    "chomp" of the seed TemporalBlock), so eager PyTorch runs exactly what users ran.
    """
    kernel_size = weight.shape[-1]
    left, right = conv_padding(kernel_size, dilation, stride, padding)
    if left == right:
        return F.conv1d(x, weight, bias, stride=stride, padding=left, dilation=dilation)
    if padding == "same":  # stride 1, odd total: PyTorch's own "same" puts the extra zero right
        return F.conv1d(x, weight, bias, padding="same", dilation=dilation)
    y = F.conv1d(x, weight, bias, stride=stride, padding=left, dilation=dilation)
    return y[..., :output_length(x.shape[-1], kernel_size, dilation, stride, padding)]


def running_stats_factor(training, running_mean, momentum, num_batches_tracked) -> float:
    """The running-statistics update factor of this call, as nn.BatchNorm1d computes it.

    In training with running statistics, increments num_batches_tracked (when given) and
    returns momentum, or 1/num_batches_tracked for momentum=None (a cumulative average).
    Otherwise nothing is updated and the factor is unused (0.0).
    """
    if not training or running_mean is None:
        return 0.0
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked)


def conv_bn_relu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    *,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    dilation: int = 1,
    padding: str = "causal",
    residual: Optional[torch.Tensor] = None,
    relu_before_add: bool = False,
    norm: Optional[str] = "batch",
    num_batches_tracked: Optional[torch.Tensor] = None,
    activation: str = "relu",
) -> torch.Tensor:
    """relu(bn(conv1d(x)) + residual), exactly as nn.Conv1d -> nn.BatchNorm1d -> F.relu.

    Running statistics are updated in place in training mode, as nn.BatchNorm1d
    does (momentum=None: cumulative average over num_batches_tracked).
    norm=None skips batch norm; norm="layer" is layer norm over the channels at each
    position (F.layer_norm over the transposed (B, L, C) tensor, as pytorch-tcn applies
    nn.LayerNorm), with bn_weight / bn_bias as its weight and bias and no running statistics.
    relu_before_add computes relu(relu(bn(conv)) + residual).
    activation replaces every ReLU: "relu", "gelu", "gelu_tanh", "silu", "tanh",
    "leaky_relu[:slope]", "elu[:alpha]" (PyTorch's F.gelu, F.gelu(approximate="tanh"),
    F.silu, torch.tanh, F.leaky_relu, F.elu).
    """
    act = activation_function(activation)
    y = conv1d(x, weight, bias, stride=stride, dilation=dilation, padding=padding)
    if norm == "batch":
        factor = running_stats_factor(training, running_mean, momentum, num_batches_tracked)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, factor, eps)
    elif norm == "layer":
        y = F.layer_norm(y.transpose(1, 2), (y.shape[1],), bn_weight, bn_bias,
                         eps).transpose(1, 2)
    elif norm is not None:
        raise ValueError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
    if relu_before_add:
        y = act(y)
    if residual is not None:
        y = y + residual
    return act(y)


def activation_function(text: str):
    """The activation function `text` names (docs/spec.md, "Activation")."""
    name, _, param = text.partition(":")
    simple = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
              "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    if name in simple and not param:
        return simple[name]
    if name == "leaky_relu":
        slope = float(param) if param else 0.01
        return lambda t: F.leaky_relu(t, slope)
    if name == "elu":
        alpha = float(param) if param else 1.0
        return lambda t: F.elu(t, alpha)
    raise ValueError(f"unknown activation {text!r}")
