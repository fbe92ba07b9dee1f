"""conv_bn_relu: causal/same dilated Conv1d + BatchNorm1d + ReLU (+ residual), fused.

The public function validates its arguments, applies autocast and asks fastres.backends
which backend runs the call; the backend counts the batch in num_batches_tracked
(batch_counting). The eager backend
runs under autograd as PyTorch's own kernels; a fused backend runs inside the registered
custom ops `fastres::conv_bn_relu` and `fastres::conv_bn_relu_backward`, tied together by
an autograd.Function; they carry the backend's name, so backward runs on the backend that
ran forward. The custom ops have fake
implementations: the function traces under torch.compile(fullgraph=True), where the backend
is chosen once, at trace time.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import backends, dispatch
from ..backends._activation import canonical_activation
from ..dispatch.measure import bounded_extent, functorch_active
from ..conventions import (NORM_NONE, NORM_TRAIN, PADDING_MODES, conv_padding,
                           normalizes_per_position, norm_mode, output_length,
                           saves_for_backward, stats_dtype)
from ..conventions import autocast_dtype, batch_norm_eps_error

__all__ = ["Plan", "ResidualGradLink", "conv_bn_relu", "execute", "plan"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- the custom ops


def _forward_kernels(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
    beta: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
    residual: Optional[Tensor], num_batches_tracked: Optional[Tensor], stride: int,
    dilation: int, pad_left: int, pad_right: int, norm: str, eps: float,
    momentum_factor: float, relu_before_add: bool, save_for_backward: bool, backend: str,
    activation: str = "relu",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.get(backend).forward(
        x, weight, bias, gamma, beta, running_mean, running_var, residual, stride=stride,
        dilation=dilation, pad_left=pad_left, pad_right=pad_right, norm=norm, eps=eps,
        momentum_factor=momentum_factor, relu_before_add=relu_before_add,
        save_for_backward=save_for_backward, num_batches_tracked=num_batches_tracked,
        activation=activation)


# The custom op is what torch.compile, export, fake tensors, dispatch modes and torch.func see;
# a plain eager call runs its body directly (_eager_call), skipping the op's dispatch.
_forward_op = torch.library.custom_op(
    "fastres::conv_bn_relu", _forward_kernels,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@_forward_op.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, residual, num_batches_tracked,
      stride, dilation, pad_left, pad_right, norm, eps, momentum_factor, relu_before_add,
      save_for_backward, backend, activation="relu"):
    batch, _, length = x.shape
    c_out, _, k = weight.shape
    shape = (batch, c_out, output_length(length, k, dilation, stride, pad_left, pad_right))
    saves = saves_for_backward(save_for_backward, norm, relu_before_add, activation)
    kernels = backends.get(backend)
    saved = x.new_empty(shape if saves else (0,), dtype=kernels.saved_dtype(
        x.dtype, norm, relu_before_add, weight.shape[1] * k, activation))
    mask_bits = x.new_empty(kernels.mask_bits_shape(shape, residual is not None,
                                                    save_for_backward, norm, activation),
                            dtype=torch.uint8)
    n_stats = (c_out,) if norm == NORM_TRAIN else (0,)
    if normalizes_per_position(norm):
        n_stats = (batch, shape[2])
    stats = x.new_empty(n_stats, dtype=stats_dtype(x.dtype))
    return x.new_empty(shape), saved, mask_bits, stats, stats.clone()


def _backward_kernels(
    grad_out: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor],
    beta: Optional[Tensor], saved: Tensor, out: Tensor, var: Tensor, mask_bits: Tensor,
    has_bias: bool, has_residual: bool, stride: int, dilation: int, pad_left: int,
    pad_right: int, norm: str, eps: float, relu_before_add: bool, backend: str,
    need_grad_x: bool, grad_x_addend: Optional[Tensor] = None,
    grad_x_addend_bits: Optional[Tensor] = None, defer_grad_residual: bool = False,
    residual: Optional[Tensor] = None, activation: str = "relu",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = backends.get(backend).backward(
        grad_out.contiguous(), x, weight, gamma, beta, saved, out, var, has_bias=has_bias,
        has_residual=has_residual, stride=stride, dilation=dilation, pad_left=pad_left,
        pad_right=pad_right, norm=norm, eps=eps, relu_before_add=relu_before_add,
        need_grad_x=need_grad_x, grad_x_addend=grad_x_addend,
        grad_x_addend_bits=grad_x_addend_bits, defer_grad_residual=defer_grad_residual,
        mask_bits=mask_bits, activation=activation, residual=residual)
    # Custom ops cannot return None: an absent gradient travels as an empty tensor.
    return tuple(x.new_empty(0) if g is None else g for g in grads)


_backward_op = torch.library.custom_op("fastres::conv_bn_relu_backward", _backward_kernels,
                                       mutates_args=())


def _eager_call(x: Tensor) -> bool:
    """Whether a call may run the kernels without the custom ops' dispatch: a plain tensor,
    no torch.compile or jit tracing, no dispatch mode (fake and functional tensors, export,
    FlopCounterMode) and no torch.func transform, which must all see the op. The dispatch
    costs about as much as a small stage's kernel (benchmarks/NOTES.md, pytorch-tcn suite)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch._C._len_torch_dispatch_stack()
            and torch._C._functorch.peek_interpreter_stack() is None)


