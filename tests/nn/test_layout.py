"""input_layout="NLC" (fastres/nn/_layout.py): (B, L, C) in and out, the same numbers as the
NCL module on the transposed data, in training (outputs, input and parameter gradients,
running statistics) and eval, fused and unfused."""
import copy

import pytest
import torch

import fastres
from fastres.conventions import rel_err
from model_parity import grad_scale

CASES = [
    (fastres.TemporalBlock, (6, 10, 3), dict(dilation=2), (3, 29, 6)),
    (fastres.TemporalBlock, (8, 8, 2), dict(dilation=3, norm="weight"), (2, 31, 8)),
    (fastres.BasicBlock, (6, 12, 2, "auto"), {}, (3, 33, 6)),
    (fastres.ResNet1d, ((1, 1, 1, 1), 6, 4), dict(widths=(8, 8, 16, 16)), (3, 64, 6)),
]


def _pair(cls, args, kw, seed):
    torch.manual_seed(seed)
    nlc = cls(*args, input_layout="NLC", **kw)
    ncl = cls(*args, **kw)
    ncl.load_state_dict(nlc.state_dict())
    return nlc, ncl


def _as_ncl_output(out):
    return out.transpose(1, 2) if out.dim() == 3 else out


@pytest.mark.parametrize("cls, args, kw, shape", CASES)
def test_nlc_equals_ncl_on_transposed_data(cls, args, kw, shape, fresh_seed):
    nlc, ncl = _pair(cls, args, kw, fresh_seed)
    g = torch.Generator().manual_seed(fresh_seed)
    for train in (True, False):
        nlc.train(train)
        ncl.train(train)
        x = torch.randn(shape, generator=g, requires_grad=True)
        x_ncl = x.detach().transpose(1, 2).contiguous().requires_grad_()
        out, ref = nlc(x), ncl(x_ncl)
        if out.dim() == 3:
            assert out.shape == (shape[0], ref.shape[2], ref.shape[1])  # (B, L_out, C_out)
        # (each model's kernels are chosen by its own measurement: they agree to the
        # float32 bound of docs/spec.md, not bit for bit)
        assert rel_err(_as_ncl_output(out), ref) < 1e-5
        grad = torch.randn(ref.shape, generator=g)
        out.backward(grad.transpose(1, 2) if out.dim() == 3 else grad)
        ref.backward(grad)
        assert rel_err(x.grad.transpose(1, 2), x_ncl.grad) < 1e-5
        ref_grads = {name: q.grad for name, q in ncl.named_parameters()}
        for (name, p), q in zip(nlc.named_parameters(), ncl.parameters()):
            # (a conv bias before training BN: judged against its weight's gradient)
            assert rel_err(p.grad, q.grad, grad_scale(name, ref_grads)) < 1e-5, name
            p.grad = q.grad = None
    for (name, b), c in zip(nlc.named_buffers(), ncl.buffers()):
        assert rel_err(b.double(), c.double()) < 1e-5, name


@pytest.mark.parametrize("cls, args, kw, shape", CASES)
def test_unfuse_and_script_keep_the_layout(cls, args, kw, shape, fresh_seed):
    nlc, _ = _pair(cls, args, kw, fresh_seed)
    nlc.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    plain = fastres.unfuse(nlc).eval()
    assert plain.input_layout == "NLC"
    with torch.no_grad():
        out = nlc(x)
        assert rel_err(plain(x), out) < 1e-5  # (the fused model's kernels are measured)
        if kw.get("norm") != "weight":  # weight-normed blocks trace but do not script
            assert rel_err(torch.jit.script(copy.deepcopy(plain))(x), out) < 1e-5
    assert "input_layout='NLC'" in repr(nlc)


@pytest.mark.parametrize("cls, args, kw, shape", CASES)
def test_bad_input_raises(cls, args, kw, shape):
    nlc, _ = _pair(cls, args, kw, 0)
    b, n, c = shape
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        nlc(torch.randn(b, c, n))  # NCL data given to an NLC module
    with pytest.raises(ValueError, match="3D input"):
        nlc(torch.randn(n, c))
    with pytest.raises(ValueError, match="input_layout must be one of"):
        cls(*args, input_layout="LNC", **kw)
