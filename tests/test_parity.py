"""fastres/parity.py's probe (a backend is trusted with a call signature once it passed) and
its check of PyTorch's own conv1d kernels.

The wrong backends here are test-only: a real backend with its forward or backward
perturbed, or eager over a conv whose weight gradient is garbage, as PyTorch's own is on
some CPUs (fastres/upstream_kernels.py).
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastres import backends, parity
from fastres.backends import Call, composite as composite_backend
from fastres.backends import eager as eager_backend
from fastres.parity import probe, probe_case, probe_channels

# Issue 26's reproducer as a training call (B=8 becomes a probe of B=2).
REPRODUCER = Call("cpu", torch.float32, 8, 3, 19, 64, 5, 2, 8, 16, 16, "train", True, False,
                  False, True)
CALLS = [
    REPRODUCER,
    # causal, residual, locuslab ReLU placement, no bias, 64 channels (a probe of 16)
    Call("cpu", torch.float32, 4, 64, 64, 100, 3, 2, 8, 16, 0, "train", False, True, True,
         True),
    Call("cpu", torch.float32, 16, 12, 40, 300, 7, 1, 4, 24, 0, "eval", True, True, False,
         False),
    Call("cpu", torch.bfloat16, 3, 8, 8, 50, 3, 1, 2, 2, 2, "train", True, False, False, True),
    Call("cpu", torch.float64, 2, 4, 6, 30, 2, 3, 1, 0, 0, "none", True, False, True, True),
    # a ResNet1d's last stage at a short input: batch statistics over 2 values a channel,
    # where every float32 kernel's input gradient is 1e-3 off float64 (the probe takes more
    # samples; the batch is not geometry)
    Call("cpu", torch.float32, 1, 8, 8, 4, 3, 2, 1, 1, 1, "train", False, False, False, True),
]
RUNNABLE = [name for name in ("eager", "composite", "cpp")
            if backends.unavailable_reason(name) is None]


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.key())
def test_a_right_backend_passes_its_probe(call, backend, fresh_seed):
    if backends.get(backend).supports(call) is not None:
        pytest.skip(f"{backend} does not run {call.dtype}")
    assert probe(call, backend, seed=fresh_seed) is None


def test_a_training_probe_takes_enough_values_a_channel():
    case = probe_case(CALLS[-1])  # 2 outputs a sample
    assert case.B * 2 >= parity.PROBE_MIN_NORM_COUNT and case.L == 4 and case.stride == 2


def _scaled_weight_gradient(monkeypatch, factor):
    backward = composite_backend.backward

    def wrong(*args, **kwargs):
        grads = list(backward(*args, **kwargs))
        grads[1] = grads[1] * factor
        return tuple(grads)

    monkeypatch.setattr(composite_backend, "backward", wrong)


def test_a_backend_with_a_wrong_weight_gradient_fails_with_the_reason(monkeypatch,
                                                                       fresh_seed):
    _scaled_weight_gradient(monkeypatch, 1.001)
    reason = probe(REPRODUCER, "composite", seed=fresh_seed)
    assert reason is not None and reason.startswith("grad_weight off by 0.001 (bound 1e-05)")
    assert "B=2, C_in=3, C_out=19" in reason and f"seed {fresh_seed}" in reason
    # A forward-only call never runs the backward: the same backend passes it.
    assert probe(dataclasses.replace(REPRODUCER, needs_grad=False), "composite") is None


def test_a_backend_with_a_wrong_output_fails(monkeypatch, fresh_seed):
    forward = composite_backend.forward

    def perturbed(*args, **kwargs):
        out, saved, mean, var = forward(*args, **kwargs)
        return out * 1.01, saved, mean, var

    monkeypatch.setattr(composite_backend, "forward", perturbed)
    for call in (REPRODUCER, CALLS[2]):
        reason = probe(call, "composite", seed=fresh_seed)
        assert reason is not None and reason.startswith("out off by 0.01"), reason


class _GarbageWeightGrad(torch.autograd.Function):
    """Identity on y; the weight gets a gradient unrelated to the true one, as oneDNN's is."""

    @staticmethod
    def forward(ctx, y, weight):
        ctx.shape = weight.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, torch.randn(ctx.shape, dtype=grad_y.dtype)


def test_eager_over_a_conv_with_a_wrong_weight_gradient_fails(monkeypatch, fresh_seed):
    conv = eager_backend._conv

    def wrong_conv(x, weight, *args):
        return _GarbageWeightGrad.apply(conv(x, weight.detach(), *args), weight)

    monkeypatch.setattr(eager_backend, "_conv", wrong_conv)
    monkeypatch.setattr(eager_backend.upstream_kernels, "weight_grad_at_risk",
                        lambda *a: False)  # so the route does not repair it
    reason = probe(CALLS[1], "eager", seed=fresh_seed)
    assert reason is not None and reason.startswith("grad_weight off by"), reason


def test_the_probe_sees_what_this_cpus_pytorch_does(monkeypatch, fresh_seed):
    """With the route off, eager's probe of the reproducer fails exactly where PyTorch's own
    weight gradient is wrong here (oneDNN on AVX-512 x86 today), and passes elsewhere."""
    pytorch_wrong = any(r.wrong for r in parity.check_upstream(
        "cpu", [parity.Conv1dCase(2, 3, 19, 64, 5, 8, 2, 16)], seed=fresh_seed))
    monkeypatch.setattr(eager_backend.upstream_kernels, "weight_grad_at_risk",
                        lambda *a: False)
    reason = probe(REPRODUCER, "eager", seed=fresh_seed)
    assert (reason is not None) == pytorch_wrong, reason
    if pytorch_wrong:
        assert reason.startswith("grad_weight off by")


