"""Bad input raises a clear error; it never returns a silent wrong answer."""
import pytest
import torch

import fastres
from fastres import backends
from availability import cpu_backends
from fastres.conventions import BATCH_NORM_ZERO_EPS_IN_EVAL, rel_err
from fastres.reference import conv_bn_relu_reference


def args(B=2, C_in=4, C_out=6, L=10, K=3, dtype=torch.float32):
    return dict(x=torch.randn(B, C_in, L, dtype=dtype), weight=torch.randn(C_out, C_in, K, dtype=dtype),
                bias=torch.randn(C_out, dtype=dtype), running_mean=torch.zeros(C_out),
                running_var=torch.ones(C_out), bn_weight=torch.ones(C_out), bn_bias=torch.zeros(C_out))


def call(a, **kw):
    return fastres.conv_bn_relu(a.pop("x"), a.pop("weight"), **a, **kw)


@pytest.mark.parametrize("change, kw, exc, match", [
    (dict(x=torch.randn(4, 10)), {}, ValueError, r"x must have shape \(B, C_in, L\)"),
    (dict(weight=torch.randn(6, 4)), {}, ValueError, r"weight must have shape"),
    (dict(weight=torch.randn(6, 5, 3)), {}, ValueError, r"expects 5 input channels but x has 4"),
    (dict(bias=torch.randn(5)), {}, ValueError, r"bias must have shape \(6,\)"),
    (dict(running_mean=torch.zeros(3)), {}, ValueError, r"running_mean must have shape \(6,\)"),
    (dict(bn_weight=torch.ones(7)), {}, ValueError, r"bn_weight must have shape"),
    (dict(weight=torch.randn(6, 4, 3, dtype=torch.float64)), {}, TypeError, r"weight dtype"),
    (dict(x=torch.randint(0, 3, (2, 4, 10))), {}, TypeError, r"x must be float32"),
    (dict(running_var=None), {}, ValueError, r"both be given or both be None"),
    ({}, dict(residual=torch.randn(2, 6, 9)), ValueError, r"residual must have the output's shape"),
    ({}, dict(residual=torch.randn(2, 6, 10, dtype=torch.float64)), TypeError, r"residual dtype"),
    ({}, dict(padding="valid"), ValueError, r"padding must be one of"),
    ({}, dict(dilation=0), ValueError, r"dilation must be an int >= 1"),
    ({}, dict(stride=1.5), ValueError, r"stride must be an int >= 1"),
    ({}, dict(norm="group"), ValueError, r"norm must be 'batch', 'layer' or None"),
    (dict(running_mean=None, running_var=None), dict(training=False), ValueError, r"eval-mode batch norm needs"),
    ({}, dict(training=True, momentum=None), ValueError, r"momentum=None"),
])
def test_bad_arguments(change, kw, exc, match):
    a = args()
    a.update(change)
    with pytest.raises(exc, match=match):
        call(a, **kw)


def test_output_length_below_one():
    # same padding at stride 2 pads (K-1)*d // 2 = 1 per side: L_out = (1 + 2 - 3 - 1) // 2 + 1 = 0
    x, w = torch.randn(2, 4, 1), torch.randn(6, 4, 4)
    with pytest.raises(ValueError, match="output length would be 0"):
        fastres.conv_bn_relu(x, w, stride=2, padding="same", norm=None)


