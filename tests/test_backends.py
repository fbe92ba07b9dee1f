"""Backend selection happens in one place and says why a backend cannot run."""
import pytest
import torch

import fastres
from fastres import backends


def test_reference_always_available():
    assert "reference" in fastres.available_backends()
    assert set(fastres.available_backends()) <= set(backends.names())


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastres backend 'nope'"):
        with fastres.use_backend("nope"):
            pass


def test_unavailable_backend_names_why(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "ghost", "fastres.backends._does_not_exist")
    with pytest.raises(RuntimeError, match="'ghost' is not available: cannot import"):
        with fastres.use_backend("ghost"):
            pass


def test_use_backend_is_scoped():
    assert backends.forced_backend() is None
    with fastres.use_backend("reference"):
        assert backends.forced_backend() == "reference"
        assert backends.select(torch.device("cpu"), torch.float32).NAME == "reference"
    assert backends.forced_backend() is None


def test_default_on_cpu_is_never_the_interpreter():
    # Triton may run on CPU through TRITON_INTERPRET for tests, but never by default.
    chosen = backends.select(torch.device("cpu"), torch.float32).NAME
    assert chosen in ("cpp", "reference")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "reference")
    assert backends.select(torch.device("cpu"), torch.float32).NAME == "reference"
    monkeypatch.setenv("FASTRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastres backend"):
        backends.select(torch.device("cpu"), torch.float32)


def test_cpu_default_runs_fused_only_where_measured_faster():
    cpu, f32 = torch.device("cpu"), torch.float32
    has_cpp = backends.unavailable_reason("cpp") is None
    long, short = backends.CPP_MIN_LENGTH, backends.CPP_MIN_LENGTH - 1
    # forward-only at stride 1 on long sequences: the C++ kernels when built; else eager
    assert backends.use_fused(cpu, f32, needs_grad=False, stride=1, length_out=long) == has_cpp
    assert not backends.use_fused(cpu, f32, needs_grad=False, stride=1, length_out=short)
    assert not backends.use_fused(cpu, f32, needs_grad=True, stride=1, length_out=long)
    assert not backends.use_fused(cpu, f32, needs_grad=False, stride=2, length_out=long)
    with fastres.use_backend("reference"):
        assert backends.use_fused(cpu, f32, needs_grad=True, stride=2, length_out=short)
    with fastres.use_backend("eager"):
        assert not backends.use_fused(cpu, f32, needs_grad=False, stride=1, length_out=long)
    # 16-bit: the C++ kernels (float32 accumulation) whenever built, any call
    for dtype in (torch.bfloat16, torch.float16):
        assert backends.use_fused(cpu, dtype, needs_grad=True, stride=2, length_out=short) == has_cpp


def test_eager_path_never_calls_the_custom_op(monkeypatch):
    calls = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, requires_grad=True)
    with fastres.use_backend("eager"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert calls == [] and x.grad is not None
    with fastres.use_backend("reference"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert len(calls) == 2  # forward and backward op


def test_forcing_eager_for_a_kernel_call_is_an_error():
    with fastres.use_backend("eager"):
        with pytest.raises(RuntimeError, match="eager path runs no fused kernel"):
            backends.select(torch.device("cpu"), torch.float32)


def test_describe_default_states_the_policy():
    cpu = torch.device("cpu")
    assert backends.describe_default(cpu, torch.float32).endswith("eager")
    with fastres.use_backend("reference"):
        assert backends.describe_default(cpu, torch.float32) == "reference (forced)"
