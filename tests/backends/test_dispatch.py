"""Backend selection happens in one place, with backends as objects that say why they cannot run."""
import pytest
import torch

import fastres
from fastres import backends
from fastres.backends import Call


def call(**changes):
    fields = dict(device="cpu", dtype=torch.float32, batch=2, c_in=4, c_out=4, length=1024,
                  kernel_size=3, stride=1, dilation=1, pad_left=2, pad_right=0, norm="eval",
                  has_bias=True, has_residual=False, relu_before_add=False, needs_grad=False)
    fields.update(changes)
    return Call(**fields)


def test_registry_lists_backends_as_objects():
    assert backends.names()[0] == "eager"
    for backend in backends.all_backends():
        assert backends.get(backend.name) is backend
        assert backend.devices and backend.dtypes and backend.description
    assert "eager" in fastres.available_backends()
    assert "composite" in fastres.available_backends()
    assert set(fastres.available_backends()) <= set(backends.names())


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastres backend 'nope'"):
        with fastres.use_backend("nope"):
            pass


def test_unavailable_backend_names_why(monkeypatch):
    ghost = backends.KernelBackend("ghost", "fastres.backends._does_not_exist", ("cpu",),
                                   (torch.float32,), "a backend whose module is missing")
    monkeypatch.setitem(backends._REGISTRY, "ghost", ghost)
    assert "cannot import" in ghost.unavailable_reason()
    assert "ghost" not in fastres.available_backends()
    with pytest.raises(RuntimeError, match="'ghost' is not available: cannot import"):
        with fastres.use_backend("ghost"):
            pass


def test_supports_names_device_and_dtype():
    cpu = call()
    assert backends.get("composite").supports(cpu) is None
    assert "runs on cuda" in backends.get("cuda").supports(cpu) or \
        backends.get("cuda").unavailable_reason() is not None
    f64 = call(dtype=torch.float64)
    assert backends.get("eager").supports(f64) is None
    if backends.get("triton").unavailable_reason() is None:
        assert "does not take float64" in backends.get("triton").supports(f64)


def test_use_backend_is_scoped():
    assert backends.forced_backend() is None
    with fastres.use_backend("composite"):
        assert backends.forced_backend() == "composite"
        assert backends.choose(call()) == backends.Decision("composite", "forced")
    assert backends.forced_backend() is None


def test_forced_backend_that_cannot_run_the_call_raises():
    with fastres.use_backend("composite"):
        with pytest.raises(RuntimeError, match="'composite' cannot run this call"):
            backends.choose(call(device="meta"))


def test_default_on_cpu_is_never_the_interpreter():
    # Triton may run on CPU through TRITON_INTERPRET for tests, but never by default.
    for c in (call(), call(needs_grad=True), call(dtype=torch.bfloat16)):
        assert backends.choose(c).backend in ("cpp", "eager")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "composite")
    assert backends.choose(call()).backend == "composite"
    monkeypatch.setenv("FASTRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastres backend"):
        backends.choose(call())


def test_static_rule_runs_cpp_only_where_it_measured_faster():
    has_cpp = backends.unavailable_reason("cpp") is None
    long, short = backends.CPP_MIN_LENGTH, backends.CPP_MIN_LENGTH - 1
    expect = "cpp" if has_cpp else "eager"
    assert backends.static_choice(call(length=long)).backend == expect
    assert backends.static_choice(call(length=short)).backend == "eager"
    assert backends.static_choice(call(needs_grad=True)).backend == "eager"
    assert backends.static_choice(call(stride=2)).backend == "eager"
    # 16-bit: the C++ kernels (float32 accumulation) whenever built, any call
    for dtype in (torch.bfloat16, torch.float16):
        assert backends.static_choice(call(dtype=dtype, needs_grad=True, stride=2,
                                           length=short)).backend == expect


def test_eager_path_never_calls_the_custom_op(monkeypatch):
    calls = []
    real = backends.get
    monkeypatch.setattr(backends, "get", lambda name: calls.append(name) or real(name))
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, requires_grad=True)
    with fastres.use_backend("eager"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert "composite" not in calls and x.grad is not None
    with fastres.use_backend("composite"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert calls.count("composite") >= 2  # the forward and the backward op


def test_describe_default_states_the_policy():
    cpu = torch.device("cpu")
    assert backends.describe_default(cpu, torch.float32).endswith("eager")
    with fastres.use_backend("composite"):
        assert backends.describe_default(cpu, torch.float32) == "composite (forced)"
