"""Bad input raises a clear error; it never returns a silent wrong answer."""
import pytest
import torch

import fastres


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
    ({}, dict(norm="layer"), ValueError, r"norm must be 'batch' or None"),
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