@_backward_op.register_fake
def _(grad_out, x, weight, gamma, beta, saved, out, var, mask_bits, has_bias, has_residual,
      stride, dilation, pad_left, pad_right, norm, eps, relu_before_add, backend, need_grad_x,
      grad_x_addend=None, grad_x_addend_bits=None, defer_grad_residual=False, residual=None,
      activation="relu"):
    empty = x.new_empty(0)
    c_out = weight.shape[0]
    vector = x.new_empty((c_out,))
    stats = x.new_empty((c_out,), dtype=stats_dtype(x.dtype))
    return (torch.empty_like(x) if need_grad_x else empty, torch.empty_like(weight),
            vector if has_bias else empty,
            stats if norm != NORM_NONE else empty, stats.clone() if norm != NORM_NONE else empty,
            torch.empty_like(out) if has_residual and not defer_grad_residual else empty)


NO_DOUBLE_BACKWARD = (
    "fastres.conv_bn_relu has no double backward (backward with create_graph=True, as "
    "gradient penalties and torch.autograd.functional.hessian need), on any backend. "
    "Run the model as plain PyTorch for that: fastres.unfuse(model), or "
    "fastres.use_backend('eager') around the forward for a bare op call.")


class ResidualGradLink:
    """Hands a block's identity-shortcut gradient from the stage that adds the shortcut to
    the stage that reads the block input, whose data-gradient kernel adds it in its
    epilogue.

    The block input x feeds stage 1 (conv input) and stage 2 (residual); autograd would add
    its two gradients in a kernel of its own (read two, write one: 6 bytes an element in
    16 bits). Linked, stage 2 returns no residual gradient and stage 1's backward adds it
    while writing grad_x (one more read: 2 bytes). Where stage 2 saved its final ReLU's
    mask as bits, it does not even store that gradient (grad_out under the mask): it hands
    over grad_out and the bits, reads them in place of grad_residual itself, and stage 1
    masks while it adds (2 bytes an element never written, two reads of 1/8 byte more).
    A block makes one link per forward and
    passes it to both stages. It is only a hint: stage 1 arms it only when its input needs
    a gradient, and stage 2 diverts its residual gradient only when that residual is the
    very tensor stage 1 armed it with, so anything else (a stage that ran eagerly, a
    non-contiguous input copied apart) keeps autograd's add. Backward order is guaranteed:
    stage 1's output feeds stage 2, so stage 2's backward runs first.
    """

    __slots__ = ("source", "grad", "grad_bits")

    def __init__(self):
        self.source: Optional[Tensor] = None     # stage 1's input, once it is armed
        self.grad: Optional[Tensor] = None       # stage 2's residual gradient, in backward,
        self.grad_bits: Optional[Tensor] = None  # or its grad_out and these mask bits


