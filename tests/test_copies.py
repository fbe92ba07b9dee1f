"""fastres/_copies.py: the rule every fast path holding copies of weights checks them by."""
import pytest
import torch
from torch import nn

import fastres
from fastres import _copies
from fastres._copies import PROBES, WeightCopies
from fastres import _ext

CHECKS = ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    _ext.load_error() is not None, reason=f"the compiled check: {_ext.load_error()}"))]


@pytest.fixture(params=CHECKS)
def check(request, monkeypatch):
    """Which implementation of the rule runs: the Python loop, or the extension's one call."""
    if request.param == "python":
        monkeypatch.setitem(_ext._DIRECT, "stream_unchanged", None)
    else:
        assert _ext.direct("stream_unchanged") is not None
    return request.param


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3), nn.BatchNorm1d(16), nn.Conv1d(16, 4, 1))
    return model, [t for t in [*model.parameters(), *model.buffers()]]


def test_what_is_seen_and_what_may_escape(check):
    model, tensors = _model()
    big = model[0].weight                 # 384 elements: probed at both ends only
    small = model[1].running_mean         # 16 elements: compared whole
    assert big.numel() > 2 * PROBES and small.numel() <= PROBES
    copies = WeightCopies(model, tensors)
    assert copies.unchanged(tensors) and copies.equal(tensors)

    def seen(write) -> bool:
        """Whether copies see write(); the write is undone and new copies taken."""
        nonlocal copies
        saved = [t.detach().clone() for t in tensors]
        write()
        changed = not copies.unchanged(tensors)
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        copies = WeightCopies(model, tensors)
        return changed

    middle = big.numel() // 2
    with torch.no_grad():
        assert seen(lambda: big.view(-1)[middle].add_(1e-3))       # counter moves
        assert not seen(lambda: big.add_(0))                       # counter, no write
    assert seen(lambda: big.data.view(-1)[3].add_(1))               # .data, first window
    assert seen(lambda: big.data.view(-1)[-3].add_(1))              # .data, last window
    assert seen(lambda: small.data.view(-1)[7].add_(1))             # .data, small tensor
    assert seen(lambda: big.data.mul_(0.5))                         # .data, whole tensor
    assert not seen(lambda: big.data.view(-1)[middle].add_(1))      # the documented escape
    # ... which forget_weights covers, for the module or any module holding it.
    big.data.view(-1)[middle].add_(1)
    fastres.forget_weights(nn.ModuleList([model]))
    assert not copies.unchanged(tensors) and not copies.equal(tensors)


def test_a_bump_without_a_write_is_compared_once(check):
    model, tensors = _model()
    copies = WeightCopies(model, tensors)
    with torch.no_grad():
        model[1].running_var.add_(0)
    calls = []
    real = _copies.same_values
    _copies.same_values = lambda a, b: calls.append(len(a)) or real(a, b)
    try:
        assert copies.unchanged(tensors)
        assert copies.unchanged(tensors)
    finally:
        _copies.same_values = real
    if check == "compiled":  # (the compiled check compares in C++: nothing reaches Python)
        assert calls == []


def test_a_replaced_or_reshaped_tensor_is_a_change(check):
    model, tensors = _model()
    copies = WeightCopies(model, tensors)
    replaced = [t.detach().clone() for t in tensors]     # same values, new memory
    assert not copies.unchanged(replaced) and copies.equal(replaced)
    reshaped = list(tensors)
    reshaped[0] = tensors[0].view(16, 24)
    assert not copies.unchanged(reshaped)
    assert not copies.unchanged(tensors[:-1])


def test_nan_compares_by_its_bits(check):
    model, tensors = _model()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    copies = WeightCopies(model, tensors)
    assert copies.unchanged(tensors) and copies.equal(tensors)
