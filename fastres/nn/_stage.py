"""What every fused module shares: one conv -> BN -> ReLU stage run from real nn modules.

The modules keep ordinary nn.Conv1d / nn.BatchNorm1d submodules (so state_dict keys,
optimizers, hooks on parameters and `.to()` behave as users expect) and call the fused op
with those submodules' parameters and buffers. `bn_arguments` reproduces exactly how
nn.BatchNorm1d.forward decides between batch and running statistics, so a fused module
trains and evaluates as the plain module would.

A stage pays for nothing it does not use: the op's validation runs once per input
signature and conv module (the validated plan is kept; its backend is the op level's
choice, fastres/dispatch/op.py). Where eager PyTorch won, the stage runs the plain twin's
code itself (float32 and float64; 16-bit inputs take the eager backend, which computes in
float32 as docs/spec.md asks), so a fused module then costs what the plain block costs plus
one dictionary lookup. A stage whose conv or norm has hooks runs as modules (the conv's
forward, then the norm's), so every hook fires once and sees what it would see in a
plain model; the outermost module then runs stage by stage (fastres/dispatch/module.py).

`padded_conv1d` is the plain-PyTorch side: what the "plain twins" (the modules `unfuse`
returns) run. It is TorchScript-compatible on purpose.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dispatch
from ..backends._activation import activation_function
from ..conventions import HALF_DTYPES, conv_padding, output_length
from ..ops import ResidualGradLink, conv_bn_relu, execute, plan
from ..upstream_kernels import (one_tap_conv1d, plain_convs_are_routed, plain_convs_routed,
                                route_weight_grad, weight_grad_at_risk)
from .sync_batchnorm import sync_conv_bn_relu_stage


def check_block_args(kernel_size, dilation, dropout=0.0, stride=1) -> None:
    """The ValueErrors every block constructor raises for bad hyper-parameters."""
    for name, value in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def bn_arguments(bn: nn.BatchNorm1d) -> dict:
    """The batch-norm keyword arguments of fastres.conv_bn_relu for module `bn`.

    Mirrors nn.BatchNorm1d.forward: batch statistics in training mode, or in eval mode
    when the module tracks no running statistics; running statistics (and
    num_batches_tracked, which drives momentum=None) updated only when training and
    tracking.
    """
    tracking = bn.training and bn.track_running_stats
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if keep_running else None,
        running_var=bn.running_var if keep_running else None,
        bn_weight=bn.weight, bn_bias=bn.bias, training=use_batch_stats,
        momentum=bn.momentum, eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if tracking else None)


# Validated plans per conv module (one stage each) and input signature; weak, so modules die
# freely. _PLAIN marks a stage where eager won: it runs the plain twin's code.
_PLAIN = "plain"
_PLANNED_DEVICES = ("cpu", "cuda")
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, object]]" = weakref.WeakKeyDictionary()


def conv_bn_relu_stage(x: Tensor, conv: nn.Conv1d, bn: Optional[nn.Module], padding: str,
                       residual: Optional[Tensor] = None,
                       relu_before_add: bool = False,
                       residual_grad_link: Optional[ResidualGradLink] = None,
                       activation: str = "relu") -> Tensor:
    """relu(bn(conv(x)) [+ residual]) through the fused op, from the modules' tensors.

    The conv's own `padding` attribute is ignored: `padding` ("causal" or "same") says how
    the block pads. bn None means no batch norm (weight-normed convs: `conv.weight` is
    the parametrization's normalized weight, so gradients reach g and v); an nn.LayerNorm
    over the channels is the op's norm="layer". `activation` replaces every ReLU of the
    stage (the op's argument of that name).
    residual_grad_link: one link (`identity_shortcut_link`) given to both stages of a block
    whose residual is its input: fused stages then add the shortcut's gradient inside
    stage 1's data-gradient kernel; every other path ignores it.
    """
    if isinstance(bn, nn.SyncBatchNorm):  # statistics over every process's batch
        if activation != "relu":
            return _stage_as_modules(x, conv, bn, padding, residual, relu_before_add,
                                     activation)
        return sync_conv_bn_relu_stage(x, conv, bn, padding, residual, relu_before_add,
                                       bn_arguments(bn))
    recording = dispatch.choice.recording_active()
    if recording:
        dispatch.choice.set_stage(conv)
    if dispatch.module.hooked(conv, bn):
        dispatch.choice.record(conv, None, dispatch.Choice(
            "op", "eager", "its conv or norm has hooks, so the stage runs as modules"))
        return _stage_as_modules(x, conv, bn, padding, residual, relu_before_add, activation)
    weight = conv.weight
    device_type = x.device.type
    if torch.compiler.is_compiling() or device_type not in _PLANNED_DEVICES \
            or torch.is_autocast_enabled(device_type):
        # The op as a whole, validated and dispatched on every call: torch.compile traces
        # it, autocast casts for it, and other devices (meta) take PyTorch's own ops.
        return conv_bn_relu(x, weight, stride=conv.stride[0], dilation=conv.dilation[0],
                            padding=padding, residual=residual, relu_before_add=relu_before_add,
                            activation=activation, **op_arguments(conv, bn))
    # The signature of this stage's call (plans are kept per conv module, whose stride and
    # dilation it carries; the padding mode and ReLU placement are the block's, and convert
    # tries one conv in several blocks). needs_grad short-circuits on the parameters, which
    # usually decide it.
    bias = conv.bias
    needs_grad = torch.is_grad_enabled() and (
        weight.requires_grad or x.requires_grad
        or (residual is not None and residual.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (bn is not None and bn.weight is not None and bn.weight.requires_grad))
    key = (x.shape, x.dtype, x.device, weight.dtype, needs_grad, residual is None, padding,
           relu_before_add, activation,
           None if bn is None else (type(bn), bn.training, bn.eps,
                                    getattr(bn, "running_mean", None) is None),
           dispatch.forced_backend(), dispatch.measure.functorch_active())
    plans = _PLANS.get(conv)
    if plans is None:  # (setdefault alone would build a dict on every call)
        plans = _PLANS.setdefault(conv, {})
    cached = None if recording else plans.get(key)  # recording: choose() logs the choice
    if cached is None:
        stage_plan, _ = plan(x, weight, stride=conv.stride[0], dilation=conv.dilation[0],
                             padding=padding, residual=residual,
                             relu_before_add=relu_before_add, activation=activation,
                             **op_arguments(conv, bn))
        # Eager at full precision runs the plain twin's code; 16-bit keeps the eager backend.
        cached = _PLAIN if stage_plan.backend == "eager" and x.dtype not in HALF_DTYPES \
            else stage_plan
        if dispatch.why_not_measure() is None or cached is _PLAIN:
            plans[key] = cached  # (a static choice made where measuring was unsafe is not)
    if cached is _PLAIN:
        return _plain_stage(x, conv, weight, bn, padding, residual, relu_before_add, activation)
    a = op_arguments(conv, bn)
    tensors = (x, weight, bias, a["bn_weight"], a["bn_bias"], a["running_mean"],
               a["running_var"], residual)
    return execute(cached, tensors, a["momentum"], a["num_batches_tracked"],
                   residual_grad_link)


def _stage_as_modules(x, conv, bn, padding, residual, relu_before_add, activation):
    """The stage with conv and norm called as modules (their hooks fire), the conv's output
    cut to the block's causal / same geometry."""
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    left, right = conv_padding(k, d, s, padding)
    p = conv.padding[0] if isinstance(conv.padding, tuple) else None
    if p is None:
        raise ValueError(f"a hooked stage needs an integer conv padding, got {conv.padding!r}")
    if left >= p and right >= p:
        z = conv(F.pad(x, [left - p, right - p]))
    elif p >= left and p >= right and (p - left) % s == 0:
        start = (p - left) // s
        z = conv(x)[..., start:start + output_length(x.shape[-1], k, d, s, left, right)]
    else:
        raise ValueError(f"cannot run {conv} as a module for {padding!r} padding")
    return _norm_relu_add(z, bn, residual, relu_before_add, activation)


def identity_shortcut_link(x: Tensor, shortcut: Tensor) -> Optional[ResidualGradLink]:
    """A ResidualGradLink for a block whose shortcut is its input x itself, else None
    (also under torch.compile, whose stages take the op as a whole and ignore links)."""
    if shortcut is not x or not torch.is_grad_enabled() or not x.requires_grad \
            or torch.compiler.is_compiling():
        return None
    return ResidualGradLink()


def op_arguments(conv: nn.Conv1d, bn: Optional[nn.Module]) -> dict:
    """The keyword arguments of fastres.conv_bn_relu that come from the stage's modules
    (everything but x, weight, the geometry, the residual and the activation)."""
    if bn is None:
        return dict(bias=conv.bias, running_mean=None, running_var=None, bn_weight=None,
                    bn_bias=None, training=False, momentum=None, eps=0.0,
                    num_batches_tracked=None, norm=None)
    if isinstance(bn, nn.LayerNorm):  # over the channels at each position
        return dict(bias=conv.bias, running_mean=None, running_var=None, bn_weight=bn.weight,
                    bn_bias=bn.bias, training=False, momentum=None, eps=bn.eps,
                    num_batches_tracked=None, norm="layer")
    return dict(bias=conv.bias, norm="batch", **bn_arguments(bn))


_NO_CONTEXT = contextlib.nullcontext()


def _plain_stage(x, conv, weight, bn, padding, residual, relu_before_add, activation):
    """What the plain twin computes: PyTorch's ops and the BN module itself, except that
    the conv's weight gradient avoids PyTorch's known-wrong CPU kernel
    (fastres/upstream_kernels.py)."""
    stride = conv.stride[0]
    with plain_convs_routed() if weight_grad_at_risk(x, weight, stride) else _NO_CONTEXT:
        z = padded_conv1d(x, weight, conv.bias, conv.kernel_size[0], stride, conv.dilation[0],
                          padding == "causal")
    return _norm_relu_add(z, bn, residual, relu_before_add, activation)


def _norm_relu_add(z, bn, residual, relu_before_add, activation="relu"):
    """act([act](bn(z)) + residual) with the norm called as its module (hooks fire); a
    LayerNorm normalizes the channels at each position."""
    act = F.relu if activation == "relu" else activation_function(activation)
    if isinstance(bn, nn.LayerNorm):
        z = bn(z.transpose(1, 2)).transpose(1, 2)
    elif bn is not None:
        z = bn(z)
    if relu_before_add:
        z = act(z)
    if residual is not None:
        z = z + residual
    return act(z)


def projected(downsample: nn.Module, x: Tensor) -> Tensor:
    """downsample(x) on a fused block's paths, the plain one included. A projection of one
    1x1 conv and a norm (BasicBlock's "auto") at stride >= 2 whose weight gradient
    PyTorch's strided kernel would compute (at risk, fastres/upstream_kernels.py) runs its
    conv unstrided on every stride-th position instead (one_tap_conv1d: exact, and faster
    than the strided conv); its norm is called as its module. Any other downsample, or one
    whose conv or container has hooks, is called as it is."""
    conv = downsample[0] if type(downsample) is nn.Sequential and len(downsample) == 2 \
        else None
    if type(conv) is not nn.Conv1d or conv.kernel_size[0] != 1 or conv.groups != 1 \
            or conv.padding != (0,) or conv.stride[0] < 2 \
            or not weight_grad_at_risk(x, conv.weight, conv.stride[0]) \
            or dispatch.module.hooked(downsample):
        return downsample(x)
    return downsample[1](one_tap_conv1d(x, conv.weight, conv.bias, conv.stride[0], 0, 0))


def padded_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int,
                  stride: int, dilation: int, causal: bool) -> Tensor:
    """F.conv1d with docs/spec.md's causal / same zero padding, in plain (scriptable) PyTorch.
    Symmetric padding goes to the conv itself; otherwise a padded copy of x (what the seed
    blocks do, and no slower than padding both sides and dropping outputs on every shape
    timed)."""
    left, right = conv_padding(kernel_size, dilation, stride, "causal" if causal else "same")
    if not torch.jit.is_scripting():
        if plain_convs_are_routed() and weight_grad_at_risk(x, weight, stride) \
                and not torch.jit.is_tracing():
            # A fused module's plain path (never an unfused twin's): PyTorch's CPU weight
            # gradient is wrong for some strided convs (fastres/upstream_kernels.py).
            if kernel_size == 1:
                return one_tap_conv1d(x, weight, bias, stride, left, right)
            y = padded_conv1d(x, weight.detach(), bias, kernel_size, stride, dilation, causal)
            return route_weight_grad(y, x, weight, stride, dilation, left, right)
    if left == right:
        return F.conv1d(x, weight, bias, [stride], [left], [dilation])
    return F.conv1d(F.pad(x, [left, right]), weight, bias, [stride], [0], [dilation])


class RecordsConvGeometry:
    """Mixin for the plain twins: copies their convs' (kernel size, stride, dilation) onto the
    module as `geometry`, because TorchScript cannot read a submodule's constants from
    forward (and torch.jit.trace would see the kernel size as a traced value).

    Called on construction and by fastres.unfuse after it swaps a fused module's class.
    """

    geometry_convs = ("conv1", "conv2")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_geometry()

    def record_geometry(self, convs: Optional[Tuple[str, ...]] = None) -> None:
        convs = self.geometry_convs if convs is None else convs
        modules = self._modules
        # A plain attribute: written to __dict__, past nn.Module.__setattr__'s bookkeeping
        # (plain_forward records it on every call).
        self.__dict__["geometry"] = tuple(
            (modules[name].kernel_size[0], modules[name].stride[0], modules[name].dilation[0])
            for name in convs)


class FusedModule:
    """Mixin of every fused module. A fused module declares its plain twin once, here:
    convert and unfuse read these declarations and keep no tables of their own, so a new
    block is one class (plus its plain twin and tests).

    PLAIN_TWINS: the plain classes that are this module with a plain-PyTorch forward (same
        attributes and state_dict keys); convert turns them back into this class.
    LEAF: the module's children are its own stages' convs and norms; convert does not look
        inside (False for containers such as ResNet1d, whose blocks it converts).
    """

    PLAIN_TWINS: Tuple[type, ...] = ()
    LEAF = True
    # The plain twin's method plain_forward runs: its forward, or its (B, C, L) body where
    # the module converts the layout around it (LayoutIO).
    PLAIN_BODY = "forward"
    _fused_class_of_twin: Dict[type, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for twin in cls.__dict__.get("PLAIN_TWINS", ()):
            FusedModule._fused_class_of_twin[twin] = cls

    @staticmethod
    def fused_class_of(module: nn.Module) -> Optional[type]:
        """The fused class whose plain twin `module` is (by exact type), else None."""
        return FusedModule._fused_class_of_twin.get(type(module))

    def plain_twin(self) -> type:
        """The class unfuse turns this module into."""
        return self.PLAIN_TWINS[0]

    def forward(self, x: Tensor) -> Tensor:
        # The outermost fused module of a call chooses how its stages run
        # (fastres/dispatch/module.py); nested ones follow it.
        return dispatch.module.run(self, x)

    def fused_forward(self, x: Tensor) -> Tensor:
        """The forward through fastres's stages."""
        raise NotImplementedError

    def plain_forward(self, x: Tensor) -> Tensor:
        """The plain twin's forward, run on this module: exactly what unfuse(module) runs."""
        twin = self.plain_twin()
        if issubclass(twin, RecordsConvGeometry):
            RecordsConvGeometry.record_geometry(self, twin.geometry_convs)
        with plain_convs_routed():  # (a fused module is never wrong where PyTorch is)
            return getattr(twin, self.PLAIN_BODY)(self, x)

    def unfused(self) -> nn.Module:
        """This module as its plain twin, sharing submodules and tensors."""
        plain = retyped(self, self.plain_twin())
        if isinstance(plain, RecordsConvGeometry):
            plain.record_geometry()
        return plain


def retyped(module: nn.Module, cls: type) -> nn.Module:
    """A shallow copy of `module` as class `cls`, sharing its submodules and tensors.

    Fused modules and their plain twins have the same attributes and differ only in
    forward; this swaps one for the other without re-initialising (and without touching
    the random number generator).
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    return new
