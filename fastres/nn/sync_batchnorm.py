"""The synchronized stage: conv -> batch norm over every process's batch -> ReLU (+ residual).

A fastres block whose batch norm is an nn.SyncBatchNorm (put there by
nn.SyncBatchNorm.convert_sync_batchnorm, or by fastres.convert of a model that had one)
must normalize with the statistics of the global batch, the union of every process's
batch, as nn.SyncBatchNorm does. The fused kernels see one process's batch only, so such
a stage runs here instead (conv_bn_relu_stage sends every nn.SyncBatchNorm here):

- the conv, and its backward, run through PyTorch (F.conv1d under autograd);
- forward: each process computes per channel (count, mean, M2) of its conv output, the
  processes all-gather them and merge them exactly (Chan et al.'s parallel Welford merge,
  never sum and sum of squares, which cancel catastrophically when |mean| >> std), update
  the running statistics with the global count (unbiased variance, momentum or cumulative
  average, num_batches_tracked) and normalize;
- backward: the two per-channel sums the input gradient needs, sum(g) and sum(g * x-hat),
  are all-reduced and the gradient uses the global count, as PyTorch's SyncBatchNorm
  does; gamma and beta receive this process's own sums (DistributedDataParallel then
  averages them like every other parameter gradient).

When there is nothing to synchronize, exactly where nn.SyncBatchNorm falls back to plain
batch norm (eval mode, torch.distributed not initialized, a process group of one), the
stage is the ordinary fused op. Unlike nn.SyncBatchNorm, this runs on any device the
process group's backend serves, CPU tensors with gloo included.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..conventions import HALF_DTYPES, conv_padding
from ..ops import conv_bn_relu
from ..ops.conv_bn_relu import count_batch_and_momentum_factor

__all__ = ["BATCH_NORMS", "sync_conv_bn_relu_stage", "sync_group"]

# The batch-norm modules a fused stage can take: nn.SyncBatchNorm is not an nn.BatchNorm1d.
BATCH_NORMS = (nn.BatchNorm1d, nn.SyncBatchNorm)


def sync_group(bn: nn.SyncBatchNorm) -> Tuple[Optional[object], int]:
    """(process group, its size) when `bn` must synchronize now, else (None, 1).

    nn.SyncBatchNorm.forward's rule: only in training mode with batch statistics, with
    torch.distributed initialized, over the module's process_group (the world by
    default), and only when that group has more than one process.
    """
    uses_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not (uses_batch_stats and bn.training and dist.is_available() and dist.is_initialized()):
        return None, 1
    group = bn.process_group or dist.group.WORLD
    world_size = dist.get_world_size(group)
    return (group, world_size) if world_size > 1 else (None, 1)


def sync_conv_bn_relu_stage(x: Tensor, conv: nn.Conv1d, bn: nn.SyncBatchNorm, padding: str,
                            residual: Optional[Tensor], relu_before_add: bool,
                            norm_kwargs: dict) -> Tensor:
    """relu(sync_bn(conv(x)) [+ residual]) for a stage whose batch norm is nn.SyncBatchNorm.

    `norm_kwargs` are the stage's batch-norm arguments of fastres.conv_bn_relu
    (fastres.nn._stage.bn_arguments(bn)). x (B, C_in, L) -> (B, C_out, L_out), x's dtype.
    """
    group, world_size = sync_group(bn)
    stride, dilation = conv.stride[0], conv.dilation[0]
    if group is None:
        return conv_bn_relu(x, conv.weight, conv.bias, stride=stride, dilation=dilation,
                            padding=padding, residual=residual,
                            relu_before_add=relu_before_add, **norm_kwargs)
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled(x.device.type):
        # The conv operands take the autocast dtype, as in fastres.conv_bn_relu.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        residual = None if residual is None else residual.to(dtype)
    # Accumulate in float32 whatever the input dtype (docs/spec.md, Precision).
    compute = torch.float32 if x.dtype in HALF_DTYPES else x.dtype
    up = lambda t: None if t is None else t.to(compute)  # noqa: E731
    with torch.autocast(x.device.type, enabled=False):
        left, right = conv_padding(weight.shape[-1], dilation, stride, padding)
        y = F.conv1d(F.pad(up(x), [left, right]), up(weight), up(bias), stride=stride,
                     dilation=dilation)
        running_mean, running_var = norm_kwargs["running_mean"], norm_kwargs["running_var"]
        factor = 0.0
        if running_mean is not None:
            factor = count_batch_and_momentum_factor(bn.momentum,
                                                     norm_kwargs["num_batches_tracked"])
        out = _SyncBatchNormReLU.apply(y, up(bn.weight), up(bn.bias), running_mean, running_var,
                                       up(residual), bn.eps, factor, relu_before_add, group,
                                       world_size)
    return out.to(x.dtype)


def _per_channel(t: Tensor) -> Tensor:
    """(C,) -> (1, C, 1), to broadcast over (B, C, L)."""
    return t[None, :, None]


class _SyncBatchNormReLU(torch.autograd.Function):
    """relu([relu](sync_batch_norm(y)) [+ residual]) over a process group; y is (B, C, L)."""

    @staticmethod
    def forward(ctx, y, gamma, beta, running_mean, running_var, residual, eps, factor,
                relu_before_add, group, world_size):
        channels = y.shape[1]
        count = y.shape[0] * y.shape[2]
        # This process's (count, mean, M2) per channel, merged in float64 (the payload is
        # 2C + 1 numbers, so the precision costs nothing).
        stats = y.detach().double()
        if count > 0:
            mean = stats.mean((0, 2))
            m2 = (stats - _per_channel(mean)).square().sum((0, 2))
        else:  # an empty batch on this process adds nothing
            mean = m2 = stats.new_zeros(channels)
        local = torch.cat([stats.new_tensor([count]), mean, m2])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)                                  # (world, 2C + 1)
        counts, means, m2s = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
        total = counts.sum()
        if total == 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(total)} over the process group")
        if total > 0:  # Chan et al.: M2 = sum M2_i + sum n_i (mean_i - mean)^2
            global_mean = (counts * means).sum(0) / total
            global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
            var = global_m2 / total
            if running_mean is not None:
                with torch.no_grad():
                    unbiased = global_m2 / (total - 1)
                    running_mean.mul_(1 - factor).add_(global_mean.to(running_mean.dtype),
                                                       alpha=factor)
                    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype),
                                                      alpha=factor)
        else:  # every process's batch is empty: nothing to normalize or to count
            global_mean, var = stats.new_zeros(channels), stats.new_ones(channels)
        invstd = torch.rsqrt(var + eps).to(y.dtype)
        xhat = (y - _per_channel(global_mean.to(y.dtype))) * _per_channel(invstd)
        z = xhat if gamma is None else xhat * _per_channel(gamma)
        z = z if beta is None else z + _per_channel(beta)
        h = torch.relu(z) if relu_before_add else z
        out = torch.relu(h if residual is None else h + residual)
        ctx.save_for_backward(xhat, invstd, gamma, beta, out)
        ctx.total, ctx.relu_before_add = float(total), relu_before_add
        ctx.group, ctx.has_residual = group, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, gamma, beta, out = ctx.saved_tensors
        g = grad_out.masked_fill(out <= 0, 0)  # ReLU passes where out > 0 (or NaN)
        grad_residual = g if ctx.has_residual else None
        if ctx.relu_before_add:  # the inner ReLU's mask, recomputed from x-hat
            z = xhat if gamma is None else xhat * _per_channel(gamma)
            z = z if beta is None else z + _per_channel(beta)
            g = g.masked_fill(z <= 0, 0)
        sum_g = g.sum((0, 2))
        sum_g_xhat = (g * xhat).sum((0, 2))
        # The input gradient needs both sums over the global batch; gamma and beta get this
        # process's own (DDP averages parameter gradients across processes).
        sums = torch.cat([sum_g, sum_g_xhat])
        dist.all_reduce(sums, group=ctx.group)
        global_g, global_g_xhat = sums.chunk(2)
        scale = invstd if gamma is None else invstd * gamma
        grad_y = _per_channel(scale) * (g - _per_channel(global_g / ctx.total)
                                        - xhat * _per_channel(global_g_xhat / ctx.total))
        grad_gamma = sum_g_xhat if gamma is not None and ctx.needs_input_grad[1] else None
        grad_beta = sum_g if beta is not None and ctx.needs_input_grad[2] else None
        return (grad_y, grad_gamma, grad_beta, None, None, grad_residual,
                None, None, None, None, None)
