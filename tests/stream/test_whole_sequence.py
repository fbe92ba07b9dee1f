"""TemporalConvNet's whole-stack path (fastres/stream/whole_sequence.py), the module level's
"stack" candidate (fastres/dispatch/module.py)."""
import copy
import pickle
import random
import sys

import pytest
import torch

import fastres
from fastres.conventions import rel_err
from stream_helpers import (TOL, assert_parity, full_forward, in_channels, random_input,
                            random_tcn, requires_cpp)
from upstream import randomize_bn, warnings_ignored

# fastres.stream.whole_sequence is the function; its module, to patch:
whole_sequence_module = sys.modules["fastres.stream.whole_sequence"]


# ----------------------------------------------------------------------------- whole sequences


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts calls of the stacked kernel by TemporalConvNet.forward."""
    calls = []
    original = whole_sequence_module._stacked_forward

    def counting(plan, x):
        calls.append(tuple(x.shape))
        return original(plan, x)
    monkeypatch.setattr(whole_sequence_module, "_stacked_forward", counting)
    return calls


def _always(monkeypatch, faster: bool):
    """The module level chooses the stack (or the blocks) without timing."""
    from fastres import dispatch
    monkeypatch.setattr(dispatch.module, "_measure", lambda module, x, grad: dispatch.Choice(
        "module", "stack" if faster else "plain", "test"))


@requires_cpp
@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_whole_sequence_path_matches_the_layered_path(monkeypatch, stacked_calls, norm):
    _always(monkeypatch, True)
    rng = random.Random(norm)
    for dtype in (torch.float32, torch.bfloat16):
        net = random_tcn(rng, norm, dtype, max_levels=4)
        for batch, length in ((1, rng.randint(1, 80)), (rng.randint(2, 8), rng.randint(1, 80))):
            x = random_input(rng, in_channels(net), length, batch, dtype)
            with torch.no_grad():
                got = net(x)
                layered = net.network(x)
            assert stacked_calls and stacked_calls[-1] == (batch, x.shape[1], length)
            assert got.dtype == dtype and got.shape == layered.shape
            assert rel_err(got, layered) < TOL[dtype]
            assert_parity(got, full_forward(net, x), dtype)


@requires_cpp
def test_the_module_level_times_the_stack_once_per_signature(monkeypatch, stacked_calls):
    from fastres import dispatch
    net = fastres.TemporalConvNet(3, [8, 8], kernel_size=3).eval()
    timings = {"stack": 2.0}   # the stack slower than every other path first
    measured = []

    def fake_measure(level, runs, baseline, device, with_backward, excluded=None, config=None):
        measured.append(sorted(runs))
        times = {}
        for name, run in runs.items():
            try:
                run()
            except RuntimeError:  # a path that does not run this input is left out
                continue
            times[name] = timings.get(name, 1.0)
        best = min(times, key=times.get)
        return dispatch.Choice(level, best, "measured", "measured", times, baseline=baseline)
    monkeypatch.setattr(dispatch.module, "measure", fake_measure)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        net(x)
        net(x)
    assert len(measured) == 1 and "stack" in measured[0]        # once per signature
    stacked_calls.clear()
    with torch.no_grad():
        net(x)
    assert stacked_calls == []                                   # the slower path never runs
    timings["stack"] = 0.5
    with torch.no_grad():
        net(torch.randn(2, 3, 32))                               # a new signature: measured
        net(torch.randn(2, 3, 32))
    assert len(measured) == 2 and stacked_calls[-1] == (2, 3, 32)
    with torch.no_grad():   # a batch the stack would decline: not offered, so never chosen
        net(torch.randn(whole_sequence_module.WHOLE_SEQUENCE_MAX_BATCH + 1, 3, 32))
    assert len(measured) == 3 and "stack" not in measured[-1]
    net.network[0].register_forward_hook(lambda m, i, o: None)   # a hook: never the stack
    stacked_calls.clear()
    with torch.no_grad():
        net(torch.randn(2, 3, 32))
    assert stacked_calls == []
    net.train()                            # a training step: the stack is not offered
    net.network[0]._forward_hooks.clear()
    net(torch.randn(2, 3, 32)).sum().backward()
    assert len(measured) == 4 and "stack" not in measured[-1]


@requires_cpp
def test_whole_sequence_follows_every_change_of_the_model(monkeypatch, stacked_calls):
    _always(monkeypatch, True)
    torch.manual_seed(0)
    net = randomize_bn(fastres.TemporalConvNet(3, [6, 6], kernel_size=3)).eval()
    x = torch.randn(1, 3, 20)

    def check():
        with torch.no_grad():
            assert rel_err(net(x), net.network(x)) < 1e-5
    check()
    n = len(stacked_calls)
    with torch.no_grad():
        net.network[0].conv1.weight.mul_(2)                  # in place, tracked
    check()
    net.network[1].conv2.bias.data.add_(1)                    # through .data, untracked
    check()
    net.network[0].bn1.running_mean.data.add_(0.5)            # a buffer
    check()
    net.load_state_dict(copy.deepcopy(net.state_dict()))
    check()
    assert len(stacked_calls) == n + 4
    net.network[1].bn2.train()                                # one BN training: layered
    with torch.no_grad():
        out = net(x)
        # (Under no_grad both: the dispatcher may pick another backend for a call that
        # needs a gradient, a few ulps away.)
        layered = net.network(x)
    assert len(stacked_calls) == n + 4
    assert rel_err(out, layered) == 0


@requires_cpp
def test_whole_sequence_refolds_on_a_one_ulp_change(monkeypatch, stacked_calls, fresh_seed):
    """The staleness check (fastres/_copies.py's rule) on every call: one value of any
    parameter or buffer moved by one ulp in place (its version counter moves), or through
    .data where the probe reads (a tensor's first or last 32 values, every value of a small
    one), a weight set to NaN (the new plan holds it), a norm's eps changed: each refolds
    before the next call (a new plan), and an unchanged model does not. A one-ulp write
    through .data elsewhere may escape until fastres.forget_weights(model)."""
    _always(monkeypatch, True)
    rng = random.Random(fresh_seed)
    net = random_tcn(rng, "batch", max_levels=3)
    x = random_input(rng, in_channels(net), rng.randint(1, 40), 1, torch.float32)
    cache = lambda: net.__dict__[whole_sequence_module._CACHE_ATTR]  # noqa: E731
    probes = sys.modules["fastres._copies"].PROBES

    def one_ulp(flat, k):
        flat[k] = torch.nextafter(flat[k], torch.tensor(float("inf")))
    with torch.no_grad():
        net(x)
        plan = cache().plan
        net(x)
        assert cache().plan is plan
        tensors = [t for t in list(net.parameters()) + list(net.buffers())
                   if t.is_floating_point() and t.numel()]
        for _ in range(5):
            flat = rng.choice(tensors).view(-1)
            one_ulp(flat, rng.randrange(flat.numel()))           # in place: counted
            net(x)
            assert cache().plan is not plan
            plan = cache().plan
        for _ in range(5):
            flat = rng.choice(tensors).data.view(-1)
            n = flat.numel()
            k = rng.randrange(n) if n <= probes else rng.choice(
                [rng.randrange(probes // 2), n - 1 - rng.randrange(probes // 2)])
            one_ulp(flat, k)                                     # .data, where probed
            net(x)
            assert cache().plan is not plan
            plan = cache().plan
        flat = rng.choice(tensors).data.view(-1)
        one_ulp(flat, flat.numel() // 2)                         # .data, anywhere
        fastres.forget_weights(net)
        net(x)
        assert cache().plan is not plan
        plan = cache().plan
        saved = tensors[0].data.view(-1)[0].item()
        tensors[0].data.view(-1)[0] = float("nan")
        net(x)   # (the NaN may not reach the output: a padding tap is skipped, ReLU drops it)
        assert cache().plan is not plan and torch.isnan(cache().plan.weights).any()
        plan = cache().plan
        tensors[0].data.view(-1)[0] = saved
        bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d))
        bn.eps = bn.eps * 2
        assert rel_err(net(x), net.network(x)) < TOL[torch.float32]
        assert cache().plan is not plan


@requires_cpp
def test_stream_stale_compares_every_value(fresh_seed):
    """Stream.stale(), asked rarely, compares every value: a one-ulp write through .data
    anywhere is seen."""
    rng = random.Random(fresh_seed)
    net = random_tcn(rng, "batch", max_levels=3)
    s = fastres.stream(net)
    tensors = [t for t in list(net.parameters()) + list(net.buffers())
               if t.is_floating_point() and t.numel()]
    flat = max(tensors, key=lambda t: t.numel()).data.view(-1)
    k = flat.numel() // 2
    assert not s.stale()
    flat[k] = torch.nextafter(flat[k], torch.tensor(float("inf")))
    assert s.stale()


@requires_cpp
def test_whole_sequence_only_where_the_layered_path_is_plain_inference(monkeypatch,
                                                                       stacked_calls):
    _always(monkeypatch, True)
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(3, [6, 6], kernel_size=3).eval()
    x = torch.randn(2, 3, 16)
    net(x)                                    # grad enabled and parameters require it
    net(x.requires_grad_())
    with torch.no_grad():
        net.train()(x.detach())               # training mode
        net.eval()
        net(torch.randn(9, 3, 16))            # batch above WHOLE_SEQUENCE_MAX_BATCH
        fastres.unfuse(copy.deepcopy(net))(x) # plain twins stay plain
        traced = torch.jit.trace(net, x.detach(), check_trace=False)   # tracing
    assert stacked_calls == [] and "stream_forward" not in str(traced.inlined_graph)
    for p in net.parameters():
        p.requires_grad_(False)
    net(x.detach())                           # nothing needs a gradient
    with torch.inference_mode():
        net(x.detach())
    assert len(stacked_calls) == 2


@requires_cpp
def test_whole_sequence_cache_is_not_copied(monkeypatch):
    _always(monkeypatch, True)
    net = fastres.TemporalConvNet(3, [4], kernel_size=2).eval()
    with torch.no_grad():
        net(torch.randn(1, 3, 8))
    assert net.__dict__[whole_sequence_module._CACHE_ATTR].plan is not None
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        cache = copied.__dict__[whole_sequence_module._CACHE_ATTR]
        assert cache.plan is None


def test_unfused_temporal_conv_net_still_scripts():
    torch.manual_seed(0)
    net = randomize_bn(fastres.TemporalConvNet(3, [4, 4], kernel_size=2)).eval()
    with warnings_ignored():
        scripted = torch.jit.script(fastres.unfuse(net))
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        assert rel_err(scripted(x), net.network(x)) < 1e-5


# ----------------------------------------------------------------------------- chunk kernels


def _chunk_kernels():
    """The kernels of float32 chunks from a zero state on this CPU (csrc/cpu/stream_cpu.cpp,
    "chunk tiles"): BLAS per tap everywhere, the AVX-512 register tiles where the CPU has
    them."""
    from fastres.stream.core import cpp_unavailable
    if cpp_unavailable() is not None:
        return ["gemm"]
    import fastres._C as extension
    return list(extension.stream_chunk_kernels())


@pytest.fixture(params=_chunk_kernels())
def chunk_kernel(request):
    """Runs the test with one chunk kernel, then restores the default."""
    import fastres._C as extension
    default = extension.stream_chunk_kernel()
    extension.stream_chunk_kernel(request.param)
    yield request.param
    extension.stream_chunk_kernel(default)


def _wide_tcn(rng: random.Random, norm: str) -> torch.nn.Module:
    """A TemporalConvNet whose widths hit every tile shape of the tiles kernel: 1-3 vectors
    of 16 channels, a full 64-channel slice and one more, widths not a multiple of 16 (the
    masked last vector); some levels change width (the 1x1 downsample); dilations from 1 to
    past the sequence."""
    c_in = rng.randint(1, 20)
    widths = [rng.choice([rng.randint(1, 15), rng.randint(17, 63), 64, rng.randint(65, 80)])
              for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.5:
        widths = [widths[0]] * len(widths)   # identity residuals after the first level
    torch.manual_seed(rng.randint(0, 2**31))
    net = fastres.TemporalConvNet(c_in, widths, kernel_size=rng.randint(1, 4), dropout=0.0,
                                  norm=norm,
                                  dilations=[rng.choice([1, 2, 3, 5, 8, 40]) for _ in widths])
    if norm == "weight":   # locuslab's init makes tiny weights; make the outputs matter
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("original0"):
                    p.uniform_(0.5, 1.5)
    return randomize_bn(net, seed=rng.randint(0, 2**31)).eval()


@requires_cpp
@pytest.mark.parametrize("norm", ["batch", "weight"])
def test_chunk_kernels_match_the_float64_forward_on_fresh_draws(fresh_seed, chunk_kernel,
                                                                norm):
    """The whole-stack kernel's call (a chunk from a zero state) on either chunk kernel
    against the float64 plain twin, on a fresh draw: tile rows not a multiple of any tile
    (lengths 1-100), widths not a multiple of 16, dilations past the sequence, 1-4 taps, the
    weight-norm block's ReLU before the add, 1-3 sequences, the output poisoned with NaN; one
    and two threads (two: the time steps of each conv split across threads for one sequence,
    the sequences for more)."""
    from fastres.stream.plan import Plan
    rng = random.Random(fresh_seed)
    net = _wide_tcn(rng, norm)
    batch, length = rng.randint(1, 3), rng.randint(1, 100)
    x = random_input(rng, in_channels(net), length, batch, torch.float32)
    plan = Plan(net)
    empty, no_position = plan.empty_state
    want = full_forward(net, x)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            out = torch.full((batch, plan.c_out, length), float("nan"))
            torch.ops.fastres_ext.stream_forward_out.default(
                x, plan.weights, plan.meta(batch), empty, no_position, empty, out)
            err = rel_err(out, want)
            assert err < TOL[torch.float32], \
                f"{chunk_kernel}, {n_threads} threads: relative error {err:.2e}"
    finally:
        torch.set_num_threads(threads)


@requires_cpp
def test_chunk_kernel_choice_is_checked():
    import fastres._C as extension
    kernels = extension.stream_chunk_kernels()
    assert "gemm" in kernels
    with pytest.raises(RuntimeError, match="'gemm' or 'tiles'"):
        extension.stream_chunk_kernel("blas")
    if "tiles" not in kernels:
        with pytest.raises(RuntimeError, match="needs a CPU with AVX-512"):
            extension.stream_chunk_kernel("tiles")
    assert extension.stream_chunk_kernel() == kernels[-1]   # the fastest this CPU runs


@requires_cpp
def test_chunk_input_and_output_in_any_layout_are_copied_exactly(fresh_seed, chunk_kernel):
    """The kernel's entry and exit transposes ((B, C, n) with any strides <-> its rows of
    channels), done by 16 x 16 tiles: channel counts and lengths not multiples of 16 (1-40
    steps, 1-20 input channels), x as a channels-last view, a transpose and a slice of a
    longer sequence, out written through a channels-last view. Every layout gives exactly
    the bits of the contiguous call, which is within the float32 bound of the float64
    forward."""
    from fastres.stream.plan import Plan
    rng = random.Random(fresh_seed)
    net = _wide_tcn(rng, rng.choice(["batch", "weight"]))
    batch, length = rng.randint(1, 3), rng.randint(1, 40)
    x = random_input(rng, in_channels(net), length, batch, torch.float32)
    plan = Plan(net)
    empty, no_position = plan.empty_state

    def run(x_view, out):
        out.fill_(float("nan"))
        torch.ops.fastres_ext.stream_forward_out.default(
            x_view, plan.weights, plan.meta(batch), empty, no_position, empty, out)
        return out
    want = run(x, torch.empty(batch, plan.c_out, length))
    assert rel_err(want, full_forward(net, x)) < TOL[torch.float32]
    longer = torch.cat([torch.randn(batch, x.shape[1], 3), x, torch.randn(batch, x.shape[1], 2)],
                       dim=2)
    views = {"channels-last": x.transpose(1, 2).contiguous().transpose(1, 2),
             "time-major": x.permute(2, 1, 0).contiguous().permute(2, 1, 0),
             "slice": longer[:, :, 3:3 + length]}
    for name, view in views.items():
        assert torch.equal(view, x)
        got = run(view, torch.empty(batch, plan.c_out, length))
        assert torch.equal(got, want), name
    out_cl = torch.empty(batch, length, plan.c_out).transpose(1, 2)
    assert torch.equal(run(x, out_cl), want)