class _FusedStage(torch.autograd.Function):
    """Autograd around the two custom ops. (A custom op that mutates its inputs, as the
    forward does with the running statistics, cannot carry torch.library's autograd
    registration; an autograd.Function around it traces under torch.compile all the same.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, running_mean, running_var, residual,
                num_batches_tracked, stride, dilation, pad_left, pad_right, norm, eps,
                momentum_factor, relu_before_add, save_for_backward, backend, link,
                activation="relu"):
        run = _forward_kernels if _eager_call(x) else _forward_op
        out, saved, mask_bits, _batch_mean, batch_var = run(
            x, weight, bias, gamma, beta, running_mean, running_var, residual,
            num_batches_tracked, stride, dilation, pad_left, pad_right, norm, eps,
            momentum_factor, relu_before_add, save_for_backward, backend, activation)
        # Backward needs the variance forward normalized with: the batch's (layer norm's per
        # position), or the running one.
        var = batch_var if norm == NORM_TRAIN or normalizes_per_position(norm) \
            else running_var
        # Another activation than ReLU differentiates at its input, which backward recomputes
        # from saved and the residual.
        kept_residual = None if activation == "relu" else residual
        ctx.save_for_backward(x, weight, gamma, beta, saved, out, var, mask_bits,
                              kept_residual)
        ctx.activation = activation
        ctx.args = (bias is not None, residual is not None, stride, dilation, pad_left,
                    pad_right, norm, eps, relu_before_add, backend)
        ctx.link_in = ctx.link_out = None
        if link is not None:
            if residual is None and ctx.needs_input_grad[0]:
                link.source, ctx.link_in = x, link      # stage 1: adds the shortcut's grad
            elif residual is not None and residual is link.source \
                    and ctx.needs_input_grad[7]:
                ctx.link_out = link                     # stage 2: hands it over
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        x, weight, gamma, beta, saved, out, var, mask_bits, residual = ctx.saved_tensors
        if var is None:
            var = x.new_empty(0)
        # The data gradient is a whole conv: skip it where x needs none (a network's input).
        need_grad_x = ctx.needs_input_grad[0]
        addend = addend_bits = None
        if ctx.link_in is not None:
            link = ctx.link_in
            addend, addend_bits, link.grad, link.grad_bits = link.grad, link.grad_bits, None, None
        # Linked, with the final mask saved as bits: grad_residual is stage 1's to compute.
        defer = ctx.link_out is not None and mask_bits.numel() > 0
        run = _backward_kernels if _eager_call(grad_out) else _backward_op
        grads = run(grad_out, x, weight, gamma, beta, saved, out, var, mask_bits, *ctx.args,
                    need_grad_x, addend, addend_bits, defer, residual, ctx.activation)
        has_bias, has_residual = ctx.args[0], ctx.args[1]
        present = (need_grad_x, True, has_bias, gamma is not None, beta is not None,
                   has_residual)
        g_x, g_w, g_b, g_gamma, g_beta, g_res = (g if p else None for g, p in zip(grads, present))
        if ctx.link_out is not None:  # stage 1's data-gradient kernel adds it
            if defer:
                ctx.link_out.grad, ctx.link_out.grad_bits = grad_out, mask_bits
            else:
                ctx.link_out.grad = g_res
            g_res = None
        return (g_x, g_w, g_b, g_gamma, g_beta, None, None, g_res) + (None,) * 13


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
              training, momentum, eps, stride, dilation, padding, norm,
              num_batches_tracked, mixed_skip=False, activation="relu") -> Tuple[int, int, int]:
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
    if c_in < 1 or c_out < 1 or k < 1:
        # PyTorch's own conv gives inconsistent shapes for C_in = 0; refuse rather than guess.
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must have at "
                         "least one input channel, output channel and tap")
    _check_int("stride", stride, 1)
    _check_int("dilation", dilation, 1)
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if norm not in ("batch", "layer", None):
        raise ValueError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
    canonical_activation(activation)  # ValueError naming the argument
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
        # PyTorch's rules, as the installed torch's F.batch_norm has them.
        eps_error = batch_norm_eps_error(eps, training)
        if eps_error:
            raise ValueError(eps_error)
        if training and running_mean is not None and momentum is None \
                and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if norm == "layer":
        for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
            _check_vector(name, t, c_out, x)
        if running_mean is not None or running_var is not None:
            raise ValueError("layer norm keeps no running statistics: pass "
                             "running_mean=None and running_var=None with norm='layer'")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"layer norm's eps must be >= 0, got {eps!r}")
    pad_left, pad_right = conv_padding(k, dilation, stride, padding)
    l_out = output_length(length, k, dilation, stride, pad_left, pad_right)
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
        if residual.dtype != x.dtype and not mixed_skip:
            raise TypeError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    if norm == "batch" and training and batch > 0 and batch * l_out <= 1:
        # The message nn.BatchNorm1d gives, so users see the error they know.
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size((batch, c_out, l_out))}")
    return pad_left, pad_right, l_out


def batch_counting(momentum: Optional[float], num_batches_tracked: Optional[Tensor]):
    """(momentum factor, the counter the backend increments) of a training call with
    running statistics. With a momentum the backend counts the batch (the Triton kernels
    do it inside their finalize: no launch of its own); momentum=None needs the count on
    the host for its factor 1/num_batches_tracked, so it is counted here."""
    if momentum is not None:
        return float(momentum), num_batches_tracked
    return count_batch_and_momentum_factor(momentum, num_batches_tracked), None


def count_batch_and_momentum_factor(momentum: Optional[float],
                                    num_batches_tracked: Optional[Tensor]) -> float:
    """Count this training batch in num_batches_tracked (when given), as nn.BatchNorm1d does,
    and return the running-statistics factor: momentum, or 1/num_batches_tracked for
    momentum=None (a cumulative average)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return float(momentum)
    return 1.0 / float(num_batches_tracked)


