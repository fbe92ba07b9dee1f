"""conv_bn_relu: causal/same dilated Conv1d + BatchNorm1d + ReLU (+ residual), fused.

The public function validates its arguments, applies autocast, calls the registered
custom op `fastres::conv_bn_relu` (whose implementation asks fastres.backends which
kernel to run) and updates the running statistics in place, as nn.BatchNorm1d does.

The op and its backward are torch.library custom ops with fake implementations, so
the function traces under torch.compile(fullgraph=True) without graph breaks, and
autograd is wired once for every backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..reference import PADDING_MODES, conv_padding, running_stats_factor

__all__ = ["conv_bn_relu"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- the custom ops


@torch.library.custom_op("fastres::conv_bn_relu", mutates_args=())
def _conv_bn_relu_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor],
    residual: Optional[Tensor], stride: int, dilation: int, pad_left: int, pad_right: int,
    norm_mode: str, eps: float, relu_before_add: bool, save_y: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return backends.get(backend).forward(
        x, weight, bias, bn_weight, bn_bias, mean, var, residual, stride=stride,
        dilation=dilation, pad_left=pad_left, pad_right=pad_right, norm_mode=norm_mode,
        eps=eps, relu_before_add=relu_before_add, save_y=save_y)


@_conv_bn_relu_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, mean, var, residual, stride, dilation, pad_left,
      pad_right, norm_mode, eps, relu_before_add, save_y, backend):
    batch, _, length = x.shape
    c_out, _, k = weight.shape
    l_out = (length + pad_left + pad_right - dilation * (k - 1) - 1) // stride + 1
    out = x.new_empty((batch, c_out, l_out))
    y = x.new_empty((batch, c_out, l_out) if save_y else (0,))
    n_stats = c_out if norm_mode == "train" else 0
    stats = x.new_empty((n_stats,), dtype=_stats_dtype(x.dtype))
    return out, y, stats, stats.clone()


@torch.library.custom_op("fastres::conv_bn_relu_backward", mutates_args=())
def _conv_bn_relu_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], y: Tensor, out: Tensor, mean: Tensor,
    var: Tensor, has_residual: bool, stride: int, dilation: int, pad_left: int, pad_right: int,
    norm_mode: str, eps: float, relu_before_add: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = backends.get(backend).backward(
        grad_out.contiguous(), x, weight, bias, bn_weight, bn_bias, y, out, mean, var,
        has_residual=has_residual, stride=stride, dilation=dilation, pad_left=pad_left,
        pad_right=pad_right, norm_mode=norm_mode, eps=eps, relu_before_add=relu_before_add)
    # Custom ops cannot return None: an absent gradient travels as an empty tensor.
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_conv_bn_relu_backward_op.register_fake
def _(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, has_residual, stride,
      dilation, pad_left, pad_right, norm_mode, eps, relu_before_add, backend):
    empty = x.new_empty(0)
    like = lambda t: empty if t is None else torch.empty_like(t)  # noqa: E731
    return (torch.empty_like(x), torch.empty_like(weight), like(bias), like(bn_weight),
            like(bn_bias), torch.empty_like(out) if has_residual else empty)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, mean_in, var_in, residual, stride, dilation, pad_left,
     pad_right, norm_mode, eps, relu_before_add, _save_y, backend) = inputs
    out, y, mean, var = output
    ctx.mark_non_differentiable(y, mean, var)
    if norm_mode == "eval":  # backward needs the statistics forward normalized with
        mean, var = mean_in, var_in
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, y, out, mean, var)
    # The backend that ran the forward runs the backward, on whatever thread autograd uses.
    ctx.args = (residual is not None, stride, dilation, pad_left, pad_right, norm_mode, eps,
                relu_before_add, backend)


def _backward(ctx, grad_out, _grad_y, _grad_mean, _grad_var):
    x, weight, bias, bn_weight, bn_bias, y, out, mean, var = ctx.saved_tensors
    grads = _conv_bn_relu_backward_op(grad_out, x, weight, bias, bn_weight, bn_bias, y, out,
                                      mean, var, *ctx.args)
    present = (True, True, bias is not None, bn_weight is not None, bn_bias is not None,
               ctx.args[0])
    g_x, g_w, g_b, g_gamma, g_beta, g_res = (g if p else None for g, p in zip(grads, present))
    return g_x, g_w, g_b, g_gamma, g_beta, None, None, g_res, *([None] * 9)


_conv_bn_relu_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- validation


def _check_vector(name: str, t: Optional[Tensor], c_out: int, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.shape != (c_out,):
        raise ValueError(f"{name} must have shape ({c_out},) (one value per output channel), "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _validate(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual,
              training, stride, dilation, padding, norm) -> Tuple[int, int, int]:
    """Check every argument; return (pad_left, pad_right, L_out)."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be tensors")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C_in, L), got {x.dim()} dims {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError("weight must have shape (C_out, C_in, K), got "
                         f"{weight.dim()} dims {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    batch, c_in, length = x.shape
    c_out, w_c_in, k = weight.shape
    if w_c_in != c_in:
        raise ValueError(f"weight expects {w_c_in} input channels but x has {c_in} "
                         "(grouped convolution is not supported)")
    if c_out < 1 or k < 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} has an empty dimension")
    _check_int("stride", stride, 1)
    _check_int("dilation", dilation, 1)
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if norm not in ("batch", None):
        raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
    _check_vector("bias", bias, c_out, x)
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if norm == "batch":
        for name, t in (("running_mean", running_mean), ("running_var", running_var),
                        ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
            _check_vector(name, t, c_out, x)
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must both be given or both be None")
        if not training and running_mean is None:
            raise ValueError("eval-mode batch norm needs running_mean and running_var "
                             "(pass training=True to use batch statistics, or norm=None)")
    pad_left, pad_right = conv_padding(k, dilation, stride, padding)
    l_out = (length + pad_left + pad_right - dilation * (k - 1) - 1) // stride + 1
    if l_out < 1:
        raise ValueError(f"output length would be {l_out}: input length {length} is too short "
                         f"for kernel_size={k}, dilation={dilation}, stride={stride}, "
                         f"padding={padding!r}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != (batch, c_out, l_out):
            raise ValueError(f"residual must have the output's shape {(batch, c_out, l_out)}, "
                             f"got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    if norm == "batch" and training and batch * l_out <= 1:
        # The message nn.BatchNorm1d gives, so users see the error they know.
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size((batch, c_out, l_out))}")
    return pad_left, pad_right, l_out


# --------------------------------------------------------------------------- public function


# Under torch.compile the backend is chosen once, when the graph is traced (dynamo runs this
# function instead of tracing it); the compiled graph calls that backend from then on.
@torch.compiler.assume_constant_result
def _backend_at_trace_time(*signature) -> str:
    return backends.choose(backends.Call(*signature)).backend


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    *,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    dilation: int = 1,
    padding: str = "causal",
    residual: Optional[Tensor] = None,
    relu_before_add: bool = False,
    norm: Optional[str] = "batch",
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """relu(batch_norm(conv1d(x)) + residual) as one fused op.

    Computes what nn.Conv1d -> nn.BatchNorm1d -> F.relu (-> + residual -> F.relu) computes
    (SPEC.md), forward and backward, on whichever backend fastres.backends picks.

    Args:
        x: (B, C_in, L) float32 / float16 / bfloat16 (float64 on the reference and C++ backends).
        weight, bias: the conv's (C_out, C_in, K) weight and (C_out,) bias or None.
        running_mean, running_var, bn_weight, bn_bias: as F.batch_norm (same order, same
            meaning). Running statistics are updated in place in training mode and may be None
            there; gamma/beta None means no affine transform.
        training: batch statistics (True) or running statistics (False).
        momentum: running-statistics momentum; None for a cumulative average, which needs
            num_batches_tracked (the module's counter, incremented here in training).
        eps: added to the variance.
        stride, dilation: of the conv.
        padding: "causal" (left-pad (K-1)*dilation; L_out = L at stride 1) or "same".
        residual: None or a tensor of the output's shape added before the final ReLU.
        relu_before_add: compute relu(relu(bn(conv(x))) + residual) (locuslab/TCN).
        norm: "batch", or None to skip batch norm (weight-normed blocks: normalize the conv
            weight before the call; gradients flow back through it).

    Returns:
        (B, C_out, L_out) tensor of x's dtype.
    """
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # Conv operands take the autocast dtype (as nn.Conv1d under autocast); batch-norm
        # parameters and running statistics stay float32, as PyTorch keeps them.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        residual = None if residual is None else residual.to(dtype)
    pad_left, pad_right, l_out = _validate(x, weight, bias, running_mean, running_var, bn_weight,
                                       bn_bias, residual, training, stride, dilation, padding,
                                       norm)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weight, bias, bn_weight, bn_bias, residual))
    mode = "none" if norm is None else ("train" if training else "eval")
    signature = (str(x.device), x.dtype, x.shape[0], x.shape[1], weight.shape[0], x.shape[2],
                 weight.shape[2], stride, dilation, pad_left, pad_right, mode,
                 bias is not None, residual is not None, bool(relu_before_add), needs_grad)
    if torch.compiler.is_compiling():
        decision = backends.Decision(_backend_at_trace_time(*signature), "traced")
    else:
        decision = backends.choose(backends.Call(*signature))
    if decision.backend == "eager":
        use_batch_stats = norm == "batch" and training
        factor = running_stats_factor(use_batch_stats, running_mean, momentum,
                                      num_batches_tracked)
        return backends.get("eager").run(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            stride=stride, dilation=dilation, pad_left=pad_left, pad_right=pad_right,
            norm=mode, eps=eps, momentum_factor=factor, relu_before_add=relu_before_add)
    use_batch_stats = norm == "batch" and training
    norm_mode = "none" if norm is None else ("train" if training else "eval")
    factor = running_stats_factor(use_batch_stats, running_mean, momentum, num_batches_tracked)

    gamma = beta = mean_in = var_in = None
    if norm_mode != "none":
        sdt = _stats_dtype(x.dtype)
        c_out = weight.shape[0]
        gamma = bn_weight.to(sdt) if bn_weight is not None else x.new_ones(c_out, dtype=sdt)
        beta = bn_bias.to(sdt) if bn_bias is not None else x.new_zeros(c_out, dtype=sdt)
        if norm_mode == "eval":
            mean_in, var_in = running_mean.to(sdt), running_var.to(sdt)

    save_y = needs_grad and (norm_mode != "none" or relu_before_add)

    out, _y, mean, var = _conv_bn_relu_op(
        x, weight, bias, gamma, beta, mean_in, var_in, residual, stride, dilation, pad_left,
        pad_right, norm_mode, float(eps), bool(relu_before_add), save_y, decision.backend)

    if use_batch_stats and running_mean is not None:
        n = x.shape[0] * out.shape[2]
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            unbiased = var * (n / (n - 1))
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return out
