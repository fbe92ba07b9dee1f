"""ops.ResidualGradLink: a block's identity-shortcut gradient added inside stage 1's
data-gradient kernel instead of by autograd, and every case where it must not be."""
import copy

import numpy as np
import pytest
import torch

import fastres
from fastres import backends, dispatch
from fastres.backends import base
from availability import skip_unless_available

FUSED = ["cpp", "triton", "composite"]


@pytest.fixture
def addends(monkeypatch):
    """How many backward calls received a grad_x addend, and how many did not; how many
    of those addends came with mask bits, and how many calls deferred grad_residual."""
    seen = {"with": 0, "without": 0, "bits": 0, "deferred": 0}
    backward = base.KernelBackend.backward

    def spy(self, *args, grad_x_addend=None, **kwargs):
        seen["with" if grad_x_addend is not None else "without"] += 1
        seen["bits"] += kwargs.get("grad_x_addend_bits") is not None
        seen["deferred"] += bool(kwargs.get("defer_grad_residual"))
        return backward(self, *args, grad_x_addend=grad_x_addend, **kwargs)
    monkeypatch.setattr(base.KernelBackend, "backward", spy)
    return seen


def _grads(block, x, grad_out, backend):
    """(output, grad_x, parameter grads) of one training step of `block` on `backend`."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with dispatch.use_backend(backend):
        out = block(x)
    out.backward(grad_out)
    return out.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("make", [
    lambda: fastres.TemporalBlock(8, 8, 3, dilation=2),
    lambda: fastres.TemporalBlock(8, 8, 2, dilation=1, norm="weight", dropout=0.0),
    lambda: fastres.BasicBlock(8, 8, kernel_size=3),
    lambda: fastres.TemporalBlock(8, 8, 3, dilation=1).eval(),
], ids=["temporal", "temporal-weightnorm", "basic", "temporal-eval"])
def test_identity_block_adds_the_shortcut_gradient_in_stage_one(backend, make, addends,
                                                                  fresh_seed):
    """With an identity shortcut, stage 1's backward gets the shortcut gradient as its
    addend (once) and the block's gradients are the plain twin's, to float64 rounding."""
    skip_unless_available(backend)
    torch.manual_seed(fresh_seed)
    dtype = torch.float64 if backend == "composite" else torch.float32
    block = make().to(dtype)
    x = torch.randn(2, 8, 24, dtype=dtype)
    grad_out = torch.randn(2, 8, 24, dtype=dtype)
    out, gx, gp = _grads(block, x, grad_out, backend)
    # Triton's stage 2 saved its final mask as bits: it hands over grad_out and the bits,
    # computing no residual gradient; the others hand over the gradient itself.
    handed = int(backend == "triton")
    assert addends == {"with": 1, "without": 1, "bits": handed, "deferred": handed}
    plain = copy.deepcopy(block).unfused().double()
    xd = x.double().requires_grad_()
    ref = plain(xd)
    ref.backward(grad_out.double())
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(out, ref) < bound
    assert _rel(gx, xd.grad) < bound, "the shortcut's gradient is lost or doubled"
    for got, want in zip(gp, [p.grad for p in plain.parameters()]):
        # (a conv bias under training BN has a zero gradient: judged on grad_out's scale)
        scale = max(want.norm().item(), grad_out.double().norm().item())
        assert (got.double() - want).norm().item() < bound * scale


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_link_where_stage_one_does_not_read_the_shortcut(backend, addends):
    """A projection shortcut, a non-contiguous input (copied apart for each stage) and an
    input that needs no gradient all keep autograd's add: no addend, gradients right."""
    skip_unless_available(backend)
    torch.manual_seed(0)
    projected = fastres.TemporalBlock(4, 8, 3)
    _grads(projected, torch.randn(2, 4, 16), torch.randn(2, 8, 16), backend)
    assert addends["with"] == 0

    block = fastres.TemporalBlock(8, 8, 3)
    x = torch.randn(2, 16, 8).transpose(1, 2)  # (2, 8, 16), not contiguous
    assert not x.is_contiguous()
    xg = x.detach().requires_grad_()
    with dispatch.use_backend(backend):
        block(xg).sum().backward()
    assert addends["with"] == 0
    plain = copy.deepcopy(block).unfused()
    plain.zero_grad(set_to_none=True)
    xp = x.detach().requires_grad_()
    plain(xp).sum().backward()
    assert _rel(xg.grad, xp.grad) < 1e-5

    with dispatch.use_backend(backend):
        block(torch.randn(2, 8, 16)).sum().backward()
    assert addends["with"] == 0


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_link_survives_repeated_and_partial_backward(backend):
    """retain_graph backward twice gives the same grad_x twice (the link is consumed, not
    accumulated), and a backward that never reaches stage 1 (weights of stage 2 only)
    leaves the next full one correct."""
    skip_unless_available(backend)
    torch.manual_seed(1)
    block = fastres.TemporalBlock(8, 8, 3)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with dispatch.use_backend(backend):
        out = block(x)
    g = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, x, g, retain_graph=True)
    torch.autograd.grad(out, block.conv2.weight, g, retain_graph=True)
    (second,) = torch.autograd.grad(out, x, g)
    assert torch.equal(first, second)
    plain = copy.deepcopy(block).unfused()
    xp = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(plain(xp), xp, g)
    assert _rel(first, want) < 1e-5


