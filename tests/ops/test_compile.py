"""torch.compile(fullgraph=True) and autocast over the op."""
import pytest
import torch

import fastres
from fastres.reference import conv_bn_relu_reference
from fastres.conventions import rel_err


def _params(C_in=4, C_out=6, K=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(C_out, C_in, K, generator=g) / 3, torch.randn(C_out, generator=g),
            torch.rand(C_out, generator=g) + 0.5, torch.randn(C_out, generator=g))


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager(training):
    w, b, gamma, beta = _params()
    x = torch.randn(2, 4, 16)
    res = torch.randn(2, 6, 16)

    def f(x, w, b, rm, rv, gamma, beta, res):
        return fastres.conv_bn_relu(x, w, b, rm, rv, gamma, beta, training=training, dilation=2,
                                    residual=res)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    rm1, rv1, rm2, rv2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    leaves1 = [t.clone().requires_grad_() for t in (x, w, b, gamma, beta, res)]
    leaves2 = [t.clone().requires_grad_() for t in (x, w, b, gamma, beta, res)]
    out1 = compiled(leaves1[0], leaves1[1], leaves1[2], rm1, rv1, *leaves1[3:])
    out2 = conv_bn_relu_reference(leaves2[0], leaves2[1], leaves2[2], rm2, rv2, leaves2[3],
                                  leaves2[4], training=training, dilation=2, residual=leaves2[5])
    assert rel_err(out1, out2) < 1e-5
    grad = torch.randn_like(out1)
    for a, b_ in zip(torch.autograd.grad(out1, leaves1, grad), torch.autograd.grad(out2, leaves2, grad)):
        scale = grad.abs().sum((0, 2)).norm().item() if a.shape == (6,) and training else None
        assert rel_err(a, b_, scale) < 1e-5
    assert rel_err(rm1, rm2) < 1e-6 and rel_err(rv1, rv2) < 1e-6


def test_compile_inductor_fullgraph_eval():
    w, b, gamma, beta = _params()
    rm, rv = torch.randn(6) * 0.1, torch.rand(6) + 0.5
    f = lambda x: fastres.conv_bn_relu(x, w, b, rm, rv, gamma, beta, padding="same")  # noqa: E731
    torch._dynamo.reset()
    x = torch.randn(3, 4, 20)
    assert rel_err(torch.compile(f, fullgraph=True)(x), f(x)) < 1e-6


def test_autocast_bf16_cpu():
    w, b, gamma, beta = _params()
    x = torch.randn(2, 4, 16)
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
