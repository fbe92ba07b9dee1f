"""Float32 on the Triton backend follows the TF32 setting nn.Conv1d follows.

torch >= 2.9: torch.backends.cudnn.conv.fp32_precision (reading the legacy allow_tf32
there raises once a user has set the new API); older torch: allow_tf32. Plus a CPU
emulation of what TF32 tensor cores do to float32 operands (they read the top 19 bits:
truncation) at a wide, long-kernel conv, against the 1e-3 bound of docs/spec.md.
"""
import types

import pytest
import torch
import torch.nn.functional as F

from fastres import conventions
from fastres.backends.triton import tiling

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.skipif(not conventions._new_tf32_api(), reason="torch < 2.9: no fp32_precision")
def test_new_api_is_followed_and_legacy_flag_never_read():
    with conventions.cudnn_conv_tf32_set(False):
        assert tiling.dot_precision(torch.float32, CUDA) == "ieee"
        # What every float32 CUDA call crashed on before: the legacy flag raises now.
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32
    with conventions.cudnn_conv_tf32_set(True):
        assert tiling.dot_precision(torch.float32, CUDA) == "tf32"
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit dots ignore the setting
        assert tiling.dot_precision(dtype, CUDA) == "tf32"
    assert tiling.dot_precision(torch.float32, torch.device("cpu")) == "ieee"


@pytest.mark.parametrize("allow", [True, False])
def test_legacy_flag_on_older_torch(monkeypatch, allow):
    monkeypatch.setattr(conventions, "_new_tf32_api", lambda: False)
    monkeypatch.setattr(torch.backends, "cudnn", types.SimpleNamespace(allow_tf32=allow))
    assert tiling.dot_precision(torch.float32, CUDA) == ("tf32" if allow else "ieee")


def _tf32_truncate(t):
    """float32 -> the value a TF32 tensor core multiplies: the low 13 mantissa bits dropped."""
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32).double()


def test_tf32_operand_truncation_stays_under_the_bound():
    """C=512, K=7, dilation 2: the forward conv and both gradient GEMMs with truncated
    operands (no rounding in the kernel) against float64. Measured: about 7.7e-4 for each
    GEMM (a 1.3x margin under 1e-3) and 3e-4 on the normalized stage output."""
    g = torch.Generator().manual_seed(0)
    B, C, L, K, d = 1, 512, 256, 7, 2
    pad = (K - 1) * d
    x = torch.randn(B, C, L, generator=g)
    w = torch.randn(C, C, K, generator=g) / (C * K) ** 0.5
    gy = torch.randn(B, C, L, generator=g)
    conv = lambda a, b: F.conv1d(F.pad(a, (pad, 0)), b, dilation=d)  # noqa: E731
    y64 = conv(x.double(), w.double())
    errors = {"forward": conventions.rel_err(conv(_tf32_truncate(x), _tf32_truncate(w)), y64)}
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(conv(x64, w64), (x64, w64), gy.double())
    xt, wt = _tf32_truncate(x).requires_grad_(), _tf32_truncate(w).requires_grad_()
    dxt, dwt = torch.autograd.grad(conv(xt, wt), (xt, wt), _tf32_truncate(gy))
    errors["dgrad"] = conventions.rel_err(dxt, dx64)
    errors["wgrad"] = conventions.rel_err(dwt, dw64)
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert all(2e-4 < e < 1e-3 for e in errors.values()), errors  # truncation is visible
