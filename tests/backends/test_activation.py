"""The epilogue's activation (docs/spec.md, "Activation").

In the PyTorch-op backends: the composite backend's forward and analytic backward, and the
eager backend under autograd, against the float64 reference (autograd through it), for every
activation, norm mode, residual and relu_before_add; fp32 bound 1e-5.
Through the op on every kernel backend (cpp; triton in its interpreter at tiny shapes; cuda
on a GPU): the parity harness with the activation, outputs poisoned, forward, every gradient
and the running statistics, within the spec's bound for each dtype. A backend whose
kernels lack an activation says so in supports(), and the dispatcher leaves it out.
Every example draws fresh inputs (fresh_seed)."""
import itertools
import zlib

import pytest
import torch

import fastres
from fastres import backends
from fastres.backends import composite
from fastres.backends._activation import ACTIVATION_NAMES, parse_activation
from fastres.backends.eager import conv_bn_relu_eager
from fastres.conventions import NORM_EVAL, NORM_NONE, NORM_TRAIN, conv_padding, rel_err
from fastres.dispatch.op import candidates
from fastres.parity import Case, check_parity, probe
from fastres.reference import conv_bn_relu_reference
from availability import requires_cuda, skip_unless_available

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "leaky_relu", "leaky_relu:0.2",
               "elu", "elu:0.5"]
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


# ------------------------------------------------------------------ the op, kernel backends

KERNEL_BACKENDS = ["composite", "cpp", "triton", "cuda"]
# The stage's modes that change what an activation's backward reads: norm mode, a residual
# (the derivative is taken at the sum), relu_before_add (also at the inner input), no bias,
# stride and same padding.
OP_CASES = [
    Case(B=2, C_in=3, C_out=5, L=12, K=3, dilation=2, residual="tensor"),
    Case(B=2, C_in=4, C_out=4, L=10, residual="identity", relu_before_add=True),
    Case(B=2, C_in=3, C_out=4, L=11, K=2, norm="eval", residual="tensor",
         relu_before_add=True),
    Case(B=2, C_in=3, C_out=4, L=9, K=3, stride=2, padding="same", norm="none",
         relu_before_add=True, bias=False),
    Case(B=2, C_in=3, C_out=6, L=12, K=2, norm="none", residual="tensor"),
]
OP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # (float64: gradcheck below)


def _runs(backend, activation):
    return backends.get(backend).activations == "all" \
        or activation.partition(":")[0] in backends.get(backend).activations


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backend_against_reference(backend, activation, dtype, fresh_seed):
    skip_unless_available(backend)
    if dtype not in backends.get(backend).dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    if not _runs(backend, activation):
        # Not a hidden gap: test_backend_without_an_activation_says_why covers what it says.
        pytest.skip(f"{backend}: {backends.get(backend).supports(_call(activation))}")
    cases = OP_CASES
    if backend == "triton":  # the interpreter is slow: one case each, all cases over the grid
        cases = [OP_CASES[ACTIVATIONS.index(activation) % len(OP_CASES)]]
    for i, case in enumerate(cases):
        case = Case(**{**case.__dict__, "activation": activation})
        check_parity(case, backend, dtype, seed=fresh_seed + i)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backend_against_reference_cuda(backend, activation, dtype, fresh_seed):
    skip_unless_available(backend, "cuda")
    if not _runs(backend, activation):
        pytest.skip(f"{backend}: {backends.get(backend).supports(_call(activation, 'cuda'))}")
    from fastres.conventions import cudnn_conv_tf32_set
    with cudnn_conv_tf32_set(False):
        for i, case in enumerate(OP_CASES):
            case = Case(**{**case.__dict__, "activation": activation})
            check_parity(case, backend, dtype, device="cuda", seed=fresh_seed + i)


def _call(activation, device="cpu", dtype=torch.float32):
    return backends.Call(device, dtype, 2, 4, 4, 16, 3, 1, 1, 2, 0, NORM_TRAIN, True, False,
                         False, True, parse_activation(activation).text)


