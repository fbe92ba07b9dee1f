"""The route around PyTorch's wrong CPU conv weight gradient (fastres/upstream_kernels.py).

Everything here is judged against float64, which PyTorch computes without oneDNN, so the
tests hold on any CPU; where this CPU's oneDNN is wrong (benchmarks/upstream_conv1d_wgrad.py)
they also show that the route is what makes the difference.
"""
import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import upstream_kernels
from fastres.conventions import rel_err
from fastres.nn import _stage
from fastres.upstream_kernels import (one_tap_conv1d, plain_convs_routed, route_weight_grad,
                                      weight_grad_at_risk, weight_grad_by_columns)

# (K, dilation, stride, pad_left, pad_right, L): the reproducer, a causal pair,
# asymmetric both ways, no padding, a receptive field longer than the input.
GEOMETRIES = [(5, 8, 2, 16, 16, 64), (3, 8, 2, 16, 0, 100), (7, 4, 3, 24, 0, 64),
              (3, 1, 2, 1, 1, 33), (4, 2, 2, 0, 3, 20), (2, 1, 3, 0, 0, 17), (7, 16, 2, 96, 0, 9)]


def _conv(x, w, stride, dilation, left, right):
    return F.conv1d(F.pad(x, [left, right]), w, None, stride, 0, dilation)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_weight_grad_by_columns_is_the_float64_weight_gradient(geometry, fresh_seed):
    k, d, s, left, right, length = geometry
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(3, 5, length, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, k, dtype=torch.float64, generator=g).requires_grad_()
    y = _conv(x, w, s, d, left, right)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, w, grad_y)
    got = weight_grad_by_columns(grad_y.float(), x.float(), k, s, d, left, right)
    assert got.shape == w.shape and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5
    # x as a non-contiguous view (a slice of a wider tensor): the columns follow its strides.
    wide = torch.randn(3, 5, 2 * length + 1, generator=g, dtype=torch.float64)
    view = wide[:, :, 1::2]
    y = _conv(view, w, s, d, left, right)
    (expected,) = torch.autograd.grad(y, w, grad_y)
    assert rel_err(weight_grad_by_columns(grad_y, view, k, s, d, left, right), expected) < 1e-12


def _float32_grads(x64, w64, grad_y64, conv):
    x = x64.float().requires_grad_()
    w = w64.float().requires_grad_()
    y = conv(x, w)
    return (y,) + torch.autograd.grad(y, (x, w), grad_y64.float())


def test_the_route_gives_every_gradient_of_the_reproducer(fresh_seed):
    """Issue 26's snippet: x (2, 3, 64), w (19, 3, 5), stride 2, dilation 8, padding 16."""
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(2, 3, 64, generator=g, dtype=torch.float64)
    w = torch.randn(19, 3, 5, generator=g, dtype=torch.float64)
    grad_y = torch.randn(2, 19, 32, generator=g, dtype=torch.float64)

    def plain(x_, w_):
        return F.conv1d(x_, w_, None, 2, 16, 8)

    def routed(x_, w_):
        assert weight_grad_at_risk(x_, w_, 2)
        return route_weight_grad(plain(x_, w_.detach()), x_, w_, 2, 8, 16, 16)

    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = plain(x_ref, w_ref)
    expected = (y_ref,) + torch.autograd.grad(y_ref, (x_ref, w_ref), grad_y)
    got = _float32_grads(x, w, grad_y, routed)
    for name, a, b in zip(("out", "grad_x", "grad_weight"), got, expected):
        assert rel_err(a, b) < 1e-5, name
    plain_error = rel_err(_float32_grads(x, w, grad_y, plain)[2], expected[2])
    print(f"\nplain PyTorch's weight gradient here: relative error {plain_error:.2g}")


