"""The conventions every part of fastres shares, written once.

Conv geometry (padding modes, output length), the norm-mode codes the kernels take, the
dtypes of statistics and of the tensor backward reads, whether Triton is interpreting, and
the relative error every comparison uses. This module imports nothing of fastres, so the
backends, the op, the modules and the benchmarks can all build on it.

fastres/reference.py, the independent oracle, keeps its own copy of the geometry on
purpose: a bug here must not sit on both sides of a parity test.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch

# ----------------------------------------------------------------------------- geometry

PADDING_MODES = ("causal", "same")


def conv_padding(kernel_size: int, dilation: int, stride: int, padding: str) -> Tuple[int, int]:
    """(left, right) zeros around the input for a padding mode (docs/spec.md).

    causal: (K-1)*d on the left, none on the right.
    same, stride 1: PyTorch's padding="same" (the odd zero goes right).
    same, stride > 1: the ResNet convention, (K-1)*d // 2 on both sides.
    TorchScript compiles this too (the plain twins' forward calls it).
    """
    total = (kernel_size - 1) * dilation
    if padding == "causal":
        return total, 0
    if padding == "same":
        if stride == 1:
            return total // 2, total - total // 2
        return total // 2, total // 2
    raise ValueError("padding must be 'causal' or 'same', got '" + padding + "'")


def output_length(length: int, kernel_size: int, dilation: int, stride: int, pad_left: int,
                  pad_right: int) -> int:
    """Length of the conv output for an input of `length` steps and the given zero padding."""
    return (length + pad_left + pad_right - dilation * (kernel_size - 1) - 1) // stride + 1


# ----------------------------------------------------------------------------- norm modes

# What a stage does with the conv output. The kernels (Triton constexprs, the C++ enum
# NormMode in csrc/conv_bn_relu.h) take the integer codes.
# NORM_LAYER: layer norm over the channels at each position (docs/spec.md, "Layer norm"),
# the same in training and eval; its statistics are per (batch item, position).
NORM_NONE, NORM_EVAL, NORM_TRAIN, NORM_LAYER = "none", "eval", "train", "layer"
NORM_CODES = {NORM_NONE: 0, NORM_EVAL: 1, NORM_TRAIN: 2, NORM_LAYER: 3}


def norm_mode(norm: Optional[str], training: bool) -> str:
    """The kernel-level mode of a call: no norm, batch norm with running statistics or
    batch ones, or layer norm over channels."""
    if norm is None:
        return NORM_NONE
    if norm == "layer":
        return NORM_LAYER
    return NORM_TRAIN if training else NORM_EVAL


def normalizes_per_position(norm: str) -> bool:
    """Whether forward's statistics are per (batch item, position), (B, L_out): layer norm."""
    return norm == NORM_LAYER


# ----------------------------------------------------------------------------- dtypes

HALF_DTYPES = (torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Batch statistics, BN parameters and their gradients: float32 (float64 for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saves_for_backward(save_for_backward: bool, norm: str, relu_before_add: bool,
                       activation: str = "relu") -> bool:
    """Whether forward saves a tensor for backward (docs/spec.md, "Backend contract"):
    x-hat with batch norm; y without, where backward reads it (the inner mask of
    relu_before_add, or an activation other than ReLU, whose derivative backward takes at
    its input, recomputed from what was saved)."""
    return save_for_backward and (norm != NORM_NONE or relu_before_add
                                  or activation != "relu")


def saved_dtype(dtype: torch.dtype, norm: str, relu_before_add: bool,
                activation: str = "relu") -> torch.dtype:
    """dtype of the tensor forward saves for backward (docs/spec.md, "What backward reads").

    16-bit inputs save x-hat in float32 in training, and whenever backward recomputes the
    inner ReLU mask of relu_before_add from it:
    - training-mode batch norm projects x-hat's direction out of the gradient
      (grad_y = k (g - mean g - x-hat mean(g x-hat))); with a 16-bit x-hat that projection
      is off by its rounding, and where few values share a channel the weight gradient,
      which cancels along the weight's own direction, lost up to 1e-2 relative (float32:
      2.7e-3, as plain PyTorch computing in float32);
    - a 16-bit x-hat flips about 0.1% of the masks x-hat * gamma + beta > 0, which costs the
      gradients several percent; in float32 backward recomputes them bit for bit.
    Eval-mode x-hat (used only for grad_gamma) and y without batch norm (only its sign is
    read) keep the input's dtype. A backend may choose its own (the Triton backend saves
    a float16 x-hat in training, and the masks as bits: its saved_dtype).
    An activation other than ReLU saves float32 for 16-bit inputs in every mode: backward
    recomputes the activation's input from it, and a 16-bit copy would flip leaky_relu's
    and elu's branch wherever |z| is below its rounding, as it would flip ReLU's masks.
    Layer norm saves float32 as training batch norm does: its backward projects x-hat's
    direction out of the gradient too (over the channels of a position).
    """
    if dtype in HALF_DTYPES and (norm in (NORM_TRAIN, NORM_LAYER)
                                 or (norm != NORM_NONE and relu_before_add)
                                 or activation != "relu"):
        return torch.float32
    return dtype


def mask_bits_shape(batch: int, channels: int, length: int) -> tuple:
    """Shape of a ReLU mask saved one bit an element (uint8; bit j of byte i is position
    8 i + j), for backends that save one (docs/spec.md, backend contract)."""
    return (batch, channels, -(-length // 8))


def unpack_mask_bits(bits: torch.Tensor, length: int) -> torch.Tensor:
    """(B, C, cdiv(length, 8)) uint8 mask bits -> (B, C, length) bool, in torch: for
    backends that receive a masked gradient (grad_x_addend_bits) but add it outside their
    kernels."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    unpacked = (bits[..., None] >> shifts) & 1
    return unpacked.flatten(-2)[..., :length].bool()


# ----------------------------------------------------------------------------- TF32


def _new_tf32_api() -> bool:
    """torch >= 2.9 has per-backend fp32_precision settings (and the legacy flags raise)."""
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def cudnn_conv_tf32() -> bool:
    """Whether nn.Conv1d runs float32 CUDA convs with TF32 on this torch: the setting every
    fused backend follows (docs/spec.md, Precision).

    torch >= 2.9: torch.backends.cudnn.conv.fp32_precision, where "none" inherits from
    torch.backends.cudnn.fp32_precision, then torch.backends.fp32_precision; never the legacy
    allow_tf32 there, which raises once a user has set the new API. Older torch: allow_tf32.
    """
    if not _new_tf32_api():
        return bool(torch.backends.cudnn.allow_tf32)
    for setting in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        precision = getattr(setting, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    return True  # nothing set anywhere: cuDNN's default, TF32 allowed


@contextlib.contextmanager
def cudnn_conv_tf32_set(enabled: bool):
    """Set the TF32 mode of float32 convs (and matmuls) for the block, then restore it."""
    if _new_tf32_api():
        settings = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
        previous = [s.fp32_precision for s in settings]
        try:
            for s in settings:
                s.fp32_precision = "tf32" if enabled else "ieee"
            yield
        finally:
            for s, value in zip(settings, previous):
                s.fp32_precision = value
    else:
        previous = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        try:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------- environment


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- autocast

def _autocast_device_types() -> frozenset:
    names = {"cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu",
             torch._C._get_privateuse1_backend_name()}
    available = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                available.add(name)
        except (RuntimeError, ValueError):
            pass
    return frozenset(available)


# The device types autocast exists for, asked once at import: Dynamo (torch 2.11) cannot
# trace torch.amp.is_autocast_available, and it reads a frozenset of names as a constant.
AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on `device_type`, or None where autocast is off there
    (or does not exist, as on meta). Traceable by torch.compile(fullgraph=True)."""
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


# ----------------------------------------------------------------------------- batch norm eps

def _batch_norm_takes_zero_eps_in_eval() -> bool:
    import torch.nn.functional as F
    try:
        F.batch_norm(torch.ones(1, 1, 2), torch.zeros(1), torch.ones(1), training=False,
                     eps=0.0)
    except (ValueError, RuntimeError):
        return False
    return True


# Whether the installed torch's F.batch_norm takes eps = 0 with running statistics: torch
# 2.11 refuses eps <= 0 in both modes, later releases allow eps = 0 in eval. Asked once at
# import, so that fastres accepts exactly what nn.BatchNorm1d accepts next to it.
BATCH_NORM_ZERO_EPS_IN_EVAL = _batch_norm_takes_zero_eps_in_eval()


def batch_norm_eps_error(eps: float, training: bool) -> Optional[str]:
    """F.batch_norm's message for an eps it refuses (installed torch's rule), else None."""
    if not BATCH_NORM_ZERO_EPS_IN_EVAL:
        return None if eps > 0 else f"batch_norm eps must be positive, but got {eps}"
    if training and not eps > 0:
        return f"batch_norm eps must be positive during training, but got {eps}"
    if not eps >= 0:
        return f"batch_norm eps must be non-negative, but got {eps}"
    return None


# ----------------------------------------------------------------------------- error measure


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None) -> float:
    """||a - b|| / ||b|| in float64 (or / scale): the one error measure of fastres.

    A non-finite value in `a` gives inf, so NaN never passes a bound.
    """
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = scale if scale is not None else b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff
