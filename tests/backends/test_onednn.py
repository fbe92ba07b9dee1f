"""The oneDNN eval executor (fastres/backends/onednn.py) against the float64 plain model.

Every module is drawn fresh (weights, BN running statistics, inputs) and judged as
tests/model_parity.py judges a fused model: ||out - ref|| / ||ref|| against the unfused
model in float64, bound 1e-5 in float32 and 1e-2 in bfloat16, or a multiple of plain
PyTorch's own error in the same dtype where that is larger (deep models: every layer rounds
its output, and in bfloat16 the folded BN weights round too; a whole ResNet1d's 5 logits in
plain bfloat16 are 2e-2 off float64 on some draws). Outputs are poisoned: each program first runs on an input of
NaNs of the same shape, so memory its intermediates free holds NaN when the real run
allocates, and an element a step forgets to write cannot pass (NaN never does).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres import _ext
from fastres._copies import PROBES
from fastres.backends import onednn
from fastres.conventions import rel_err
from model_parity import randomize_bn

pytestmark = [pytest.mark.skipif(onednn.unavailable_reason() is not None,
                                 reason=f"oneDNN executor: {onednn.unavailable_reason()}"),
              pytest.mark.usefixtures("one_thread")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# The multiple of plain PyTorch's own error (same model, input, dtype) a run may reach. The
# oneDNN program's error is plain's to within a few percent in the median; the spread is
# that of few output values (a classifier's logits), widest in bfloat16: over 1000 fresh
# draws of "resnet" at batch 8 the error peaked at 0.83 of this bound (at batch 2, 1.22).
OWN_ERROR_FACTOR = {torch.float32: 2.0, torch.bfloat16: 3.0}


# name -> (constructor, input shape (B, C, L))
MODULES = {
    "tcn-block-identity": (lambda: fastres.TemporalBlock(8, 8, 3, dilation=2), (2, 8, 37)),
    "tcn-block-downsample": (lambda: fastres.TemporalBlock(6, 10, 3, dilation=4), (3, 6, 41)),
    "tcn-block-weight-norm": (lambda: fastres.TemporalBlock(8, 8, 2, dilation=3, norm="weight"),
                              (2, 8, 29)),
    "tcn-block-weight-norm-downsample": (
        lambda: fastres.TemporalBlock(5, 12, 3, dilation=1, norm="weight"), (2, 5, 33)),
    "tcn": (lambda: fastres.TemporalConvNet(4, [8, 8, 12], kernel_size=3, dropout=0.1),
            (2, 4, 70)),
    "basic-identity": (lambda: fastres.BasicBlock(8, 8), (2, 8, 31)),
    "basic-stride2": (lambda: fastres.BasicBlock(8, 16, 2, "auto"), (2, 8, 31)),
    "basic-causal-even-kernel": (lambda: fastres.BasicBlock(8, 8, kernel_size=4, causal=True),
                                 (2, 8, 30)),
    "basic-same-even-kernel": (lambda: fastres.BasicBlock(8, 8, kernel_size=4), (2, 8, 30)),
    "resnet": (lambda: fastres.ResNet1d((2, 1, 1, 1), 3, 5, widths=(8, 16, 24, 32)), (2, 3, 90)),
    "resnet-causal-no-pool": (lambda: fastres.ResNet1d((1, 1, 1, 1), 3, 4, widths=(8, 8, 16, 16),
                                                       causal=True, maxpool=False), (2, 3, 64)),
}


def _draw(name, seed, dtype=torch.float32):
    """A fresh module in eval mode with random BN statistics and affine parameters."""
    build, shape = MODULES[name]
    torch.manual_seed(seed)
    model = build()
    randomize_bn(model)
    return model.eval().to(dtype), shape


def _poisoned_run(program, x):
    """program(x) after a run on NaNs of x's shape (whose output must be NaN too); as eval
    inference, under no_grad."""
    with torch.no_grad():
        nan_out = program(torch.full_like(x, float("nan")))
        assert torch.isnan(nan_out).any(), "a NaN input gave no NaN output"
        del nan_out
        return program(x)


def _run_in_layout(program, x, layout):
    """program on x (B, C, L) given as NCL, as a channels-last view, or as NLC data (after
    a run on NaNs: _poisoned_run), its output checked for that layout and returned as NCL."""
    if layout == "NLC":
        out = _poisoned_run(lambda t: program(t, "NLC"), x.transpose(1, 2).contiguous())
        assert out.is_contiguous() and out.shape[1] == x.shape[2]
        return out.transpose(1, 2)
    arg = x if layout == "NCL" else x.transpose(1, 2).contiguous().transpose(1, 2)
    out = _poisoned_run(program, arg)
    assert out.is_contiguous() if layout == "NCL" else onednn.is_channels_last(out)
    return out


def _run(model, x):
    with torch.no_grad():
        return onednn.run(model, x)


def _check(model, x, out):
    """out against unfuse(model) in float64, within TOL or OWN_ERROR_FACTOR times plain's
    own error in x's dtype."""
    plain = fastres.unfuse(model).eval()
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        own = plain(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    bound = max(TOL[x.dtype], OWN_ERROR_FACTOR[x.dtype] * rel_err(own, ref))
    err = rel_err(out, ref)
    assert err < bound, f"{err:.2e} (bound {bound:.2e})"


@pytest.mark.parametrize("winograd", [2, 4, 0], ids=["winograd-f23", "winograd-f43", "direct"])
@pytest.mark.parametrize("name", list(MODULES))
def test_eval_matches_float64(name, winograd, fresh_seed):
    model, shape = _draw(name, fresh_seed)
    program, reason = onednn.build_or_reason(model, winograd=winograd)
    assert program is not None, reason
    ran = [c.winograd is not None for c in onednn._convs(program._steps)]
    assert any(ran) == (winograd > 0 and _ext.load_error() is None
                        and any(c.kernel_size == 3 and c.stride == 1
                                for c in onednn._convs(program._steps)))
    g = torch.Generator().manual_seed(fresh_seed)
    for _ in range(2):  # the second call reuses the packed weights
        x = torch.randn(shape, generator=g)
        out = _poisoned_run(program, x)
        _check(model, x, out)
        assert out.is_contiguous()  # NCL in, NCL out


@pytest.mark.parametrize("name", ["tcn-block-downsample", "tcn-block-weight-norm", "resnet",
                                  "basic-stride2"])
def test_bfloat16(name, causal_layout, fresh_seed):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 (the float32 tests run)")
    model, (_, c, n) = _draw(name, fresh_seed, torch.bfloat16)
    shape = (8, c, n)  # 8 samples: a few logits alone make the error ratio too noisy to bound
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed)).bfloat16()
    out = _poisoned_run(onednn.build(model), x)
    _check(model, x, out)  # against the same bf16 weights, in float64