def test_the_route_has_a_double_backward_and_runs_under_torch_func(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    grad_y = torch.randn(2, 4, 20, generator=g, dtype=torch.float64)

    def second_order(conv, x_, w_):
        x_, w_ = x_.clone().requires_grad_(), w_.clone().requires_grad_()
        (gw,) = torch.autograd.grad(conv(x_, w_), w_, grad_y.to(x_.dtype), create_graph=True)
        return torch.autograd.grad(gw.square().sum(), (x_, w_), allow_unused=True)

    def plain(x_, w_):
        return F.conv1d(x_, w_, None, 2, 4, 4)

    def routed(x_, w_):
        return route_weight_grad(plain(x_, w_.detach()), x_, w_, 2, 4, 4, 4)

    for got, expected in zip(second_order(routed, x.float(), w.float()),
                             second_order(plain, x, w)):
        assert (got is None) == (expected is None)
        if expected is not None:
            assert rel_err(got, expected) < 1e-5

    def loss(conv):
        return lambda w_, x_: conv(x_, w_).square().sum()

    got = torch.func.grad(loss(routed))(w.float(), x.float())
    assert rel_err(got, torch.func.grad(loss(plain))(w, x)) < 1e-5


# (stride, pad_left, pad_right, L): even and odd lengths, padding on either side.
ONE_TAP = [(2, 0, 0, 64), (2, 0, 0, 33), (3, 0, 0, 20), (2, 1, 0, 17), (4, 2, 3, 30), (2, 0, 1, 8)]


@pytest.mark.parametrize("geometry", ONE_TAP, ids=str)
def test_a_one_tap_conv_runs_unstrided_and_computes_every_gradient(geometry, fresh_seed,
                                                                   monkeypatch):
    """one_tap_conv1d: output, input, weight and bias gradients against float64, and no
    strided conv anywhere in it (so no weight gradient of the kind at risk)."""
    s, left, right, length = geometry
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(3, 6, length, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, 1, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b)]
    y64 = F.conv1d(F.pad(leaves64[0], [left, right]), leaves64[1], leaves64[2], s)
    grad_y = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    expected = (y64,) + torch.autograd.grad(y64, leaves64, grad_y)
    strides = []
    conv1d = F.conv1d
    monkeypatch.setattr(F, "conv1d", lambda *a, **k: strides.append(
        a[3] if len(a) > 3 else k.get("stride", 1)) or conv1d(*a, **k))
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    y = one_tap_conv1d(*leaves, s, left, right)
    got = (y,) + torch.autograd.grad(y, leaves, grad_y.float())
    assert strides == [1]
    for name, a, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, expected):
        assert a.shape == e.shape and rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("conv", ["conv1", "downsample"])
@pytest.mark.parametrize("path", ["plain_forward", "stages on eager"])
def test_a_strided_one_tap_conv_runs_unstrided(conv, path, fresh_seed, monkeypatch):
    """A strided block's 1x1 convs (conv1 at kernel size 1; the "auto" projection) run
    unstrided on the paths that run PyTorch's convs (the module's plain forward, stages on
    the eager backend), and the block's output and every gradient match float64."""
    import copy
    torch.manual_seed(fresh_seed)
    block = fastres.BasicBlock(4, 8, stride=2, kernel_size=1 if conv == "conv1" else 3,
                               downsample="auto").train()
    x = torch.randn(2, 4, 37, dtype=torch.float64)

    def grads(module, x_):
        x_ = x_.requires_grad_()
        if path == "plain_forward":
            out = module.plain_forward(x_)
        else:
            with fastres.dispatch.use_backend("eager"):
                out = module.fused_forward(x_)
        return (out,) + torch.autograd.grad(out, [x_] + list(module.parameters()),
                                            torch.ones_like(out))

    expected = grads(copy.deepcopy(block).double(), x.clone())
    fused = copy.deepcopy(block)
    watched_weight = fused.conv1.weight if conv == "conv1" else fused.downsample[0].weight
    strides = []  # the stride of every F.conv1d of that conv's weight
    conv1d = F.conv1d

    def watched(x_, w, *args, **kwargs):
        if w is watched_weight:
            stride = args[2] if len(args) > 2 else kwargs.get("stride", 1)
            strides.append(stride if isinstance(stride, int) else stride[0])
        return conv1d(x_, w, *args, **kwargs)

    monkeypatch.setattr(F, "conv1d", watched)
    got = grads(fused, x.float())
    assert strides and set(strides) == {1}, strides
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 1e-5


def test_what_takes_the_route():
    x = torch.randn(2, 3, 16)
    w = torch.randn(4, 3, 3, requires_grad=True)
    assert weight_grad_at_risk(x, w, 2) and weight_grad_at_risk(x, w, 3)
    assert not weight_grad_at_risk(x, w, 1)                       # never seen wrong
    assert not weight_grad_at_risk(x.double(), w.double(), 2)     # oneDNN runs no float64
    assert not weight_grad_at_risk(x.bfloat16(), w.bfloat16(), 2)  # measured right
    assert not weight_grad_at_risk(x, w.detach(), 2)              # no weight gradient
    with torch.no_grad():
        assert not weight_grad_at_risk(x, w, 2)
    with torch.backends.mkldnn.flags(enabled=False):  # the user turned oneDNN off
        assert not weight_grad_at_risk(x, w, 2)


