"""NaN and inf go where PyTorch sends them, on every backend, forward and backward.

A diverging model must see its NaN: a ReLU written as max(z, 0) returns 0 for NaN (the GPU's
max instruction does too), which would let training go on with silently zeroed activations.
Each case plants a NaN or an inf in x or in the residual and compares against the reference
run in float64:
- the output: its NaN and +-inf positions exactly, the finite elements by relative error;
- the running statistics: which elements are non-finite (an inf may become NaN: the batch
  mean's Welford merge computes inf - inf where PyTorch's sum / N keeps +-inf);
- the gradients: one the reference has non-finite entries in has non-finite entries too
  (the NaN is not swallowed); one it has none in is finite and equal. (Where exactly a NaN
  lands in a gradient depends on 0 * NaN terms each implementation does or skips, e.g. the
  padding positions and the dropped outputs of a causal conv, so only that is portable.)
A NaN in the residual leaves the batch statistics finite, so there the ReLU's gradient
semantics are checked exactly: it passes the gradient where the output is NaN.
"""
import zlib

import pytest
import torch

import fastres
from availability import cpu_backends
from fastres.conventions import rel_err
from fastres.parity import Case, make_inputs, run_backend, run_reference

CASES = [
    Case(norm="eval", residual="tensor"),
    Case(norm="eval", relu_before_add=True),
    Case(norm="train", residual="tensor"),
    Case(norm="none", residual="tensor", relu_before_add=True),
    Case(norm="train", padding="same", stride=2, L=21),
]


def _plant(inputs, where, value, seed):
    g = torch.Generator().manual_seed(seed)
    t = inputs[where]
    index = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in t.shape)
    t[index] = value
    return inputs


def _assert_same_pattern(name, got, want, scale=None, exact=False):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if exact:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN positions differ"
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{name}: +inf differs"
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{name}: -inf differs"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite positions differ"
    if finite.any():
        assert rel_err(got[finite], want[finite], scale) < 1e-5, f"{name}: finite values differ"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["x", "residual"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["eager", "composite", "cpp", "triton"])
def test_nonfinite_values_propagate_like_pytorch(backend, case, where, value):
    if backend not in cpu_backends():
        pytest.skip(f"backend {backend} does not run here")
    if where == "residual" and case.residual != "tensor":
        pytest.skip("no residual tensor in this case")
    seed = zlib.crc32(f"{backend}{case}{where}{value}".encode()) % 2**16
    inputs = _plant(make_inputs(case, torch.float32, seed=seed), where, value, seed)
    out, grads, rm, rv = run_backend(case, inputs, torch.float32, backend)
    ref_out, ref_grads, ref_rm, ref_rv = run_reference(case, inputs)
    assert not torch.isfinite(ref_out).all(), "the planted value must reach the output"
    _assert_same_pattern("out", out, ref_out, exact=True)
    # As the parity harness judges it: under training-mode BN the conv bias gradient is zero
    # in exact arithmetic, so it is judged against the incoming gradient's scale.
    bias_scale = inputs["grad_out"].abs().sum((0, 2)).norm().item()
    for name, ref_grad in ref_grads.items():
        scale = bias_scale if name == "bias" and case.norm == "train" else None
        got = grads[name].detach().double()
        bad = ~torch.isfinite(ref_grad)
        if bad.any():
            assert not torch.isfinite(got).all(), f"grad_{name}: the non-finite value was lost"
        else:
            _assert_same_pattern(f"grad_{name}", got, ref_grad, scale)
    if case.norm == "train":
        _assert_same_pattern("running_mean", rm, ref_rm)
        _assert_same_pattern("running_var", rv, ref_rv)


def test_relu_keeps_nan_in_the_triton_kernels_themselves():
    """The Triton ReLU helper on its own: NaN stays NaN, negatives become 0 (interpreter)."""
    if "triton" not in cpu_backends():
        pytest.skip("triton does not run here")
    x = torch.tensor([[float("nan"), -1.0, 0.0, 2.0, float("inf"), -float("inf")]] * 2)
    x = x.reshape(1, 2, 6)
    w = torch.ones(2, 2, 1) * 0.5
    with fastres.use_backend("triton"):
        out = fastres.conv_bn_relu(x, w, norm=None)
    expected = torch.relu(torch.nn.functional.conv1d(x, w))
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