def test_one_unlucky_draw_is_not_a_failure(monkeypatch, fresh_seed):
    """A failure is confirmed on a second draw (one near a ReLU kink must not exclude a
    right backend); a backend wrong on every draw is reported."""
    backward = composite_backend.backward
    calls = []

    def wrong_once(*args, **kwargs):
        calls.append(1)
        grads = list(backward(*args, **kwargs))
        if len(calls) == 1:
            grads[1] = grads[1] * 2
        return tuple(grads)

    monkeypatch.setattr(composite_backend, "backward", wrong_once)
    assert probe(REPRODUCER, "composite", seed=fresh_seed) is None
    assert len(calls) == 2


@pytest.mark.parametrize("wrong_draws", [1, 2])
def test_the_check_draws_a_missed_case_again(monkeypatch, wrong_draws, fresh_seed):
    """`fastres check` confirms a miss on a second draw, as the probe does: one unlucky draw
    passes with the first seed recorded; a backend wrong on both draws fails."""
    backward = composite_backend.backward
    calls = []

    def wrong(*args, **kwargs):
        calls.append(1)
        grads = list(backward(*args, **kwargs))
        if len(calls) <= wrong_draws:
            grads[1] = grads[1] * 2
        return tuple(grads)

    monkeypatch.setattr(composite_backend, "backward", wrong)
    case = {"train": parity.CHECK_CASES["train"]}
    plan = parity.check_plan("cpu", ["composite"], case)
    result, *others = parity.run_check("cpu", ["composite"], case, seed=fresh_seed % 2**30)
    assert result.dtype == "float32" and len(calls) == len(plan) + 1  # one case drawn twice
    assert result.redrawn_from == fresh_seed % 2**30
    assert result.seed == (fresh_seed % 2**30 + len(plan)) % 2**31
    assert result.passed == (wrong_draws == 1)
    assert all(r.passed and r.redrawn_from is None for r in others)


def test_a_backend_that_raises_or_cannot_run_fails_with_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("backward kernel missing")

    monkeypatch.setattr(composite_backend, "backward", broken)
    assert probe(REPRODUCER, "composite") == \
        "probe raised RuntimeError: backward kernel missing"
    assert probe(dataclasses.replace(REPRODUCER, needs_grad=False), "composite") is None
    reason = probe(REPRODUCER, "cuda")
    assert reason is not None and reason.startswith("cannot run it here: ")


def test_a_probe_keeps_the_geometry_and_shrinks_batch_and_channels():
    case = probe_case(CALLS[1])
    assert (case.B, case.C_in, case.C_out, case.L) == (2, 16, 16, 100)
    assert (case.K, case.dilation, case.stride, case.padding) == (3, 8, 2, "causal")
    assert (case.norm, case.bias, case.residual, case.relu_before_add) == \
        ("train", False, "tensor", True)
    assert probe_case(REPRODUCER).padding == "same"
    # one whole block of 16 and the same remainder
    assert [probe_channels(c) for c in (1, 3, 16, 19, 32, 33, 64, 100, 513)] == \
        [1, 3, 16, 19, 32, 17, 16, 20, 17]
    with pytest.raises(ValueError, match="neither causal nor same"):
        probe_case(dataclasses.replace(REPRODUCER, pad_left=3, pad_right=1))


def test_probe_inputs_are_fresh_per_process_and_shared_by_a_signatures_candidates():
    assert parity.probe_seed(REPRODUCER) == parity.probe_seed(dataclasses.replace(REPRODUCER))
    assert parity.probe_seed(REPRODUCER) != parity.probe_seed(CALLS[1])


# --------------------------------------------------------------------------- PyTorch's kernels


def test_the_upstream_grid_has_strided_widely_dilated_convs():
    cases = parity.UPSTREAM_CASES
    assert parity.Conv1dCase(2, 3, 19, 64, 5, 8, 2, 16) in cases  # the reproducer
    assert sum(c.stride >= 2 and (c.K - 1) * c.dilation >= 32 for c in cases) >= 20
    assert all(c.L_out >= 1 for c in cases)


def test_check_upstream_flags_a_wrong_float32_weight_gradient(monkeypatch, fresh_seed):
    conv1d = F.conv1d

    def wrong_for_float32(x, weight, *args, **kwargs):
        y = conv1d(x, weight if x.dtype != torch.float32 else weight.detach(), *args, **kwargs)
        return _GarbageWeightGrad.apply(y, weight) if x.dtype == torch.float32 else y

    case = parity.Conv1dCase(2, 3, 19, 64, 5, 8, 2, 16)
    monkeypatch.setattr(F, "conv1d", wrong_for_float32)
    (result,) = parity.check_upstream("cpu", [case], seed=fresh_seed)
    assert list(result.wrong) == ["grad_weight"]
    (line,) = result.describe()
    assert line.startswith("PyTorch's conv1d weight gradient is wrong here: F.conv1d(x 2x3x64, "
                           "weight 19x3x5, stride=2, dilation=8, padding=16), float32: "
                           "relative error ")
    monkeypatch.setattr(F, "conv1d", conv1d)
    (result,) = parity.check_upstream("cpu", [parity.Conv1dCase(2, 3, 19, 64, 5, 8, 1, 16)])
    assert not result.wrong  # stride 1: right everywhere it was tried