def test_plain_convs_are_routed_only_inside_the_block():
    assert not upstream_kernels.plain_convs_are_routed()
    with plain_convs_routed():
        assert upstream_kernels.plain_convs_are_routed()
        with plain_convs_routed():
            assert upstream_kernels.plain_convs_are_routed()
        assert upstream_kernels.plain_convs_are_routed()
    assert not upstream_kernels.plain_convs_are_routed()


def _block_weight_grads(block, x, dtype, forward):
    block = block.to(dtype)
    out = forward(block, x.to(dtype))
    params = [block.conv1.weight, block.conv2.weight]
    return torch.autograd.grad(out, params, torch.ones_like(out))


@pytest.mark.parametrize("path", ["plain_forward", "stages on their plain code"])
def test_a_fused_blocks_plain_paths_take_the_route(path, fresh_seed, monkeypatch):
    """A strided, widely dilated BasicBlock (conv1: stride 2, padding 16) is right on the
    paths that run PyTorch's convs: the module's plain forward and stages where eager won."""
    torch.manual_seed(fresh_seed)
    block = fastres.BasicBlock(3, 19, stride=2, downsample="auto", dilation=16).train()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    if path == "plain_forward":
        def forward(module, x_):
            return module.plain_forward(x_)
    else:
        # Every stage's plan says eager won: the stage runs the plain twin's code.
        monkeypatch.setattr(_stage, "plan", lambda *a, **k: (
            fastres.ops.Plan("eager", {}, True), None))

        def forward(module, x_):
            return module.fused_forward(x_)
    import copy
    expected = _block_weight_grads(copy.deepcopy(block), x, torch.float64, forward)
    got = _block_weight_grads(copy.deepcopy(block), x, torch.float32, forward)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-5


def test_the_unfused_twin_stays_plain_pytorch(fresh_seed):
    """fastres.unfuse returns PyTorch as it is: its convs take no route, so its gradients are
    exactly F.conv1d's (whatever those are on this CPU)."""
    torch.manual_seed(fresh_seed)
    block = fastres.BasicBlock(3, 19, stride=2, downsample="auto", dilation=16).train()
    plain = fastres.unfuse(block)
    x = torch.randn(2, 3, 64)
    out = plain(x)
    (got,) = torch.autograd.grad(out, plain.conv1.weight, torch.ones_like(out))
    w = plain.conv1.weight.detach().requires_grad_()
    h = F.conv1d(x, w, None, 2, 16, 16)
    h = F.relu(plain.bn1(h))
    y = plain.bn2(F.conv1d(h, plain.conv2.weight, None, 1, 16, 16))
    out = F.relu(y + plain.downsample(x))
    (expected,) = torch.autograd.grad(out, w, torch.ones_like(out))
    assert torch.equal(got, expected)


def test_the_eager_backend_takes_the_route_under_torch_compile(fresh_seed):
    """Compiled, the stage's conv weight gradient would be oneDNN's as well: the route traces
    (the oneDNN switch is not read there) and its gradients stay right."""
    g = torch.Generator().manual_seed(fresh_seed)
    tensors = [torch.randn(2, 3, 64, generator=g, dtype=torch.float64),
               torch.randn(19, 3, 5, generator=g, dtype=torch.float64) / 4,
               torch.rand(19, generator=g, dtype=torch.float64) + 0.5,
               torch.randn(19, generator=g, dtype=torch.float64)]
    grad_out = torch.randn(2, 19, 32, generator=g, dtype=torch.float64)

    def stage(x, w, gamma, beta):
        return fastres.conv_bn_relu(x, w, None, None, None, gamma, beta, training=True,
                                    stride=2, dilation=8, padding="same")

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        return torch.autograd.grad(fn(*leaves), leaves, grad_out.to(dtype))

    expected = grads(stage, torch.float64)
    torch._dynamo.reset()
    with fastres.use_backend("eager"):
        got = grads(torch.compile(stage, fullgraph=True), torch.float32)
    for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias"), got, expected):
        assert rel_err(a, b) < 1e-5, name