# gamma = 1, beta = 0 for batch norm without affine parameters, made once per
# (channels, device, dtype) rather than allocated on every call.
_UNIT_AFFINE: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _unit_affine(c_out: int, device: torch.device, dtype: torch.dtype):
    key = (c_out, device, dtype)
    if key not in _UNIT_AFFINE:
        # Made outside inference mode: an inference tensor kept here would break every later
        # training call that saves it for backward.
        with torch.inference_mode(False):
            _UNIT_AFFINE[key] = (torch.ones(c_out, device=device, dtype=dtype),
                                 torch.zeros(c_out, device=device, dtype=dtype))
    return _UNIT_AFFINE[key]


# --------------------------------------------------------------------------- public function


# Under torch.compile the backend is chosen once per graph, when it is traced (dynamo runs
# this function instead of tracing it), from arguments that are never symbolic.
@torch.compiler.assume_constant_result
def _backend_at_trace_time(device_type: str, dtype: torch.dtype, stride: int,
                           needs_grad: bool, activation: str = "relu",
                           layer_norm: bool = False) -> str:
    name = dispatch.trace_time_choice(device_type, dtype)
    kernels = backends.get(name)
    runs = kernels.activations
    if activation != "relu" and runs != "all" and activation.partition(":")[0] not in runs:
        return "eager"  # (a forced backend that cannot run it fails in the op below)
    if layer_norm and not kernels.layer_norm:
        return "eager"
    return name


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
    activation: str = "relu",
) -> Tensor:
    """relu(batch_norm(conv1d(x)) + residual) as one fused op.

    Computes what nn.Conv1d -> nn.BatchNorm1d -> F.relu (-> + residual -> F.relu) computes
    (docs/spec.md), forward and backward, on the backend fastres.backends chooses.

    Args:
        x: (B, C_in, L) float32 / float16 / bfloat16 / float64.
        weight, bias: the conv's (C_out, C_in, K) weight and (C_out,) bias or None.
        running_mean, running_var, bn_weight, bn_bias: as F.batch_norm (same order, same
            meaning). Running statistics are updated in place in training mode and may be None
            there; gamma/beta None means no affine transform.
        training: batch statistics (True) or running statistics (False).
        momentum: running-statistics momentum; None for a cumulative average, which needs
            num_batches_tracked (the module's counter, incremented here in training).
        eps: added to the variance (> 0 in training, >= 0 in eval, as PyTorch requires).
        stride, dilation: of the conv.
        padding: "causal" (left-pad (K-1)*dilation; L_out = L at stride 1) or "same".
        residual: None or a tensor of the output's shape added before the final ReLU.
        relu_before_add: compute relu(relu(bn(conv(x))) + residual) (locuslab/TCN).
        norm: "batch", or None to skip batch norm (weight-normed blocks: normalize the conv
            weight before the call; gradients flow back through it), or "layer": layer
            norm over the channels at each position (nn.LayerNorm(C_out) applied to the
            (B, L, C) view, as pytorch-tcn does), bn_weight / bn_bias its weight and bias,
            no running statistics, the same in training and eval.
        activation: replaces every ReLU of the stage: "relu", "gelu", "gelu_tanh", "silu",
            "tanh", "leaky_relu[:slope]" or "elu[:alpha]" (docs/spec.md, "Activation").
            A backend whose kernels lack it is not a candidate (fastres.explain says so).

    Returns:
        (B, C_out, L_out) tensor of x's dtype.
    """
    stage_plan, tensors = plan(
        x, weight, bias, running_mean, running_var, bn_weight, bn_bias, training=training,
        momentum=momentum, eps=eps, stride=stride, dilation=dilation, padding=padding,
        residual=residual, relu_before_add=relu_before_add, norm=norm,
        num_batches_tracked=num_batches_tracked, activation=activation)
    return execute(stage_plan, tensors, momentum, num_batches_tracked)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a validated call runs: the backend, the conv geometry and mode, whether autograd
    needs the backward. The drop-in modules keep one per input signature and go straight to
    `execute` on later calls."""

    backend: str
    geometry: Dict[str, object]
    needs_grad: bool


def plan(x, weight, bias=None, running_mean=None, running_var=None, bn_weight=None,
         bn_bias=None, *, training=False, momentum=0.1, eps=1e-5, stride=1, dilation=1,
         padding="causal", residual=None, relu_before_add=False, norm="batch",
         num_batches_tracked=None, activation="relu") -> Tuple[Plan, tuple]:
    """Validate a call (after autocast) and choose its backend; return the plan and the
    call's tensors (x, weight, bias, gamma, beta, running mean, running var, residual)."""
    mixed_skip = False
    dtype = autocast_dtype(x.device.type) \
        if isinstance(x, Tensor) and x.is_floating_point() else None
    if dtype is not None:
        # Conv operands take the autocast dtype (as nn.Conv1d under autocast); batch-norm
        # parameters and running statistics stay float32, as PyTorch keeps them.
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        # A skip stream of higher precision stays so, and so does the sum, as PyTorch
        # keeps them (bn(conv) + x is float32 for a float32 x under autocast).
        mixed_skip = residual is not None and residual.dtype != dtype
    pad_left, pad_right, _ = _validate(
        x, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, training,
        momentum, eps, stride, dilation, padding, norm, num_batches_tracked, mixed_skip,
        activation)
    activation = canonical_activation(activation)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weight, bias, bn_weight, bn_bias, residual))
    mode = norm_mode(norm, training)
    signature = (str(x.device), x.dtype, x.shape[0], x.shape[1], weight.shape[0], x.shape[2],
                 weight.shape[2], stride, dilation, pad_left, pad_right, mode,
                 bias is not None, residual is not None, bool(relu_before_add), needs_grad,
                 activation)
    tensors = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual)
    geometry = dict(stride=stride, dilation=dilation, pad_left=pad_left, pad_right=pad_right,
                    norm=mode, eps=eps, relu_before_add=relu_before_add, activation=activation)
    if torch.compiler.is_compiling() and not mixed_skip:
        name = _backend_at_trace_time(x.device.type, x.dtype, stride, needs_grad, activation,
                                      normalizes_per_position(mode))
    elif x.shape[0] == 0 or x.device.type == "meta" or mixed_skip \
            or torch.compiler.is_compiling() or functorch_active():
        # An empty batch or meta tensors: PyTorch's own ops give its results and shapes.
        # Inside torch.func transforms (grad, vmap): PyTorch's ops, which they transform.
        # A float32 skip stream under autocast: eager, which adds it in float32.
        name = "eager"
    else:
        name = dispatch.op.choose(signature, lambda candidate: _candidate_run(
            candidate, tensors, geometry, momentum, num_batches_tracked, needs_grad)).name
    return Plan(name, geometry, needs_grad), tensors