@pytest.mark.parametrize("name", ["tcn-block-downsample", "tcn", "basic-stride2", "resnet"])
def test_channels_last_input_is_read_in_place(name, fresh_seed):
    model, (b, c, n) = _draw(name, fresh_seed)
    nlc = torch.randn(b, n, c, generator=torch.Generator().manual_seed(fresh_seed))
    view = nlc.transpose(1, 2)  # (B, C, L), channels-last strides
    assert onednn.is_channels_last(view) and not view.is_contiguous()
    assert onednn.to_channels_last(view).data_ptr() == view.data_ptr()  # no copy
    program = onednn.build(model)
    out = _poisoned_run(program, view)
    _check(model, view.contiguous(), out)
    if out.dim() == 3:  # the output keeps the input's layout
        assert onednn.is_channels_last(out)


@pytest.mark.parametrize("cls, args, shape", [
    (fastres.TemporalBlock, (6, 10, 3), (2, 33, 6)),
    (fastres.BasicBlock, (6, 12, 2, "auto"), (2, 33, 6)),
    (fastres.ResNet1d, ((1, 1, 1, 1), 6, 3), (2, 64, 6)),
])
def test_nlc_module(cls, args, shape, fresh_seed):
    torch.manual_seed(fresh_seed)
    nlc = cls(*args, input_layout="NLC")
    randomize_bn(nlc)
    nlc.eval()
    ncl = cls(*args).eval()
    ncl.load_state_dict(nlc.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    program = onednn.build(nlc)
    out = _poisoned_run(lambda t: program(t, "NLC"), x)
    with torch.no_grad():
        assert torch.equal(onednn.run(nlc, x), out)  # run takes the module's own layout
        # what FusedModule.forward hands the dispatch: the (B, C, L) view, read in place
        view_out = program(x.transpose(1, 2))
        assert torch.equal(view_out if view_out.dim() == 2 else view_out.transpose(1, 2), out)
        ref = fastres.unfuse(ncl).double()(x.double().transpose(1, 2))
    if ref.dim() == 3:
        ref = ref.transpose(1, 2)
        assert out.is_contiguous()  # (B, L, C) out, no conversion left to the caller
    assert out.shape == ref.shape
    assert rel_err(out, ref) < max(TOL[torch.float32], 2 * rel_err(
        fastres.unfuse(nlc).eval()(x), ref))
    with pytest.raises(ValueError, match="channels in the last dim"), torch.no_grad():
        onednn.run(nlc, x.transpose(1, 2).contiguous())


def test_residual_post_op_is_the_identity_and_the_projection(fresh_seed):
    """relu(bn2(conv2(h)) + shortcut) through the binary post-op: with conv2's folded weight
    zeroed the output must be exactly relu(shortcut + folded bias)."""
    for c_in in (8, 5):
        torch.manual_seed(fresh_seed)
        block = fastres.TemporalBlock(c_in, 8, 3, dilation=2).eval()
        randomize_bn(block)
        with torch.no_grad():
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
        x = torch.randn(2, c_in, 20, generator=torch.Generator().manual_seed(fresh_seed))
        out = _poisoned_run(onednn.build(block), x)
        bn = block.bn2
        shift = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
        with torch.no_grad():
            res = x if block.downsample is None else block.downsample(x)
            expected = torch.relu(res + shift[:, None])
        assert rel_err(out, expected.detach()) < 1e-6
        _check(block, x, out)


def _train_step(model, shape, seed):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("name", ["tcn-block-downsample", "tcn-block-weight-norm", "resnet"])
def test_repacked_after_an_optimizer_step(name, fresh_seed):
    model, shape = _draw(name, fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed + 1))
    before = _run(model, x).clone()
    program = onednn._PROGRAMS[model]
    assert not program.stale(model)
    _train_step(model, shape, fresh_seed)  # moves weights and running statistics
    assert program.stale(model)
    out = _run(model, x)
    assert onednn._PROGRAMS[model] is not program
    assert rel_err(out, before) > 1e-3  # the step changed the function
    _check(model, x, out)