def test_stage_one_eager_keeps_the_shortcut_gradient(addends):
    """Stage 2 hands its residual gradient over only when stage 1 armed the link: with
    stage 1 on PyTorch's own kernels (here: a hooked BatchNorm runs as a module) the
    shortcut gradient stays autograd's."""
    skip_unless_available("cpp")
    torch.manual_seed(2)
    block = fastres.TemporalBlock(8, 8, 3)
    block.bn1.register_forward_hook(lambda *args: None)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with dispatch.use_backend("cpp"):
        block(x).sum().backward()
    assert addends["with"] == 0
    plain = copy.deepcopy(block).unfused()
    xp = x.detach().requires_grad_()
    plain(xp).sum().backward()
    assert _rel(x.grad, xp.grad) < 1e-5


@pytest.mark.parametrize("backend", ["cpp", "composite"])
def test_backends_adding_outside_their_kernels_mask_the_addend(backend, fresh_seed):
    """Stage 1 on a backend whose kernels add no addend, given stage 2's grad_out and mask
    bits (a Triton stage 2 defers its residual gradient): KernelBackend.backward adds
    grad_out where the bits are set, nothing elsewhere (NaN there included). A backend
    that saves no bits refuses to defer: it would lose the gradient."""
    skip_unless_available(backend)
    torch.manual_seed(fresh_seed)
    kernels = backends.get(backend)
    B, C, L, K = 2, 4, 13, 3
    x, w = torch.randn(B, C, L, dtype=torch.float64), torch.randn(C, C, K, dtype=torch.float64)
    gamma, beta = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    geometry = dict(stride=1, dilation=1, pad_left=K - 1, pad_right=0, norm="train",
                    eps=1e-5, relu_before_add=False)
    out, saved, mask_bits, _, var = kernels.forward(
        x, w, None, gamma, beta, None, None, None, momentum_factor=0.0,
        save_for_backward=True, **geometry)
    grad_out = torch.randn_like(out)

    def grad_x(**extra):
        return kernels.backward(grad_out, x, w, gamma, beta, saved, out, var, has_bias=False,
                                has_residual=False, mask_bits=mask_bits, **geometry, **extra)[0]

    keep = torch.rand(B, C, L) < 0.5
    bits = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    addend = torch.randn(B, C, L, dtype=torch.float64)
    addend[~keep] = float("nan")
    added = grad_x(grad_x_addend=addend, grad_x_addend_bits=bits) - grad_x()
    assert torch.allclose(added, torch.where(keep, addend, 0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cannot defer"):
        grad_x(defer_grad_residual=True)