def execute(stage_plan: Plan, tensors, momentum, num_batches_tracked,
            residual_grad_link: Optional[ResidualGradLink] = None) -> Tensor:
    """Run a planned call on its backend (which, in training with running statistics,
    counts the batch: batch_counting). A block passes the same residual_grad_link to its
    two stages (ResidualGradLink)."""
    factor, counter = 0.0, None
    if stage_plan.geometry["norm"] == NORM_TRAIN and tensors[5] is not None:
        factor, counter = batch_counting(momentum, num_batches_tracked)
    return run_backend(stage_plan.backend, *tensors, momentum_factor=factor,
                       num_batches_tracked=counter, needs_grad=stage_plan.needs_grad,
                       residual_grad_link=residual_grad_link, **stage_plan.geometry)


def run_backend(backend: str, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                residual, *, stride, dilation, pad_left, pad_right, norm, eps, momentum_factor,
                relu_before_add, needs_grad, num_batches_tracked=None,
                residual_grad_link=None, activation="relu") -> Tensor:
    """Run an already validated call on `backend` (eager, or a fused one via the custom op);
    num_batches_tracked, when given, is incremented once."""
    if backend == "eager":
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return backends.get("eager").run(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            stride=stride, dilation=dilation, pad_left=pad_left, pad_right=pad_right, norm=norm,
            eps=eps, momentum_factor=momentum_factor, relu_before_add=relu_before_add,
            activation=activation)
    return fused_forward(backend, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                         residual, stride=stride, dilation=dilation, pad_left=pad_left,
                         pad_right=pad_right, norm=norm, eps=eps,
                         momentum_factor=momentum_factor, relu_before_add=relu_before_add,
                         needs_grad=needs_grad, num_batches_tracked=num_batches_tracked,
                         residual_grad_link=residual_grad_link, activation=activation)


