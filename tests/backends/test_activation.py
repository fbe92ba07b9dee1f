"""The epilogue's activation (docs/spec.md, "Activation") in the PyTorch-op backends: the
composite backend's forward and analytic backward, and the eager backend under autograd,
against the float64 reference (autograd through it), for every activation, norm mode,
residual and relu_before_add; fresh random inputs per case, fp32 bound 1e-5."""
import itertools
import zlib

import pytest
import torch

from fastres.backends import composite
from fastres.backends._activation import ACTIVATION_NAMES, parse_activation
from fastres.backends.eager import conv_bn_relu_eager
from fastres.conventions import NORM_EVAL, NORM_NONE, NORM_TRAIN, conv_padding, rel_err
from fastres.reference import conv_bn_relu_reference

ACTIVATIONS = ["relu", "gelu", "silu", "tanh", "leaky_relu", "leaky_relu:0.2", "elu",
               "elu:0.5"]
NORMS = [NORM_TRAIN, NORM_EVAL, NORM_NONE]
CASES = list(itertools.product(ACTIVATIONS, NORMS, [False, True], [False, True]))
TOL = 1e-5
B, C_IN, C_OUT, L, K, D = 3, 4, 5, 20, 3, 2
MOMENTUM = 0.1
EPS = 1e-5


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(B, C_IN, L), weight=r(C_OUT, C_IN, K) * 0.3, bias=r(C_OUT) * 0.1,
                gamma=1 + 0.3 * r(C_OUT), beta=0.3 * r(C_OUT), residual=r(B, C_OUT, L),
                running_mean=0.1 * r(C_OUT), running_var=0.5 + torch.rand(C_OUT, generator=g,
                                                                         dtype=torch.float64),
                grad=r(B, C_OUT, L))


def _seed(*case):
    """A seed of its own per case, stable across runs (str hashes are salted per process)."""
    return zlib.crc32(repr(case).encode())


def _reference(t, activation, norm, residual, relu_before_add):
    """Outputs, gradients (x, weight, bias, gamma, beta, residual) and running stats."""
    leaves = {k: t[k].clone().requires_grad_() for k in
              ("x", "weight", "bias", "gamma", "beta", "residual")}
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    out = conv_bn_relu_reference(
        leaves["x"], leaves["weight"], leaves["bias"], rm, rv,
        leaves["gamma"], leaves["beta"], training=norm == NORM_TRAIN, momentum=MOMENTUM,
        eps=EPS, dilation=D, padding="causal",
        residual=leaves["residual"] if residual else None, relu_before_add=relu_before_add,
        norm=None if norm == NORM_NONE else "batch", activation=activation)
    names = ["x", "weight", "bias"] + (["gamma", "beta"] if norm != NORM_NONE else []) \
        + (["residual"] if residual else [])
    grads = torch.autograd.grad(out, [leaves[n] for n in names], t["grad"])
    return out, dict(zip(names, grads)), rm, rv


def _scale(name, want):
    # A conv bias before training-mode batch norm has zero gradient in exact arithmetic:
    # judged against its weight's gradient (tests/parity.py's rule).
    if name == "bias" and "gamma" in want and want["bias"].norm() < 1e-3 * want["weight"].norm():
        return want["weight"].norm().item()
    return None


@pytest.mark.parametrize("activation, norm, residual, relu_before_add", CASES)
def test_composite_forward_and_backward(activation, norm, residual, relu_before_add):
    t = _inputs(_seed(activation, norm, residual, relu_before_add))
    out_r, grads_r, rm_r, rv_r = _reference(t, activation, norm, residual, relu_before_add)
    f = {k: v.float() for k, v in t.items()}
    left, right = conv_padding(K, D, 1, "causal")
    rm, rv = f["running_mean"].clone(), f["running_var"].clone()
    bn = norm != NORM_NONE
    out, saved, batch_mean, batch_var = composite.forward(
        f["x"], f["weight"], f["bias"], f["gamma"] if bn else None, f["beta"] if bn else None,
        rm if bn else None, rv if bn else None, f["residual"] if residual else None,
        stride=1, dilation=D, pad_left=left, pad_right=right, norm=norm, eps=EPS,
        momentum_factor=MOMENTUM, relu_before_add=relu_before_add, save_for_backward=True,
        activation=activation)
    assert rel_err(out, out_r) < TOL
    var = batch_var if norm == NORM_TRAIN else (rv if norm == NORM_EVAL else rv.new_empty(0))
    grads = composite.backward(
        f["grad"], f["x"], f["weight"], f["gamma"] if bn else None, f["beta"] if bn else None,
        saved, out, var, has_bias=True, has_residual=residual, stride=1, dilation=D,
        pad_left=left, pad_right=right, norm=norm, eps=EPS, relu_before_add=relu_before_add,
        activation=activation, residual=f["residual"] if residual else None)
    got = dict(zip(["x", "weight", "bias", "gamma", "beta", "residual"], grads))
    for name, want in grads_r.items():
        err = rel_err(got[name], want, _scale(name, grads_r))
        assert err < TOL, f"gradient of {name}: {err:.2e}"
    if norm == NORM_TRAIN:
        assert rel_err(rm, rm_r) < TOL and rel_err(rv, rv_r) < TOL


