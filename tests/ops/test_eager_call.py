"""A plain eager call runs the fused kernels without the custom ops' dispatch; everything that
must see the op (dispatch modes, fake tensors, compile) still does.

The op's dispatch costs about as much as a small stage's kernel; its mutation bookkeeping also
moved BatchNorm's running-statistics version counters in eval, where nothing is written.
"""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from availability import cpu_backends
from fastres.conventions import rel_err

op_module = sys.modules["fastres.ops.conv_bn_relu"]
pytestmark = pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs the cpp backend")


class SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _stage(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    block = fastres.TemporalBlock(6, 6, 3, dilation=2)
    with torch.no_grad():
        block.bn1.running_mean.normal_(generator=g)
        block.bn1.running_var.uniform_(0.5, 2.0, generator=g)
    return block, torch.randn(2, 6, 40, generator=g)


def test_an_eval_call_leaves_the_running_statistics_versions(fresh_seed):
    block, x = _stage(fresh_seed)
    block.eval()
    version = block.bn1.running_mean._version
    with torch.no_grad(), fastres.use_backend("cpp"):
        block(x)
    assert block.bn1.running_mean._version == version


def test_dispatch_modes_see_the_op_and_get_the_same_numbers(fresh_seed):
    block, x = _stage(fresh_seed)
    x.requires_grad_()
    with fastres.use_backend("cpp"):
        direct = block(x)
        direct.sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
        x.grad = None
        block.zero_grad()
        seen = SeenOps()
        with seen:
            through = block(x)
            through.sum().backward()
    assert {"fastres::conv_bn_relu", "fastres::conv_bn_relu_backward"} <= seen.names
    assert rel_err(through, direct) < 1e-6
    for before, after in zip(grads, [x.grad] + [p.grad for p in block.parameters()]):
        assert rel_err(after, before, before.norm() + 1e-12) < 1e-6


def test_the_eager_rule():
    x = torch.randn(2, 3, 8)
    assert op_module._eager_call(x)
    with SeenOps():
        assert not op_module._eager_call(x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not op_module._eager_call(fake)
    assert not torch.func.vmap(lambda t: torch.tensor(op_module._eager_call(t)))(x).any()