def _candidate_run(backend: str, tensors, geometry, momentum, num_batches_tracked,
                   needs_grad: bool):
    """One timed run of `backend` on private copies of (a bounded slice of) the call's
    inputs, for the dispatcher.

    Copies of every tensor (the identity residual stays the input), of the running
    statistics and of the batch counter: measuring changes nothing the user can see, and
    the gradients go to the copies (torch.autograd.grad), never into .grad or the graph.
    A long input is timed on its first positions only (dispatch.measure.bounded_extent).
    """
    x, weight, residual = tensors[0], tensors[1], tensors[7]
    batch, length = bounded_extent(x.shape[0], x.shape[2])
    l_out = output_length(length, weight.shape[2], geometry["dilation"], geometry["stride"],
                          geometry["pad_left"], geometry["pad_right"])

    def private(t):
        if t is None:
            return None
        if t is x:
            t = t[:batch, :, :length]
        elif t is residual:
            t = t[:batch, :, :l_out]
        return t.detach().clone().requires_grad_(t.requires_grad)
    copies = [None if t is None or t is x else private(t) for t in tensors]
    copies[0] = private(x)
    if residual is x:
        copies[7] = copies[0]
    counter = None if num_batches_tracked is None else num_batches_tracked.clone()
    leaves = [t for t in dict.fromkeys(copies) if t is not None and t.requires_grad]

    def run():
        factor, count = 0.0, None
        if geometry["norm"] == NORM_TRAIN and copies[5] is not None:
            factor, count = batch_counting(momentum, counter)
        with torch.enable_grad() if needs_grad else torch.no_grad():
            out = run_backend(backend, *copies, momentum_factor=factor, needs_grad=needs_grad,
                              num_batches_tracked=count, **geometry)
            if needs_grad:
                torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def fused_forward(backend: str, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  residual, *, stride, dilation, pad_left, pad_right, norm, eps,
                  momentum_factor, relu_before_add, needs_grad,
                  num_batches_tracked=None, residual_grad_link=None,
                  activation="relu") -> Tensor:
    """Run an already validated call on the fused backend `backend` (through the custom op)."""
    gamma = beta = None
    if norm != NORM_NONE:
        sdt = stats_dtype(x.dtype)
        if bn_weight is None or bn_bias is None:
            ones, zeros = _unit_affine(weight.shape[0], x.device, sdt)
            bn_weight = ones if bn_weight is None else bn_weight
            bn_bias = zeros if bn_bias is None else bn_bias
        gamma, beta = bn_weight.to(sdt), bn_bias.to(sdt)
    stats = [running_mean, running_var] if norm != NORM_NONE else [None, None]
    # Running statistics of another dtype (a model moved to 16 bits whole) travel through
    # statistics-dtype copies, written back after the call.
    work = [t if t is None or t.dtype == stats_dtype(x.dtype) else t.to(stats_dtype(x.dtype))
            for t in stats]
    residual = None if residual is None else residual.contiguous()
    out = _FusedStage.apply(
        x.contiguous(), weight.contiguous(), bias, gamma, beta, work[0], work[1], residual,
        num_batches_tracked, stride, dilation, pad_left, pad_right, norm, float(eps),
        float(momentum_factor), bool(relu_before_add), needs_grad, backend,
        residual_grad_link, activation)
    if norm == NORM_TRAIN:
        with torch.no_grad():
            for stat, copy in zip(stats, work):
                if copy is not stat:
                    stat.copy_(copy)
    return out