def test_batch_of_one_value_per_channel_in_training():
    a = args(B=1, L=1, K=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        call(a, training=True)
    # The same shape is fine in eval mode, as with nn.BatchNorm1d.
    a = args(B=1, L=1, K=1)
    assert call(a, training=False).shape == (1, 6, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA GPU")
def test_device_mismatch():
    a = args()
    a["weight"] = a["weight"].cuda()
    with pytest.raises(ValueError, match="weight is on cuda"):
        call(a)


def test_device_mismatch_meta():
    # The CPU twin of test_device_mismatch: a meta tensor stands in for another device.
    a = args()
    a["bias"] = a["bias"].to("meta")
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        call(a)


# --------------------------------------------------------------------------- eps, as PyTorch


@pytest.mark.parametrize("backend", ["eager", "composite", "cpp"])
@pytest.mark.parametrize("training, eps, ok", [
    (True, 0.0, False), (True, -1e-5, False), (False, -1e-5, False),
    (False, 0.0, BATCH_NORM_ZERO_EPS_IN_EVAL),   # torch 2.11 refuses it, later ones take it
])
def test_eps_is_validated_as_pytorch_does(backend, training, eps, ok):
    """PyTorch raises for eps <= 0 with batch statistics and eps < 0 with running ones (eps
    <= 0 there too on torch 2.11), and so does fastres, on every path (before, whether
    fastres raised depended on the sequence length)."""
    if backends.get(backend).unavailable_reason() is not None:
        pytest.skip(f"{backend} is not available here")
    for length in (8, 600):  # short and long sequences took different paths by default
        a = args(L=length)
        with fastres.use_backend(backend):
            if ok:
                kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v)
                          for k, v in a.items()}
                want = conv_bn_relu_reference(kwargs.pop("x"), kwargs.pop("weight"), **kwargs,
                                              training=training, eps=eps)
                assert rel_err(call(a, training=training, eps=eps), want) < 1e-5
            else:
                with pytest.raises(ValueError, match="batch_norm eps must be"):
                    call(a, training=training, eps=eps)
        a = args(L=length)
        try:
            torch.nn.functional.batch_norm(torch.randn(2, 6, length), a["running_mean"],
                                           a["running_var"], training=training, eps=eps)
            pytorch_ok = True
        except ValueError:
            pytorch_ok = False
        assert pytorch_ok == ok


@pytest.mark.skipif(not BATCH_NORM_ZERO_EPS_IN_EVAL,
                    reason=f"torch {torch.__version__}'s F.batch_norm refuses eps = 0 in eval, "
                    "and so does fastres (test_eps_is_validated_as_pytorch_does checks that)")
def test_eps_zero_in_eval_with_zero_variance_is_the_same_on_every_backend():
    """eval, eps = 0 and a running variance of 0 (allowed by PyTorch >= 2.12): (y - mean) / 0
    on every backend, +inf / 0 (the ReLU of -inf) / NaN, never a finite guess (the C++
    kernels gave 1.0 when they folded inf into the weights, Triton 0). PyTorch's own
    F.batch_norm gives NaN or this depending on the input's memory layout."""
    a = args()
    a["running_var"] = torch.zeros(6)
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(a["x"], (2, 0)), a["weight"], a["bias"])
    dev = y - a["running_mean"][:, None]
    want = torch.where(dev > 0, torch.inf, torch.where(dev < 0, 0.0, torch.nan))
    for backend in ("eager", "composite", "cpp", "triton"):
        if backend not in cpu_backends():
            continue
        b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        with fastres.use_backend(backend):
            got = call(b, training=False, eps=0.0)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), backend
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), backend


# --------------------------------------------------------------------------- degenerate shapes


def test_zero_input_channels_raise():
    # PyTorch's own conv returns a (B, 0, L) tensor for C_in = 0 whatever C_out is; the
    # backends disagreed. fastres refuses instead of guessing.
    with pytest.raises(ValueError, match="at least one input channel"):
        fastres.conv_bn_relu(torch.randn(2, 0, 8), torch.randn(3, 0, 3), norm=None)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_returns_empty_as_batchnorm_does(training):
    bn = torch.nn.BatchNorm1d(6)
    conv = torch.nn.Conv1d(4, 6, 3)
    x = torch.randn(0, 4, 10, requires_grad=True)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    out = fastres.conv_bn_relu(x, conv.weight, conv.bias, bn.running_mean, bn.running_var,
                               bn.weight, bn.bias, training=training,
                               num_batches_tracked=bn.num_batches_tracked)
    assert out.shape == (0, 6, 10)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.num_batches_tracked.item() == (1 if training else 0)


def test_meta_tensors_give_meta_outputs():
    conv, bn = torch.nn.Conv1d(4, 6, 3).to("meta"), torch.nn.BatchNorm1d(6).to("meta")
    x = torch.empty(2, 4, 10, device="meta")
    out = fastres.conv_bn_relu(x, conv.weight, conv.bias, bn.running_mean, bn.running_var,
                               bn.weight, bn.bias, training=False, residual=torch.empty(
                                   2, 6, 10, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 6, 10)
    block = fastres.TemporalBlock(4, 6, 3).to("meta")
    assert block(x).shape == (2, 6, 10)
