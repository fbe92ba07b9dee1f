"""Choosing is safe inside everything users do: checkpointing, torch.compile, torch.func,
hooks, autocast, inference mode, jit tracing. Each fused module is compared with its plain
twin (fastres.unfuse) under the same mode, on fresh inputs."""
import contextlib
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastres
from fastres import dispatch
from fastres.conventions import rel_err


def _pair(make, seed, train=True):
    torch.manual_seed(seed)
    fused = make().train(train)
    plain = fastres.unfuse(copy.deepcopy(fused))
    return fused, plain


def _close_grads(got, want, bound=1e-4):
    """Each gradient within `bound` of its size, or of the largest gradient's where it is
    a sum that cancels (a conv bias under training batch norm has none in exact
    arithmetic: what remains is rounding)."""
    largest = max(w.norm().item() for w in want)  # (float32 sums of ~10^2 terms)
    for a, b in zip(got, want):
        assert rel_err(a, b, max(b.norm().item(), 1e-2 * largest)) < bound


def _grads(model, out, x):
    """Gradients of a loss by .backward() (reentrant checkpointing refuses autograd.grad)."""
    leaves = [x] + list(model.parameters())
    for t in leaves:
        t.grad = None
    out.square().sum().backward()
    return [t.grad.clone() for t in leaves]


