"""Python interface of the compiled extension fastres._C (csrc/): load it, call its ops.

The extension registers torch.ops.fastres_ext.forward / backward with a CPU kernel
(csrc/cpu) and, when built with nvcc, a CUDA kernel (csrc/cuda); the dispatcher picks by
the tensors' device. These wrappers allocate the outputs through fastres._alloc (so tests
can poison them) and let the kernels write into them. The contract is docs/spec.md's
"Backend contract". The cpp and cuda backends both call this file.
"""
from __future__ import annotations

import torch

from . import _alloc
from .backends._activation import parse_activation
from .conventions import (NORM_CODES, NORM_NONE, NORM_TRAIN, normalizes_per_position,
                          output_length, saved_dtype, saves_for_backward, stats_dtype)

_load_error = None
_loaded = False


def _load():
    """Import fastres._C once (registering torch.ops.fastres_ext); remember why it failed."""
    global _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            import fastres._C  # noqa: F401 (registers torch.ops.fastres_ext)
            torch.ops.fastres_ext.forward  # noqa: B018 (raises if the ops did not register)
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _load_error = f"the compiled extension fastres._C does not load ({exc}); build it " \
                          "with `pip install --no-build-isolation -e .`"
    return _load_error


def load_error():
    """None once fastres._C is loaded, else why it is not (remembered after the first try)."""
    return _load()


def compiled_with_cuda() -> bool:
    return load_error() is None and bool(torch.ops.fastres_ext.compiled_with_cuda())


def forward(x, weight, bias, gamma, beta, running_mean, running_var, residual, *, stride,
            dilation, pad_left, pad_right, norm, eps, momentum_factor, relu_before_add,
            save_for_backward, activation="relu"):
    batch, c_out, k = x.shape[0], weight.shape[0], weight.shape[2]
    l_out = output_length(x.shape[2], k, dilation, stride, pad_left, pad_right)
    shape = (batch, c_out, l_out)
    out = _alloc.empty(shape, dtype=x.dtype, device=x.device)
    saves = saves_for_backward(save_for_backward, norm, relu_before_add, activation)
    saved = _alloc.empty(shape if saves else (0,), device=x.device,
                         dtype=saved_dtype(x.dtype, norm, relu_before_add, activation))
    act = parse_activation(activation)
    n_stats = (c_out,) if norm == NORM_TRAIN else (0,)
    if normalizes_per_position(norm):  # layer norm: per (batch item, position)
        n_stats = (batch, l_out)
    batch_mean = _alloc.empty(n_stats, dtype=stats_dtype(x.dtype), device=x.device)
    batch_var = _alloc.empty(n_stats, dtype=stats_dtype(x.dtype), device=x.device)
    torch.ops.fastres_ext.forward(
        x, weight, bias, gamma, beta, running_mean, running_var, residual, stride, dilation,
        pad_left, pad_right, NORM_CODES[norm], eps, momentum_factor, relu_before_add,
        act.code, act.kernel_param, out, saved, batch_mean, batch_var)
    return out, saved, batch_mean, batch_var


def backward(grad_out, x, weight, gamma, beta, saved, out, var, *, has_bias, has_residual,
             stride, dilation, pad_left, pad_right, norm, eps, relu_before_add,
             need_grad_x=True, activation="relu", residual=None):
    """residual: the forward's, where an activation other than ReLU follows its add (the
    kernels recompute the activation's input from it and saved)."""
    act = parse_activation(activation)
    if has_residual and not act.is_relu and residual is None:
        raise ValueError(f"the backward of activation {activation!r} after a residual add "
                         "needs the residual (its derivative is taken at the sum)")
    def like(t, dtype=None):
        return _alloc.empty(t.shape, dtype=dtype or t.dtype, device=t.device)

    empty = x.new_empty(0)
    with_norm = norm != NORM_NONE
    grad_x, grad_weight = like(x) if need_grad_x else empty, like(weight)
    grad_bias = _alloc.empty((weight.shape[0],), dtype=x.dtype, device=x.device) \
        if has_bias else empty
    grad_gamma = like(gamma) if with_norm else empty
    grad_beta = like(beta) if with_norm else empty
    grad_residual = like(out) if has_residual else empty
    torch.ops.fastres_ext.backward(
        grad_out, x, weight, gamma, beta, saved, out, var,
        residual if has_residual and not act.is_relu else None, has_residual, stride,
        dilation, pad_left, pad_right, NORM_CODES[norm], eps, relu_before_add, act.code,
        act.kernel_param, grad_x, grad_weight, grad_bias, grad_gamma, grad_beta,
        grad_residual)
    return (grad_x if need_grad_x else None, grad_weight, grad_bias if has_bias else None,
            grad_gamma if with_norm else None, grad_beta if with_norm else None,
            grad_residual if has_residual else None)


def same_values(now, then) -> bool:
    """Whether every tensor of `now` holds exactly the bytes of the tensor at the same index
    of `then` (same dtype, shape and device). What a copy of a module's weights (a folded
    stream, a packed oneDNN program) is checked against before it runs: unlike version
    counters, values also see writes through `.data`, which leave the counter alone. One
    C++ call (memcmp) where the extension is built, straight from Python
    (fastres._C.stream_same_values: through torch.ops the lists' boxing cost about 20 us at
    a hundred tensors); NaNs compare by their bits there and never equal in the fallback
    (which then only rebuilds the copy)."""
    compare = direct("stream_same_values")
    if compare is not None:
        return compare(now, then)
    return len(now) == len(then) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        and torch.equal(a.detach(), b) for a, b in zip(now, then))


_DIRECT: dict = {}   # name -> the function of fastres._C, or None, looked up once


def direct(name: str):
    """fastres._C's Python-level function `name` (called without the dispatcher, for the
    per-call checks whose boxing through torch.ops would cost more than their work), or None
    where the extension is not loaded or predates it; the caller then runs its Python twin."""
    if name not in _DIRECT:
        function = None
        if load_error() is None:
            import fastres._C as extension
            function = getattr(extension, name, None)
        _DIRECT[name] = function
    return _DIRECT[name]
