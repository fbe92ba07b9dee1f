"""torch.compile(fullgraph=True) and autocast over the op, on the fused kernels themselves.

Small CPU calls default to eager, which would let these tests pass without ever compiling
around the custom ops; each test forces a fused backend and counts its kernel calls.
"""
import pytest
import torch

import fastres
from fastres import backends
from fastres.conventions import rel_err
from fastres.reference import conv_bn_relu_reference
from availability import cpu_backends

FUSED_CPU = [name for name in ("cpp", "composite") if name in cpu_backends()]
# Inductor compiles for seconds: once per training mode, on the C++ kernels.
COMPILE_CASES = [(name, "aot_eager") for name in FUSED_CPU] + \
    [("cpp", "inductor")] * ("cpp" in FUSED_CPU)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts forward/backward calls reaching each fused backend's kernels."""
    calls = {"forward": 0, "backward": 0}
    for name in FUSED_CPU:
        module = backends.get(name).module
        for what in ("forward", "backward"):
            real = getattr(module, what)

            def counted(*args, _real=real, _what=what, **kwargs):
                calls[_what] += 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, what, counted)
    return calls


def _params(C_in=4, C_out=6, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C_out, C_in, K, generator=g) / 3, torch.randn(C_out, generator=g),
            torch.rand(C_out, generator=g) + 0.5, torch.randn(C_out, generator=g))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend, compiler", COMPILE_CASES)
def test_compile_fullgraph_runs_the_fused_kernels(backend, training, compiler, kernel_calls,
                                                  fresh_seed):
    w, b, gamma, beta = _params(seed=fresh_seed)
    g = torch.Generator().manual_seed(fresh_seed)
    x, res = torch.randn(2, 4, 16, generator=g), torch.randn(2, 6, 16, generator=g)

    def f(x, w, b, rm, rv, gamma, beta, res):
        return fastres.conv_bn_relu(x, w, b, rm, rv, gamma, beta, training=training, dilation=2,
                                    residual=res)

    torch._dynamo.reset()
    with fastres.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        rm1, rv1 = torch.zeros(6), torch.ones(6)
        leaves1 = [t.clone().requires_grad_() for t in (x, w, b, gamma, beta, res)]
        out1 = compiled(leaves1[0], leaves1[1], leaves1[2], rm1, rv1, *leaves1[3:])
        grad = torch.randn(out1.shape, generator=g)
        grads1 = torch.autograd.grad(out1, leaves1, grad)
    assert kernel_calls == {"forward": 1, "backward": 1}
    rm2, rv2 = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    leaves2 = [t.double().requires_grad_() for t in (x, w, b, gamma, beta, res)]
    out2 = conv_bn_relu_reference(leaves2[0], leaves2[1], leaves2[2], rm2, rv2, leaves2[3],
                                  leaves2[4], training=training, dilation=2, residual=leaves2[5])
    assert rel_err(out1, out2) < 1e-5
    for a, b_ in zip(grads1, torch.autograd.grad(out2, leaves2, grad.double())):
        scale = grad.abs().sum((0, 2)).norm().item() if a.shape == (6,) and training else None
        assert rel_err(a, b_, scale) < 1e-5
    assert rel_err(rm1, rm2) < 1e-6 and rel_err(rv1, rv2) < 1e-6


def test_compile_chooses_the_backend_once_at_trace_time(kernel_calls):
    """A compiled function keeps the backend it was traced with (no per-call choice)."""
    if "cpp" not in FUSED_CPU:
        pytest.skip("needs the cpp backend")
    w, b, gamma, beta = _params()
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5
    f = lambda x: fastres.conv_bn_relu(x, w, b, rm, rv, gamma, beta)  # noqa: E731
    torch._dynamo.reset()
    with fastres.use_backend("cpp"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        compiled(torch.randn(3, 4, 20))
    compiled(torch.randn(3, 4, 20))  # outside the block: still the traced backend
    assert kernel_calls["forward"] == 2


def test_autocast_bf16_cpu(fresh_seed):
    w, b, gamma, beta = _params(seed=fresh_seed)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(fresh_seed))
    rm, rv = torch.zeros(6), torch.ones(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastres.conv_bn_relu(x, w, b, rm, rv, gamma, beta, training=True)
    assert out.dtype == torch.bfloat16
    # Running statistics stay float32 under autocast, as PyTorch keeps them.
    assert rm.dtype == torch.float32 and rv.dtype == torch.float32
    ref = conv_bn_relu_reference(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double(),
                                 torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64),
                                 gamma.double(), beta.double(), training=True)
    assert rel_err(out, ref) < 1e-2