# Stacks of blocks: temporal ones, and strided basic ones whose "auto" projection runs its
# 1x1 conv unstrided (_stage.projected) where the plain twin calls the strided module.
STACKS = {
    "temporal": lambda: torch.nn.Sequential(fastres.TemporalBlock(4, 8, 3, dilation=2),
                                            fastres.TemporalBlock(8, 8, 3)),
    "strided-basic": lambda: torch.nn.Sequential(
        fastres.BasicBlock(4, 8, stride=2, downsample="auto"), fastres.BasicBlock(8, 8)),
}


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_blocks_train_as_plain_ones(reentrant, stack, fresh_dispatch, fresh_seed):
    fused, plain = _pair(STACKS[stack], fresh_seed)
    for step in range(2):  # the first step would measure: it must not, inside checkpointing
        x = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(fresh_seed + step),
                        requires_grad=True)
        outs = []
        for model in (fused, plain):
            h = x
            for block in model:
                h = checkpoint(block, h, use_reentrant=reentrant)
            outs.append((h, _grads(model, h, x)))
        assert rel_err(outs[0][0], outs[1][0]) < 1e-5
        _close_grads(outs[0][1], outs[1][1])
        for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("model", ["tcn", "strided-basic"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_over_three_lengths_matches_eager(train, model, fresh_seed):
    torch._dynamo.reset()
    make = {"tcn": lambda: fastres.TemporalConvNet(3, [6, 6], kernel_size=3, dropout=0.0),
            "strided-basic": lambda: torch.nn.Sequential(
                fastres.BasicBlock(3, 6, stride=2, downsample="auto"),
                fastres.BasicBlock(6, 6))}[model]
    fused, plain = _pair(make, fresh_seed, train)
    compiled = torch.compile(fused, fullgraph=True)
    for length in (24, 40, 57):
        x = torch.randn(2, 3, length, requires_grad=train)
        out = compiled(x)
        ref = plain(x)
        assert out.shape == ref.shape and rel_err(out, ref) < 1e-5, length
        if train:
            _close_grads(_grads(fused, out, x), _grads(plain, ref, x))


def test_hooks_on_blocks_convs_and_norms_of_a_small_batch_eval_tcn(fresh_dispatch, fresh_seed):
    """Every hook fires once per call and has its effect, on the first call and after: the
    whole-stack kernel (which skips every module) never runs while a hook is registered."""
    fused, _ = _pair(lambda: fastres.TemporalConvNet(4, [8] * 3, kernel_size=3), fresh_seed,
                     train=False)
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        before = fused(x)  # measured, hook-free: may choose the whole-stack kernel
    # Equivalent models without hooks: doubling a conv's output doubles its weight and bias,
    # doubling a norm's output doubles its affine parameters.
    expected = copy.deepcopy(fused)
    with torch.no_grad():
        expected.network[0].conv1.weight.mul_(2)
        expected.network[0].conv1.bias.mul_(2)
        expected.network[1].bn2.weight.mul_(2)
        expected.network[1].bn2.bias.mul_(2)
        want = expected(x)
    calls = []
    handles = [
        fused.network[0].conv1.register_forward_hook(lambda m, i, o: o * 2),
        fused.network[1].bn2.register_forward_hook(lambda m, i, o: o * 2),
        fused.network[2].register_forward_pre_hook(lambda m, i: calls.append("pre")),
        fused.network[2].register_forward_hook(lambda m, i, o: calls.append("post")),
    ]
    for _ in range(2):
        with torch.no_grad():
            got = fused(x)
        assert rel_err(got, want) < 1e-5
    assert calls == ["pre", "post"] * 2
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert rel_err(fused(x), before) < 1e-6
    # a block's hook that changes its output reaches the next blocks
    fused.network[0].register_forward_hook(lambda m, i, o: o * 0)
    with torch.no_grad():
        zeroed = fused(x)
        h = torch.zeros(1, 8, 64)
        for block in fastres.unfuse(copy.deepcopy(fused)).network[1:]:
            h = block(h)
    assert rel_err(zeroed, h) < 1e-5


@pytest.mark.parametrize("backend", [None, "cpp"], ids=["default", "cpp"])
def test_backward_hooks_on_a_conv_and_a_block_fire_once(backend, fresh_dispatch, fresh_seed):
    """A full backward hook sees a gradient only where its module is called as a module:
    the stage of a hooked conv runs as modules, whatever backend the others run on, and
    the gradients stay those of the plain model."""
    fused, plain = _pair(lambda: fastres.TemporalBlock(4, 6, 3, dilation=2), fresh_seed)
    x = torch.randn(2, 4, 40, requires_grad=True)
    fused(x).sum().backward()  # the first call measures, hook-free
    conv_grads, block_grads = [], {"fused": [], "plain": []}
    fused.conv2.register_full_backward_hook(lambda m, gi, go: conv_grads.append(go[0]))
    for name, model in (("fused", fused), ("plain", plain)):
        model.register_full_backward_pre_hook(
            lambda m, go, out=block_grads[name]: out.append(go[0].clone()))
    with fastres.use_backend(backend) if backend else contextlib.nullcontext():
        got = _grads(fused, fused(x), x)
    _close_grads(got, _grads(plain, plain(x), x))
    assert len(conv_grads) == 1 and conv_grads[0].shape[:2] == (2, 6)
    assert len(block_grads["fused"]) == len(block_grads["plain"]) == 1
    assert rel_err(block_grads["fused"][0], block_grads["plain"][0]) < 1e-5


@pytest.mark.parametrize("where", ["conv", "container"])
def test_a_hooked_projection_is_called_as_its_modules(where, fresh_dispatch, fresh_seed):
    """A strided BasicBlock's "auto" projection runs its conv unstrided unless its conv or
    its container has hooks: then it is called as it is, the hook fires once per call, and
    a hook that changes the output changes the block's as it does the plain block's."""
    fused, plain = _pair(lambda: fastres.BasicBlock(4, 8, stride=2, downsample="auto"),
                         fresh_seed)
    x = torch.randn(2, 4, 37, requires_grad=True)
    calls = {"fused": 0, "plain": 0}
    for name, model in (("fused", fused), ("plain", plain)):
        hooked = model.downsample[0] if where == "conv" else model.downsample

        def doubled(module, inputs, out, name=name):
            calls[name] += 1
            return out * 2
        hooked.register_forward_hook(doubled)
    got, want = fused(x), plain(x)
    assert calls == {"fused": 1, "plain": 1}
    assert rel_err(got, want) < 1e-5
    _close_grads(_grads(fused, fused(x), x), _grads(plain, plain(x), x))


def test_an_eps_changed_after_the_first_call_is_used(fresh_dispatch, fresh_seed):
    fused, _ = _pair(lambda: fastres.TemporalConvNet(4, [8] * 3, kernel_size=3), fresh_seed,
                     train=False)
    for bn in (m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_var.uniform_(0.01, 0.02)  # small variances: eps matters
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        fused(x)
        fused.network[1].bn1.eps = 0.5
        got = fused(x)
        want = fastres.unfuse(copy.deepcopy(fused))(x)
    assert rel_err(got, want) < 1e-5
    s = fastres.stream(fused)
    assert not s.stale()
    fused.network[2].bn2.eps = 0.25
    assert s.stale()


def test_torch_func_grad_and_vmap_over_a_fused_block_match_eager(fresh_seed):
    fused, plain = _pair(lambda: fastres.TemporalBlock(4, 4, 3, dilation=2), fresh_seed)
    fused.eval(), plain.eval()
    x = torch.randn(3, 4, 20)
    params = dict(fused.named_parameters())
    buffers = dict(fused.named_buffers())

    def loss(p, model, inputs):
        return torch.func.functional_call(model, (p, buffers), (inputs,)).square().sum()
    g_fused = torch.func.grad(loss)(params, fused, x)
    g_plain = torch.func.grad(loss)(dict(plain.named_parameters()), plain, x)
    for name in params:
        assert rel_err(g_fused[name], g_plain[name]) < 1e-5, name
    per_sample = torch.vmap(lambda xi: fused(xi[None])[0])(x)
    with torch.no_grad():
        assert rel_err(per_sample, plain(x)) < 1e-5


def test_jit_trace_of_a_fused_model_traces_its_plain_ops(fresh_seed):
    fused, plain = _pair(lambda: torch.nn.Sequential(
        fastres.TemporalBlock(4, 8, 3), fastres.BasicBlock(8, 8)), fresh_seed, train=False)
    x = torch.randn(2, 4, 32)
    traced = torch.jit.trace(fused, x)
    y = torch.randn(2, 4, 48)  # another length
    with torch.no_grad():
        assert rel_err(traced(y), plain(y)) < 1e-5


def test_autocast_keeps_a_float32_skip_stream_as_plain_pytorch_does(fresh_seed):
    fused, plain = _pair(lambda: fastres.TemporalBlock(8, 8, 3), fresh_seed, train=False)
    x = torch.randn(2, 8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), plain(x)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) < 1e-2


def test_a_first_call_under_inference_mode_leaves_training_working(fresh_seed):
    torch.manual_seed(fresh_seed)
    block = fastres.TemporalBlock(4, 4, 3)
    block.bn1 = torch.nn.BatchNorm1d(4, affine=False)
    block.bn2 = torch.nn.BatchNorm1d(4, affine=False)
    block.eval()
    with torch.inference_mode():
        block(torch.randn(2, 4, 16))
    block.train()
    for backend in fastres.available_backends():
        if backend in ("eager", "composite", "cpp"):
            with fastres.use_backend(backend):
                x = torch.randn(2, 4, 16, requires_grad=True)
                block(x).sum().backward()
                assert x.grad is not None and torch.isfinite(x.grad).all()


def test_measuring_is_refused_exactly_where_unsafe():
    assert dispatch.why_not_measure() is None
    seen = {}

    def probe(tag):
        def fn(t):
            seen[tag] = dispatch.why_not_measure()
            return t * 2
        return fn
    x = torch.randn(3, requires_grad=True)
    checkpoint(probe("non-reentrant"), x, use_reentrant=False).sum().backward()
    checkpoint(probe("reentrant"), x, use_reentrant=True).sum().backward()
    torch.func.grad(lambda t: probe("grad")(t).sum())(torch.randn(3))
    torch.vmap(probe("vmap"))(torch.randn(2, 3))
    assert "saved-tensor hooks" in seen["non-reentrant"]
    assert "backward pass" in seen["reentrant"]  # its recompute, the last call seen
    assert "torch.func" in seen["grad"] and "torch.func" in seen["vmap"]


def test_legacy_onnx_export_of_a_fused_model_runs_its_plain_ops(fresh_seed, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    fused, plain = _pair(lambda: torch.nn.Sequential(
        fastres.TemporalBlock(4, 8, 3), fastres.BasicBlock(8, 8)), fresh_seed, train=False)
    x = torch.randn(2, 4, 32)
    path = str(tmp_path / "fused.onnx")
    torch.onnx.export(fused, (x,), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 2: "length"}})
    y = torch.randn(3, 4, 48)
    (got,) = ort.InferenceSession(path).run(None, {"x": y.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), plain(y)) < 1e-5