def test_backend_without_an_activation_says_why():
    """A kernel backend that lacks an activation is no candidate for it, with its reason,
    and forcing it raises that reason; its ReLU calls are unchanged."""
    class ReluOnly(backends.KernelBackend):
        name, devices, dtypes = "relu_only_test", ("cpu",), (torch.float32,)

        def load(self):
            return composite
    relu_only = ReluOnly()
    assert relu_only.supports(_call("relu")) is None
    reason = relu_only.supports(_call("gelu"))
    assert reason is not None and "gelu" in reason and "relu" in reason
    assert "elu" in relu_only.supports(_call("elu:0.5"))
    x, w = torch.randn(2, 4, 16), torch.randn(4, 4, 3)
    backends.register(relu_only)
    try:
        with fastres.use_backend("relu_only_test"):
            with pytest.raises(RuntimeError, match="cannot run this call: .*no tanh"):
                fastres.conv_bn_relu(x, w, training=True, activation="tanh")
            fastres.conv_bn_relu(x, w, training=True)  # ReLU runs
    finally:
        backends._REGISTRY.pop("relu_only_test")
    for name in ("cpp", "triton", "cuda", "composite", "eager"):
        assert backends.get(name).activations == "all"


def test_activation_is_part_of_the_dispatch_signature():
    """Two activations of one geometry are two signatures (and keys); the default ReLU's key
    is the one stored before activations existed; spellings of one activation agree."""
    relu, gelu = _call("relu"), _call("gelu")
    assert relu != gelu and relu.key() != gelu.key()
    assert "act" not in relu.key() and gelu.key().endswith("|act=gelu")
    assert _call("leaky_relu:0.01") == _call("leaky_relu")
    assert _call("leaky_relu:0.2").key() != _call("leaky_relu").key()


@pytest.mark.parametrize("backend", ["cpp", "composite"])
def test_the_probe_judges_the_activation(backend, fresh_seed):
    """The dispatcher's correctness probe runs the call's activation: a backend whose
    kernels compute ReLU for it fails the probe."""
    skip_unless_available(backend)
    call = _call("elu:0.5")
    assert probe(call, backend, seed=fresh_seed) is None

    class Wrong(backends.KernelBackend):
        name, devices, dtypes, activations = "wrong_act_test", ("cpu",), (torch.float32,), "all"

        def forward(self, *args, activation="relu", **kwargs):
            return super().forward(*args, **kwargs)  # drops the activation: ReLU
    wrong = Wrong()
    wrong._module = backends.get(backend).module
    backends.register(wrong)
    try:
        assert probe(call, "wrong_act_test", seed=fresh_seed) is not None
    finally:
        backends._REGISTRY.pop("wrong_act_test")


def test_op_refuses_an_unknown_activation():
    x, w = torch.randn(2, 3, 8), torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastres.conv_bn_relu(x, w, training=True, activation="swish")
    with pytest.raises(ValueError, match="slope must be >= 0"):
        fastres.conv_bn_relu(x, w, training=True, activation="leaky_relu:-0.1")


@pytest.mark.parametrize("activation", ["gelu", "leaky_relu:0.1"])
def test_gradcheck_float64_cpp(activation):
    """float64 gradcheck of the C++ kernels' activation backward (every input)."""
    skip_unless_available("cpp")
    g = torch.Generator().manual_seed(3)
    new = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa
    x, w, b, gamma, beta, res = new(2, 2, 7), new(3, 2, 3), new(3), new(3), new(3), new(2, 3, 7)

    def fn(x, w, b, gamma, beta, res):
        with fastres.use_backend("cpp"):
            return fastres.conv_bn_relu(x, w, b, None, None, gamma, beta, training=True,
                                        residual=res, relu_before_add=True,
                                        activation=activation)
    assert torch.autograd.gradcheck(fn, (x, w, b, gamma, beta, res), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation, norm", [("gelu", "batch"), ("leaky_relu:0.2", "layer")])
def test_the_op_compiles_with_an_activation(activation, norm, fresh_seed):
    """torch.compile(fullgraph=True) traces the op with an activation and layer norm (torch
    2.11's dynamo cannot trace the parser's dataclass: the traced path avoids it)."""
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, generator=g, requires_grad=True)
    gamma, beta = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)

    def stage(x, w):
        return fastres.conv_bn_relu(x, w, None, None, None, gamma, beta, training=True,
                                    dilation=2, norm=norm, activation=activation)
    compiled = torch.compile(stage, fullgraph=True)
    out, want = compiled(x, w), stage(x, w)
    assert rel_err(out, want) < 1e-5
    grads = torch.autograd.grad(out, [x, w], torch.ones_like(out))
    want_grads = torch.autograd.grad(want, [x, w], torch.ones_like(want))
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) < 1e-5