@pytest.mark.parametrize("activation, norm, residual, relu_before_add", CASES)
def test_eager_forward_and_backward(activation, norm, residual, relu_before_add):
    t = _inputs(1 + _seed(activation, norm, residual, relu_before_add))
    out_r, grads_r, rm_r, rv_r = _reference(t, activation, norm, residual, relu_before_add)
    f = {k: v.float().requires_grad_() if k in ("x", "weight", "bias", "gamma", "beta",
                                                "residual") else v.float()
         for k, v in t.items()}
    left, right = conv_padding(K, D, 1, "causal")
    bn = norm != NORM_NONE
    rm, rv = f["running_mean"].clone(), f["running_var"].clone()
    out = conv_bn_relu_eager(
        f["x"], f["weight"], f["bias"], f["gamma"] if bn else None, f["beta"] if bn else None,
        rm if bn else None, rv if bn else None, f["residual"] if residual else None,
        stride=1, dilation=D, pad_left=left, pad_right=right, norm=norm, eps=EPS,
        momentum_factor=MOMENTUM, relu_before_add=relu_before_add, activation=activation)
    assert rel_err(out, out_r) < TOL
    names = list(grads_r)
    grads = torch.autograd.grad(out, [f[n] for n in names], f["grad"])
    for name, got in zip(names, grads):
        err = rel_err(got, grads_r[name], _scale(name, grads_r))
        assert err < TOL, f"gradient of {name}: {err:.2e}"
    if norm == NORM_TRAIN:
        assert rel_err(rm, rm_r) < TOL and rel_err(rv, rv_r) < TOL


def test_relu_is_the_default_and_unchanged():
    t = {k: v.float() for k, v in _inputs(3).items()}
    left, right = conv_padding(K, D, 1, "causal")
    args = (t["x"], t["weight"], t["bias"], t["gamma"], t["beta"], t["running_mean"].clone(),
            t["running_var"].clone(), t["residual"])
    kw = dict(stride=1, dilation=D, pad_left=left, pad_right=right, norm=NORM_EVAL, eps=EPS,
              momentum_factor=MOMENTUM, relu_before_add=True)
    default = conv_bn_relu_eager(*args, **kw)
    assert torch.equal(default, conv_bn_relu_eager(*args, **kw, activation="relu"))
    assert torch.equal(composite.forward(*args, **kw, save_for_backward=False)[0],
                       composite.forward(*args, **kw, save_for_backward=False,
                                         activation="relu")[0])


def test_gelu_backward_after_a_residual_needs_it():
    t = {k: v.float() for k, v in _inputs(4).items()}
    left, right = conv_padding(K, D, 1, "causal")
    out, saved, _, batch_var = composite.forward(
        t["x"], t["weight"], t["bias"], t["gamma"], t["beta"], None, None, t["residual"],
        stride=1, dilation=D, pad_left=left, pad_right=right, norm=NORM_TRAIN, eps=EPS,
        momentum_factor=MOMENTUM, relu_before_add=False, save_for_backward=True,
        activation="gelu")
    with pytest.raises(ValueError, match="needs the residual"):
        composite.backward(t["grad"], t["x"], t["weight"], t["gamma"], t["beta"], saved, out,
                           batch_var, has_bias=True, has_residual=True, stride=1, dilation=D,
                           pad_left=left, pad_right=right, norm=NORM_TRAIN, eps=EPS,
                           relu_before_add=False, activation="gelu")


@pytest.mark.parametrize("text, match", [("swish", "activation must be one of"),
                                         ("relu:2", "takes no parameter"),
                                         ("leaky_relu:-1", "slope must be >= 0"),
                                         ("elu:0", "alpha > 0"),
                                         ("elu:x", "not a number"),
                                         (None, "must be a string")])
def test_bad_activation_names_the_argument(text, match):
    with pytest.raises(ValueError, match=match):
        parse_activation(text)


def test_every_name_is_covered():
    assert {a.partition(":")[0] for a in ACTIVATIONS} == set(ACTIVATION_NAMES)
