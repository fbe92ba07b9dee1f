"""Python interface of the compiled extension fastres._C (csrc/): load it, call its ops.

The extension registers torch.ops.fastres_ext.forward / backward with a CPU kernel
(csrc/cpu) and, when built with nvcc, a CUDA kernel (csrc/cuda); the dispatcher picks by
the tensors' device. These wrappers allocate the outputs through fastres._alloc (so tests
can poison them) and let the kernels write into them. The contract is the one
fastres/backends/reference.py documents. The cpp and cuda backends both call this file.
"""
from __future__ import annotations

import importlib

import torch

from . import _alloc

_NORM_MODES = {"none": 0, "eval": 1, "train": 2}
_load_error = None
_loaded = False


def _load():
    """Import fastres._C once (registering torch.ops.fastres_ext); remember why it failed."""
    global _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            importlib.import_module("fastres._C")
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


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x, weight, bias, bn_weight, bn_bias, mean, var, residual, *, stride, dilation,
            pad_left, pad_right, norm_mode, eps, relu_before_add, save_y):
    batch, c_out, k = x.shape[0], weight.shape[0], weight.shape[2]
    l_out = (x.shape[2] + pad_left + pad_right - dilation * (k - 1) - 1) // stride + 1
    shape = (batch, c_out, l_out)
    out = _alloc.empty(shape, dtype=x.dtype, device=x.device)
    y = _alloc.empty(shape if save_y else (0,), dtype=x.dtype, device=x.device)
    n_stats = c_out if norm_mode == "train" else 0
    batch_mean = _alloc.empty((n_stats,), dtype=_stats_dtype(x.dtype), device=x.device)
    batch_var = _alloc.empty((n_stats,), dtype=_stats_dtype(x.dtype), device=x.device)
    torch.ops.fastres_ext.forward(
        x.contiguous(), weight.contiguous(), bias, bn_weight, bn_bias, mean, var,
        None if residual is None else residual.contiguous(), stride, dilation, pad_left,
        pad_right, _NORM_MODES[norm_mode], eps, relu_before_add, out, y, batch_mean, batch_var)
    return out, y, batch_mean, batch_var


def backward(grad_out, x, weight, bias, bn_weight, bn_bias, y, out, mean, var, *, has_residual,
             stride, dilation, pad_left, pad_right, norm_mode, eps, relu_before_add):
    def like(t, present=True):
        return _alloc.empty(t.shape if present else (0,), dtype=t.dtype, device=t.device)

    norm = norm_mode != "none"
    grad_x, grad_weight = like(x), like(weight)
    grad_bias = like(bias) if bias is not None else x.new_empty(0)
    grad_gamma = like(bn_weight) if norm else x.new_empty(0)
    grad_beta = like(bn_bias) if norm else x.new_empty(0)
    grad_residual = like(out) if has_residual else x.new_empty(0)
    empty = x.new_empty(0)
    torch.ops.fastres_ext.backward(
        grad_out.contiguous(), x.contiguous(), weight.contiguous(), bias, bn_weight, bn_bias,
        empty if y is None else y, out, empty if mean is None else mean,
        empty if var is None else var, has_residual, stride, dilation, pad_left, pad_right,
        _NORM_MODES[norm_mode], eps, relu_before_add, grad_x, grad_weight, grad_bias,
        grad_gamma, grad_beta, grad_residual)
    return (grad_x, grad_weight, grad_bias if bias is not None else None,
            grad_gamma if norm else None, grad_beta if norm else None,
            grad_residual if has_residual else None)