@pytest.mark.parametrize("name", ["tcn-block-identity", "basic-stride2", "tcn"])
def test_repacked_after_load_state_dict(name, fresh_seed):
    model, shape = _draw(name, fresh_seed)
    other, _ = _draw(name, fresh_seed + 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    _run(model, x)
    program = onednn._PROGRAMS[model]
    model.load_state_dict(other.state_dict())
    assert program.stale(model)
    out = _run(model, x)
    _check(other, x, out)


@pytest.mark.parametrize("name,write", [
    ("tcn-block-downsample", lambda m: m.conv1.weight.data.mul_(1.5)),
    ("tcn-block-weight-norm", lambda m: m.conv2.parametrizations.weight.original0.data.mul_(2)),
    ("basic-stride2", lambda m: m.bn1.running_var.data.mul_(3)),
    ("resnet", lambda m: m.fc.bias.data.add_(1)),
])
def test_repacked_after_a_write_through_data(name, write, fresh_seed):
    """.data writes (hand-written EMA updates, re-initialisation) leave version counters
    alone: the program compares values, or its packed weights would be silently stale."""
    model, shape = _draw(name, fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    before = _run(model, x).clone()
    program = onednn._PROGRAMS[model]
    versions = [t._version for t in model.state_dict(keep_vars=True).values()]
    write(model)
    assert versions == [t._version for t in model.state_dict(keep_vars=True).values()]
    assert program.stale(model)
    out = _run(model, x)
    assert rel_err(out, before) > 1e-3
    _check(model, x, out)


def test_repacked_after_data_assignment(fresh_seed):
    """`p.data = t` swaps the parameter's memory under the same object (and counter)."""
    model, shape = _draw("resnet", fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    before = _run(model, x).clone()
    program = onednn._PROGRAMS[model]
    weight = model.layer1[0].conv1.weight
    weight.data = torch.randn_like(weight) * 2
    assert program.stale(model)
    out = _run(model, x)
    assert rel_err(out, before) > 1e-3
    _check(model, x, out)


@pytest.mark.parametrize("where", ["conv", "bn", "bn-buffer"])
def test_partial_writes(where, fresh_seed):
    """The rule of fastres/_copies.py: a write of one element under no_grad bumps the
    counter and is seen; one through .data may escape the probe (64 elements of each tensor,
    its first and last 32, are compared on every call), and forget(module) or
    fastres.forget_weights(model) then rebuilds the program."""
    model, shape = _draw("resnet", fresh_seed)
    tensor = {"conv": lambda: model.layer2[0].conv2.weight,
              "bn": lambda: model.layer2[0].bn2.weight,
              "bn-buffer": lambda: model.layer2[0].bn2.running_var}[where]()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    _run(model, x)
    program = onednn._PROGRAMS[model]
    middle = tensor.numel() // 2  # between the probe's windows in a tensor of over 64
    with torch.no_grad():
        tensor.view(-1)[middle] += 3.0
    assert program.stale(model)
    _check(model, x, _run(model, x))
    program = onednn._PROGRAMS[model]
    tensor.data.view(-1)[middle] += 3.0  # the counter stays
    if tensor.numel() <= PROBES:
        assert program.stale(model)  # every element of a small tensor is probed
    onednn.forget(model)
    assert onednn.program_for(model) is not program
    _check(model, x, _run(model, x))
    # The library-wide call, on a module that holds the program's module.
    program = onednn._PROGRAMS[model]
    tensor.data.view(-1)[middle] -= 3.0
    fastres.forget_weights(torch.nn.Sequential(model))
    assert program.stale(model)
    _check(model, x, _run(model, x))


@pytest.mark.parametrize("name", ["basic-stride2", "resnet", "tcn-block-downsample"])
def test_kept_after_a_version_bump_without_a_write(name, fresh_seed):
    """An op declared to mutate a tensor bumps its version counter without writing to it
    (the fused op's running statistics, also in eval): the program is kept, not rebuilt on
    every call, and a later real write is still seen."""
    model, shape = _draw(name, fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    with torch.no_grad():
        _run(model, x)
        program = onednn._PROGRAMS[model]
        for t in model.buffers():
            if t.is_floating_point():
                t.add_(0)  # bumps the counter, same values
        assert not program.stale(model)
        _check(model, x, _run(model, x))
        assert onednn._PROGRAMS[model] is program
        with fastres.use_backend("cpp"):  # the fused op's eval call bumps BN's counters
            fastres.unfuse(model).eval()(x)
            model.fused_forward(x)
        assert onednn.program_for(model) is program
        next(b for b in model.buffers() if b.is_floating_point()).mul_(2)
        assert program.stale(model)


@pytest.mark.parametrize("where", ["first", "last"])
def test_probe_sees_a_write_through_data_at_either_end(where, fresh_seed):
    """The probe's windows are each tensor's first and last 32 elements: a write through
    .data to one of them (the counter stays) is seen, in every tensor the program read."""
    model, shape = _draw("resnet", fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    _run(model, x)
    program = onednn._PROGRAMS[model]
    g = torch.Generator().manual_seed(fresh_seed)
    for t in program._tensors:
        if not t.is_floating_point():
            continue
        flat = t.data.view(-1)
        i = 0 if where == "first" else flat.numel() - 1
        i = min(flat.numel() - 1, i + int(torch.randint(0, 32, (), generator=g)) *
                (1 if where == "first" else -1))
        i = max(0, i)
        kept = flat[i].clone()
        flat[i] += 1.0
        assert program.stale(model), f"{tuple(t.shape)}[{i}] written, not seen"
        flat[i] = kept
        assert not program.stale(model)


@pytest.mark.parametrize("name, layout", [("resnet", "NCL"), ("basic-stride2", "NCL"),
                                          ("tcn", "NCL"), ("tcn-block-downsample", "NLC")])
def test_a_returned_output_is_never_written_again(name, layout, fresh_seed):
    """Outputs are the caller's: a later call (same shape, other values) leaves them as
    they were."""
    model, (b, c, n) = _draw(name, fresh_seed)
    program = onednn.build(model)
    g = torch.Generator().manual_seed(fresh_seed)
    with torch.no_grad():
        outs = []
        for _ in range(3):
            x = torch.randn(b, c, n, generator=g)
            out = program(x.transpose(1, 2).contiguous(), "NLC") if layout == "NLC" \
                else program(x)
            outs.append((out, out.clone()))
        for out, kept in outs:
            assert torch.equal(out, kept)
        assert not torch.equal(outs[0][1], outs[1][1])


def test_max_pool_taps_against_torch():
    """_max_pool_nlc (each tap read over the outputs it reaches, no padded copy) equals
    MaxPool1d exactly, NaN included, for every kernel, stride, padding, dilation and ceil
    mode torch accepts, at lengths with and without a partial last window."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for k in range(1, 6):
        for s in range(1, 4):
            for p in range(0, k // 2 + 1):
                for d in (1, 2, 3):
                    for ceil in (False, True):
                        for n in (7, 8, 9, 16):
                            pool = nn.MaxPool1d(k, s, p, d, ceil_mode=ceil)
                            x = torch.randn(2, 3, n, generator=g)
                            x[0, 1, n // 2] = float("nan")
                            try:
                                ref = pool(x)
                            except RuntimeError:  # window too large for the input
                                continue
                            h = onednn._as_4d(onednn.to_channels_last(x))
                            out = onednn._max_pool_nlc(h, k, s, p, d, ceil, ref.shape[2])
                            out = out[:, :, 0, :]
                            assert out.shape == ref.shape, (k, s, p, d, ceil, n)
                            assert torch.equal(out.isnan(), ref.isnan()), (k, s, p, d, ceil, n)
                            assert torch.equal(out.nan_to_num(), ref.nan_to_num()), \
                                (k, s, p, d, ceil, n)
                            checked += 1
    assert checked > 300


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil", [
    (3, 2, 1, 1, False), (2, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 2, 0, 1, True), (3, 3, 1, 2, False),
    (4, 1, 2, 1, False), (1, 1, 0, 1, False), (5, 2, 2, 3, True)])
def test_stem_max_pool(kernel, stride, padding, dilation, ceil, fresh_seed):
    """The stem's max pool (maxima of strided taps on the NLC activation, -inf padding) for
    kernel, stride, padding, dilation and ceil_mode against MaxPool1d in float64; lengths
    with and without a partial last window."""
    model, (b, c, _) = _draw("resnet", fresh_seed)
    model.maxpool = nn.MaxPool1d(kernel, stride, padding, dilation, ceil_mode=ceil).eval()
    program = onednn.build(model)
    g = torch.Generator().manual_seed(fresh_seed)
    for n in (90, 91):
        x = torch.randn(b, c, n, generator=g)
        _check(model, x, _poisoned_run(program, x))


def test_repacked_after_bn_eps_or_a_new_parameter(fresh_seed):
    model, shape = _draw("basic-identity", fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    _run(model, x)
    program = onednn._PROGRAMS[model]
    model.bn2.eps = 0.5  # large, so that folding with the old eps would miss the bound
    assert program.stale(model)
    _check(model, x, _run(model, x))
    program = onednn._PROGRAMS[model]
    model.conv1.weight = nn.Parameter(torch.randn_like(model.conv1.weight))
    assert program.stale(model)
    _check(model, x, _run(model, x))


def test_refusals_say_why():
    block = fastres.TemporalBlock(4, 4, 3)
    assert onednn.build_or_reason(block.train())[1].startswith("the module (or a submodule) "
                                                               "is in training mode")
    block.eval()
    assert "not a fastres" in onednn.build_or_reason(nn.Conv1d(4, 4, 3))[1]
    handle = block.bn1.register_forward_hook(lambda *a: None)
    assert "forward hooks" in onednn.build_or_reason(block)[1]
    handle.remove()
    untracked = fastres.BasicBlock(4, 4)
    untracked.bn1 = nn.BatchNorm1d(4, track_running_stats=False)
    assert "running statistics" in onednn.build_or_reason(untracked.eval())[1]
    custom = fastres.BasicBlock(4, 8, downsample=nn.Conv1d(4, 8, 1)).eval()
    assert "downsample" in onednn.build_or_reason(custom)[1]
    assert "float64" in onednn.build_or_reason(fastres.TemporalBlock(4, 4, 3).double().eval())[1]


def test_bad_calls_raise():
    block = fastres.TemporalBlock(4, 6, 3, dilation=2).eval()
    program = onednn.build(block)
    with pytest.raises(RuntimeError, match="gradients are needed"):
        program(torch.randn(2, 4, 10))  # the parameters require grad, grad mode is on
    with pytest.raises(RuntimeError, match="gradients are needed"):
        program(torch.randn(2, 4, 10, requires_grad=True).detach().requires_grad_())
    with torch.no_grad():
        with pytest.raises(ValueError, match="3D input"):
            program(torch.randn(4, 10))
        with pytest.raises(ValueError, match="expects 4 channels"):
            program(torch.randn(2, 5, 10))
        with pytest.raises(RuntimeError, match="parameters are torch.float32"):
            program(torch.randn(2, 4, 10).bfloat16())
        with pytest.raises(ValueError, match="too short"):
            onednn.build(fastres.BasicBlock(4, 8, 2, "auto", kernel_size=3).eval())(
                torch.randn(1, 4, 0))
        assert "empty batch" in program.unsupported_reason(torch.randn(0, 4, 10))
        assert program(torch.randn(2, 4, 10)).shape == (2, 6, 10)


@pytest.fixture(params=["per-conv copy", "batch-flat"])
def causal_layout(request, monkeypatch):
    """Both layouts a causal stack runs on: the batch-flat one forced for any length (its
    rule takes it only where the gap rows are few), or never."""
    extra = 0 if request.param == "batch-flat" else 10 ** 9
    monkeypatch.setattr(onednn._FlatRows, "FLAT_MAX_EXTRA", extra)
    return request.param


CAUSAL = ["tcn-block-identity", "tcn-block-downsample", "tcn-block-weight-norm",
          "tcn-block-weight-norm-downsample", "tcn", "basic-causal-even-kernel"]


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("layout", ["NCL", "channels-last view", "NLC"])
def test_causal_stack_layouts(name, layout, causal_layout, fresh_seed):
    """A causal stack on the batch-flat layout (samples behind zero gap rows, one sequence
    for oneDNN) and on per-conv padded copies, for NCL, channels-last and NLC inputs."""
    model, (b, c, n) = _draw(name, fresh_seed)
    program = onednn.build(model)
    flat = onednn._FlatRows.plan(program._steps, b, n)
    assert program._causal_stack and (flat is not None) == (causal_layout == "batch-flat")
    g = torch.Generator().manual_seed(fresh_seed)
    for length in (n, n + 5):  # the second call: other gap and tail offsets, new packs
        x = torch.randn(b, c, length, generator=g)
        _check(model, x, _run_in_layout(program, x, layout))


@pytest.mark.parametrize("layout", ["NCL", "channels-last view", "NLC"])
def test_long_samples_enter_and_leave_per_sample(layout, causal_layout, fresh_seed):
    """Samples of 3600 elements or more enter and leave the flat layout one 2D transpose at
    a time (_copy_per_sample); shorter ones, as in the tests above, in one strided copy."""
    model, _ = _draw("tcn-block-downsample", fresh_seed)  # 6 -> 10 channels
    program = onednn.build(model)
    g = torch.Generator().manual_seed(fresh_seed)
    for b, length in ((3, 700), (2, 611)):
        x = torch.randn(b, 6, length, generator=g)
        assert 6 * length >= 3600
        _check(model, x, _run_in_layout(program, x, layout))


def test_batch_flat_rule():
    """The flat layout's extra rows (a gap per sample and a tail) stay a small fraction of
    the useful ones: a block with short dilations at length 2048 takes it, an 8-block stack
    with dilations up to 128 at length 256 (gap 256) does not."""
    block = onednn.build(fastres.TemporalBlock(8, 8, 3, dilation=8).eval())
    assert onednn._FlatRows.plan(block._steps, 8, 2048) is not None
    stack = onednn.build(fastres.TemporalConvNet(4, [8] * 8, kernel_size=3).eval())
    assert onednn._FlatRows.plan(stack._steps, 1, 256) is None
    assert not onednn.build(fastres.BasicBlock(8, 8).eval())._causal_stack  # "same" padding


@pytest.mark.parametrize("poison", ["nan", "inf", "huge"])
def test_nonfinite_propagate_as_torch_relu(poison, causal_layout, fresh_seed):
    """oneDNN's ReLU post-op maps NaN to 0: inputs that hold or can make NaN take the exact
    path, whose outputs have NaN exactly where the plain model's do."""
    model, shape = _draw("tcn-block-downsample", fresh_seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    if poison == "huge":  # finite, but sums overflow to inf inside the convs
        x[0, :, 5] = 3e38
        x[0, ::2, 5] = -3e38
    else:
        x[0, 1, 5] = float(poison)
    program = onednn.build(model)
    with torch.no_grad():
        out = program(x)
        ref = fastres.unfuse(model).eval()(x)
    if poison == "huge":  # inf - inf inside a conv: where NaN or inf lands is order-dependent
        assert not x.abs().max() <= program.threshold  # so the exact path ran
    else:
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isnan(out).any() or poison != "nan"
    finite = torch.isfinite(ref) & torch.isfinite(out)
    if poison == "huge":
        # Where the huge values reach (sample 0 from position 5 on: causal convs), sums of
        # +-3e38 cancel in an order-dependent way, so finite outputs there can differ
        # wholly (one draw in 40 did); the outputs they cannot reach must not.
        finite[0, :, 5:] = False
    assert rel_err(out[finite], ref[finite]) < 1e-5


# ----------------------------------------------------------------------------- Winograd F(2,3)

needs_ext = pytest.mark.skipif(_ext.load_error() is not None,
                               reason=f"the Winograd kernel is in the extension: {_ext.load_error()}")


def _winograd_case(outputs, seed, batch, c_in, c_out, length, dilation, padding, residual,
                   relu):
    """The extension's Winograd F(outputs, 3) conv through _Conv (BN folded) on fresh draws, against the
    same conv in float64; the op allocates its output, so nothing to poison: NaN in an
    unwritten element would fail the bound."""
    torch.manual_seed(seed)
    conv = nn.Conv1d(c_in, c_out, 3, dilation=dilation)
    bn = nn.BatchNorm1d(c_out)
    randomize_bn(bn)
    step = onednn._Conv(conv, bn.eval(), padding, torch.float32)
    assert step.use_winograd(outputs)
    assert step.winograd.shape == (outputs + 2, c_in, c_out)
    x = torch.randn(batch, length, c_in)  # NLC rows
    n_out = step.out_length(length)
    res = torch.randn(batch, n_out, c_out) if residual else None
    with torch.no_grad():
        out = step(onednn._as_4d(x.transpose(1, 2)), relu=relu,
                   add=None if res is None else onednn._as_4d(res.transpose(1, 2)))
        ref = F.conv1d(F.pad(x.double().transpose(1, 2), step.pad),
                       step.weight.squeeze(2).double(), step.bias.double(), dilation=dilation)
        if res is not None:
            ref = ref + res.double().transpose(1, 2)
        ref = ref.relu() if relu else ref
    out = out.squeeze(2)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[torch.float32], f"{err:.2e}"


OUTPUTS = pytest.mark.parametrize("outputs", [2, 4], ids=["f23", "f43"])


@needs_ext
@OUTPUTS
@pytest.mark.parametrize("padding", ["same", "causal"])
@pytest.mark.parametrize("dilation", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [1, 2, 5, 7, 17, 64])
def test_winograd_conv_matches_float64(length, dilation, padding, outputs, fresh_seed):
    """Every dilation's phases, lengths that are not a multiple of the tile (a tile's last
    outputs dropped, a phase's last tile past the end), taps in the padding on either
    side."""
    _winograd_case(outputs, fresh_seed, 2, 5, 7, length, dilation, padding, residual=True,
                   relu=True)


@needs_ext
@OUTPUTS
@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, False)])
def test_winograd_epilogues(residual, relu, outputs, fresh_seed):
    _winograd_case(outputs, fresh_seed, 3, 16, 12, 40, 2, "same", residual, relu)


@needs_ext
@OUTPUTS
def test_winograd_wide(outputs, fresh_seed):
    """ResNet1d's widest stage's shape (sums over 512 channels)."""
    _winograd_case(outputs, fresh_seed, 2, 512, 512, 32, 1, "same", residual=True, relu=True)


@needs_ext
@OUTPUTS
def test_winograd_chunks(outputs, fresh_seed):
    """More tiles than one chunk holds (csrc/cpu/winograd_cpu.cpp: 32768 floats of
    C_in + C_out per tile): chunk edges inside a sample and a short last chunk."""
    _winograd_case(outputs, fresh_seed, 3, 8, 8, 1501, 3, "causal", residual=True, relu=True)


@needs_ext
@OUTPUTS
def test_winograd_only_on_the_fast_path(outputs, fresh_seed):
    """Non-finite inputs take oneDNN's direct conv (Winograd's inf - inf would make NaN where
    the conv gives inf): inf in, inf out where plain torch gives it."""
    model, shape = _draw("basic-identity", fresh_seed)
    program = onednn.build(model, winograd=outputs)
    assert all(c.winograd is not None for c in onednn._convs(program._steps))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(fresh_seed))
    x[0, :, 7] = float("inf")
    with torch.no_grad():
        out = program(x)
        ref = fastres.unfuse(model).eval()(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


def test_winograd_refusals():
    conv = onednn._Conv(nn.Conv1d(4, 4, 3, stride=2), None, "same", torch.float32)
    assert "stride 2" in conv.winograd_reason(torch.float32) and not conv.use_winograd()
    conv = onednn._Conv(nn.Conv1d(4, 4, 2), None, "causal", torch.float32)
    assert "kernel 2" in conv.winograd_reason(torch.float32) and not conv.use_winograd()
    conv = onednn._Conv(nn.Conv1d(4, 4, 3), None, "same", torch.bfloat16)
    assert "float32 only" in conv.winograd_reason(torch.bfloat16) and not conv.use_winograd()


@needs_ext
def test_winograd_overflow_bound_does_not_compound(fresh_seed):
    """A Winograd conv's intermediates reach 4x (F(2,3)) or 256x (F(4,3)) its output's bound;
    the program's threshold guards them, but the factor belongs to that conv alone: compounded
    through ResNet1d's 13 such convs it would send every input down the exact path."""
    model, _ = _draw("resnet", fresh_seed)
    direct = onednn.build(model, winograd=0).threshold
    f23 = onednn.build(model, winograd=2).threshold
    f43 = onednn.build(model, winograd=4).threshold
    assert direct / 8 <= f23 < direct and direct / 512 <= f43 < f23
