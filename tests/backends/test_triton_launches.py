"""Kernel launches of one TemporalBlock training step on the Triton backend.

Counts, in one forward + backward of TemporalBlock(C, C, 3, dilation=d) (bf16, identity
residual, `fastres.use_backend("triton")`), the Triton kernel launches (wrapping the
interpreter's launch) and the torch kernels (a TorchDispatchMode counting every op that
would launch a GPU kernel: views, metadata and uninitialized allocations excluded). On a
GPU each launch costs a few microseconds of CPU and a gap on the stream, which at C=64
is a sizeable share of a step, so the count is held to a budget.
"""
import collections
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastres
from fastres import backends

reason = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(reason is not None or torch.cuda.is_available(),
                                reason=f"counts interpreter launches on CPU ({reason})")

# Ops that launch no kernel: views, metadata, allocations without a fill.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "as_strided", "permute", "t", "transpose", "expand", "slice", "select",
    "unsqueeze", "squeeze", "alias", "detach", "_to_copy_noop", "lift_fresh", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride",
}


_op_module = importlib.import_module("fastres.ops.conv_bn_relu")
_FUSED_OPS = {"conv_bn_relu": _op_module._forward_op,
              "conv_bn_relu_backward": _op_module._backward_op}


class CountTorchKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "fastres":  # the fused op: count the kernels inside it
            with self:  # (its Python body, so that the op does not dispatch here again)
                return _FUSED_OPS[name]._init_fn(*args, **(kwargs or {}))
        if name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_launches(monkeypatch, step):
    from triton.runtime import interpreter
    triton_launches = collections.Counter()
    run = interpreter.InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        triton_launches[self.fn.__name__] += 1
        with _disable_current_modes():  # the interpreter's own tensor copies are no kernels
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counting_run)
    with CountTorchKernels() as torch_kernels:
        step()
    return triton_launches, torch_kernels.ops


# Issue 9's budget. Per stage: statistics pass (its last programs finalize the batch
# statistics, running statistics and the batch counter), normalizing pass, backward pass 1
# (finalizing the BN gradient sums), pass 2, dgrad, wgrad (summing its own splits): 6
# Triton launches; the tap-major weight copy (once per weight version: one per optimizer
# step). 2 * 7 = 14. The block input's two gradients are added inside stage 1's dgrad
# (ops.ResidualGradLink), not by an autograd add.
LAUNCH_BUDGET = 16


@pytest.mark.parametrize("dilation", [1, 4])
def test_temporal_block_train_step_launches(monkeypatch, dilation):
    from fastres.backends.triton import batch_stats
    C, B, L = 16, 2, 32
    # bf16 convs, float32 batch norm (as autocast keeps it): no parameter casts in the op.
    block = fastres.TemporalBlock(C, C, 3, dilation=dilation).train()
    block.conv1.to(torch.bfloat16)
    block.conv2.to(torch.bfloat16)
    x = torch.randn(B, C, L, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(B, C, L, dtype=torch.bfloat16)

    def step():
        with fastres.use_backend("triton"):
            block(x).backward(grad)

    step()  # the first step allocates the ticket counters, once per device and stream
    with torch.no_grad():  # an optimizer step: new weight versions, so new tap-major copies
        for p in block.parameters():
            p.add_(1e-3)
    block.zero_grad(set_to_none=True)  # (as optimizer.zero_grad: no accumulating add_)
    x.grad = None
    counted_before = block.bn1.num_batches_tracked.item()
    triton_launches, torch_ops = count_launches(monkeypatch, step)
    total = sum(triton_launches.values()) + sum(torch_ops.values())
    print(f"Triton {dict(triton_launches)}; torch {dict(torch_ops)}; total {total}")
    assert triton_launches == {"conv_forward_kernel": 4, "relu_bn_backward_kernel": 4,
                               "conv_dgrad_kernel": 2, "conv_wgrad_kernel": 2}
    assert dict(torch_ops) == {"contiguous": 2}  # the two tap-major weight copies; no add
    assert total <= LAUNCH_BUDGET, (sorted(triton_launches.items()), sorted(torch_ops.items()))
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    # The kernels counted the batch, and left every ticket counter at zero.
    assert block.bn1.num_batches_tracked.item() == counted_before + 1
    assert block.bn2.num_batches_tracked.item() == counted_before + 1
    assert all(int(c.abs().sum()) == 0 for c in batch_stats._COUNTERS.values())


def test_weight_copy_is_cached_per_version():
    """The tap-major weight copy is made once per weight version: a second forward with
    the same weight makes no copy; an in-place update (optimizer step) makes a new one."""
    from fastres.backends.triton import operands
    for c_out, c_in in ((8, 4), (16, 8)):  # padded (zero fill + copy), and a plain copy
        w = torch.randn(c_out, c_in, 3)
        first = operands.tap_major_weight(w)
        assert operands.tap_major_weight(w) is first
        with torch.no_grad():
            w.add_(1.0)
        second = operands.tap_major_weight(w)
        assert second is not first and second.shape == (3, 8 * -(-c_out // 8), 8 * -(-c_in // 8))
        assert torch.equal(second[:, :c_out, :c_in], w.permute(2, 0, 1))
        assert (second[:, c_out:, :] == 0).all() and (second[:, :, c_in:] == 0).all()


def test_weight_copy_cache_never_serves_a_freed_weight():
    """A new weight allocated where a freed one lived (same address, shape, dtype and
    version 0) must not get the freed weight's copy."""
    from fastres.backends.triton import operands
    for _ in range(20):
        w = torch.randn(8, 8, 3)
        taps = operands.tap_major_weight(w)
        assert torch.equal(taps, w.permute(2, 0, 1))
        del w, taps
    assert len(operands._WEIGHT_CACHE) <= 1  # entries leave with their weights
