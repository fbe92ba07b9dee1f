"""fastres.stream's Stream: stepping a causal stack gives the full causal forward at every step.

Every parity test draws a fresh random model and input and judges the stream against the
full forward of the same model's plain twin run in float64 (fp32 1e-5, bf16 1e-2), for
each backend: the C++ kernel, the pure-PyTorch fallback and the Triton kernel (in the
interpreter, tiny shapes). Then the state (reset, save/restore, independent streams, moving
between backends) and bad inputs.
"""
import copy
import importlib.util
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastres
from fastres import _alloc
from fastres import stream as stream_fn
from fastres.conventions import rel_err
from fastres.stream import StreamError, unavailable_reason, whole_sequence
from availability import requires_cuda
from stream_helpers import (CPU, CPU_BACKENDS, FAST_BACKENDS, assert_parity, full_forward,
                            in_channels, random_input, random_tcn, requires_cpp,
                            requires_triton, run_chunks, run_steps)
from upstream import LocuslabTCN, SeedTCN, randomize_bn, warnings_ignored


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["batch", "weight"])
@pytest.mark.parametrize("seed", range(4))
def test_steps_and_chunks_give_the_full_forward(backend, dtype, norm, seed):
    rng = random.Random(f"{backend}-{dtype}-{norm}-{seed}")
    model = random_tcn(rng, norm, dtype)
    x = random_input(rng, in_channels(model), rng.randint(1, 40), rng.randint(1, 3), dtype)
    want = full_forward(model, x)
    s = stream_fn(model, backend=backend)
    assert s.backend == backend
    assert_parity(run_steps(s, x), want, dtype, "single steps")
    assert s.position == x.shape[-1]
    s.reset()                                   # and the same again from the reset state
    assert s.position == 0
    assert_parity(run_chunks(s, x, rng), want, dtype, "random chunks after reset")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_whole_sequence_as_one_chunk_and_float64(backend):
    rng = random.Random(backend)
    for dtype in (torch.float32, torch.float64):
        model = random_tcn(rng, "batch", dtype, max_levels=4)
        x = random_input(rng, in_channels(model), 50, 2, dtype)
        assert_parity(stream_fn(model, backend=backend).step(x), full_forward(model, x), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_gradient_flows_through_a_stream(backend):
    net = fastres.TemporalConvNet(2, [3], kernel_size=2).eval()
    s = stream_fn(net, backend=backend)
    x = torch.randn(1, 2, 3, requires_grad=True)
    assert not s.step(x).requires_grad and not s.step(x[..., 0]).requires_grad


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_out_is_written_in_full(backend):
    # out= prefilled with NaN: the kernel must write every element (one step and a chunk).
    rng = random.Random(7)
    model = random_tcn(rng, "batch")
    x = random_input(rng, in_channels(model), 9, 2, torch.float32)
    want = full_forward(model, x)
    s = stream_fn(model, backend=backend)
    c_out = s.out_channels
    first = torch.full((2, c_out), float("nan"))
    assert s.step(x[..., 0], out=first) is first
    rest = torch.full((2, c_out, 8), float("nan"))
    assert s.step(x[..., 1:], out=rest) is rest
    assert_parity(torch.cat([first[..., None], rest], -1), want, torch.float32)
    with _alloc.poisoned():   # fresh outputs (Python-allocated ones are NaN-filled)
        s.reset()
        assert_parity(run_chunks(s, x, rng), want, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_converted_upstream_models_stream(backend):
    """The TemporalBlocks fastres.convert makes of seed and locuslab/TCN models."""
    torch.manual_seed(0)
    rng = random.Random(backend)
    for upstream in (randomize_bn(SeedTCN(3, [6, 6, 8], kernel_size=3, dropout=0.2)),
                     LocuslabTCN(3, [6, 6, 8], kernel_size=3, dropout=0.2)):
        with warnings_ignored():
            converted = fastres.convert(upstream).eval()
        assert all(type(b) is fastres.TemporalBlock for b in converted.network)
        x = random_input(rng, 3, 30, 2, torch.float32)
        upstream.eval()
        with torch.no_grad():
            want = copy.deepcopy(upstream).double()(x.double())
        s = stream_fn(converted.network, backend=backend)
        assert_parity(run_steps(s, x), want, torch.float32, type(upstream).__name__)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_sequential_with_pointwise_head_and_causal_basic_blocks(backend):
    torch.manual_seed(1)
    model = nn.Sequential(
        fastres.TemporalConvNet(3, [8, 8], kernel_size=3),
        fastres.BasicBlock(8, 12, 1, "auto", causal=True, dilation=2),   # 1x1 conv + BN residual
        fastres.BasicBlock(12, 12, causal=True, kernel_size=2),
        nn.Dropout(0.5), nn.Conv1d(12, 16, 1), nn.ReLU(), nn.Identity(), nn.Conv1d(16, 5, 1))
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 25)
    s = stream_fn(model, backend=backend)
    assert (s.in_channels, s.out_channels) == (3, 5)
    assert s.receptive_field == 1 + 2 * 2 * (1 + 2) + 2 * 2 * 2 + 2 * 1
    assert_parity(run_chunks(s, x, random.Random(1)), full_forward(model, x), torch.float32)


@requires_cpp
def test_threads_split_the_work():
    """The C++ kernel's parallel paths: time steps split across threads (one long sequence)
    and batch items split across threads (steps and chunks of 64 streams)."""
    rng = random.Random(2)
    torch.manual_seed(2)
    model = randomize_bn(fastres.TemporalConvNet(4, [32, 32, 32], kernel_size=3)).eval()
    long = random_input(rng, 4, 300, 1, torch.float32)
    many = random_input(rng, 4, 6, 64, torch.float32)
    # (A race shows in some runs only: the two threads run a few times.)
    runs = []
    for threads in (1, 2, 2, 2):
        torch.set_num_threads(threads)
        s = stream_fn(model, backend="cpp")
        outs = [s.step(long)]
        s = stream_fn(model, backend="cpp")
        runs.append(outs + [torch.cat([s.step(many[..., :3]), run_steps(s, many[..., 3:])], -1)])
    for two in runs[1:]:
        for one_thread_out, two_threads_out, x in zip(runs[0], two, (long, many)):
            assert rel_err(two_threads_out, one_thread_out) < 1e-6
            assert_parity(two_threads_out, full_forward(model, x), torch.float32)


def test_plain_twins_stream_like_the_fused_blocks():
    rng = random.Random(3)
    for norm in ("batch", "weight"):
        fused = random_tcn(rng, norm)
        plain = fastres.unfuse(copy.deepcopy(fused))
        x = random_input(rng, in_channels(fused), 12, 1, torch.float32)
        want = full_forward(fused, x)
        assert_parity(stream_fn(plain, backend="torch").step(x), want, torch.float32)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_save_restore_continues_identically(backend):
    rng = random.Random(11)
    model = random_tcn(rng, "batch", max_levels=3)
    x = random_input(rng, in_channels(model), 30, 3, torch.float32)
    s = stream_fn(model, backend=backend)
    first = run_chunks(s, x[..., :13], rng)
    saved = s.state()
    assert saved["position"] == 13 and saved["batch_size"] == 3
    after = run_steps(s, x[..., 13:])
    s.reset(batch_size=1)                        # anything in between
    s.step(torch.randn(1, in_channels(model)))
    s.load_state(saved)
    again = run_steps(s, x[..., 13:])
    assert torch.equal(after, again)
    assert_parity(torch.cat([first, after], -1), full_forward(model, x), torch.float32)
    # The saved copy is not aliased to the live state, and it pickles (torch.save).
    assert not torch.equal(saved["rings"], s.state()["rings"])
    restored = pickle.loads(pickle.dumps(saved))
    fresh = stream_fn(model, backend=backend)
    fresh.load_state(restored)
    assert torch.equal(run_steps(fresh, x[..., 13:]), after)


def test_state_moves_between_backends():
    # Every backend keeps the same state layout: hand the state on every 3 steps.
    rng = random.Random(12)
    model = random_tcn(rng, "weight", max_channels=4, max_levels=2)
    x = random_input(rng, in_channels(model), 12, 2, torch.float32)
    outs, saved = [], None
    for i, t in enumerate(range(0, 12, 3)):
        s = stream_fn(model, backend=CPU_BACKENDS[i % len(CPU_BACKENDS)])
        if saved is not None:
            s.load_state(saved)
        outs.append(s.step(x[..., t:t + 3]))
        saved = s.state()
    assert_parity(torch.cat(outs, -1), full_forward(model, x), torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_independent_streams(backend):
    # Two streams of one model, stepped alternately, and a batch of 4 in one stream: each
    # gives its own input's forward.
    rng = random.Random(13)
    model = random_tcn(rng, "batch")
    xa, xb = (random_input(rng, in_channels(model), 15, 1, torch.float32) for _ in range(2))
    a, b = stream_fn(model, backend=backend), stream_fn(model, backend=backend)
    ya, yb = [], []
    for t in range(15):
        ya.append(a.step(xa[..., t]))
        yb.append(b.step(xb[..., t]))
    assert_parity(torch.stack(ya, -1), full_forward(model, xa), torch.float32)
    assert_parity(torch.stack(yb, -1), full_forward(model, xb), torch.float32)
    batch = random_input(rng, in_channels(model), 15, 4, torch.float32)
    s = stream_fn(model, batch_size=4, backend=backend)
    assert_parity(run_steps(s, batch), full_forward(model, batch), torch.float32)



# ----------------------------------------------------------------------------- Triton


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_kernel_in_the_interpreter(dtype):
    rng = random.Random(f"triton-{dtype}")
    torch.manual_seed(rng.randint(0, 100))
    model = randomize_bn(nn.Sequential(fastres.TemporalConvNet(2, [4, 3], kernel_size=2),
                                       nn.ReLU(), nn.Conv1d(3, 2, 1))).eval().to(dtype)
    x = random_input(rng, 2, 6, 2, dtype)
    want = full_forward(model, x)
    s = stream_fn(model, backend="triton")
    out = torch.full((2, 2), float("nan"), dtype=dtype)
    steps = [s.step(x[..., 0], out=out).clone()] + [s.step(x[..., t]) for t in (1, 2)]
    chunk = s.step(x[..., 3:])
    assert_parity(torch.cat([torch.stack(steps, -1), chunk], -1), want, dtype)


@requires_triton
def test_triton_state_matches_the_cpu_kernels():
    torch.manual_seed(5)
    model = fastres.TemporalConvNet(2, [3, 4], kernel_size=3, norm="weight").eval()
    x = torch.randn(1, 2, 5)
    states = []
    for backend in CPU_BACKENDS:
        s = stream_fn(model, backend=backend)
        s.step(x)
        states.append(s.state())
    for st in states[1:]:
        assert st["position"] == states[0]["position"]
        assert rel_err(st["rings"], states[0]["rings"]) < 1e-6


def _python(code):
    """Run code in a fresh interpreter without TRITON_INTERPRET (so kernels compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernel for real")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernel_compiles_for_sm90():
    """CPU twin of test_triton_stream_on_cuda: compile the kernel for an H100 (sm_90)."""
    result = _python("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastres.backends.triton import stream_step
        fn = stream_step.stream_kernel
        for dt in ("fp32", "bf16", "fp16"):
            types = dict(x_ptr="*" + dt, out_ptr="*" + dt, w_ptr="*fp32", meta_ptr="*i64",
                         state_ptr="*fp32", pos_ptr="*i64", scratch_ptr="*fp32")
            consts = dict(BLOCK_CO=64, BLOCK_CI=32)
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs={
                (fn.arg_names.index(n),): v for n, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": 4})
            assert "bar.sync" in kernel.asm["ptx"]   # the barriers between dependent layers
        print("compiled")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_stream_on_cuda(dtype):
    """GPU: compiled Triton kernel, single steps replayed from a CUDA graph, chunks."""
    rng = random.Random(21)
    model = random_tcn(rng, "batch", dtype, max_channels=64, max_levels=4)
    x = random_input(rng, in_channels(model), 40, 3, dtype)
    want = full_forward(model, x)
    model, x = model.cuda(), x.cuda()
    s = stream_fn(model)
    assert s.backend == "triton"
    steps = run_steps(s, x[..., :20])
    rest = run_chunks(s, x[..., 20:], rng)
    assert_parity(torch.cat([steps, rest], -1).cpu(), want, dtype)
    s.reset()
    assert_parity(run_steps(s, x).cpu(), want, dtype)



def test_bad_inputs_raise_clear_errors():
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(3, [4], kernel_size=2).eval()
    s = stream_fn(net, backend=CPU_BACKENDS[0])
    with pytest.raises(StreamError, match="no state yet"):
        s.state()
    s.step(torch.randn(2, 3))
    assert s.batch_size == 2
    cases = [
        (torch.randn(3, 3), "advances 2 streams (batch size set by the first step), got x "
                            "with batch size 3; call reset(batch_size=3)"),
        (torch.randn(2, 4), "x has 4 channels, the model takes 3"),
        (torch.randn(2, 3, 0), "at least one step"),
        (torch.randn(2, 3).double(), "x is torch.float64, the model is torch.float32"),
        (torch.randn(2, 3, 4, 1), "shape (B, C_in) or (B, C_in, n)"),
        ([[1.0] * 3] * 2, "takes a tensor"),
        (torch.empty(2, 3, device="meta"), "x is on meta, the model on cpu"),
    ]
    for x, message in cases:
        with pytest.raises(StreamError, match=re.escape(message)):
            s.step(x)
    for out, message in ((torch.empty(2, 5), "out must be a (2, 4)"),
                         (torch.empty(1, 4).expand(2, 4), "out must not overlap itself"),
                         (torch.empty(2, 4).double(), "out must be")):
        with pytest.raises(StreamError, match=re.escape(message)):
            s.step(torch.randn(2, 3), out=out)
    assert s.position == 1   # nothing above advanced the stream
    fixed = stream_fn(net, batch_size=4, backend="torch")
    with pytest.raises(StreamError, match="batch size set by the constructor"):
        fixed.step(torch.randn(2, 3))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(StreamError, match="batch_size must be an int >= 1"):
            s.reset(batch_size=bad)
    s.reset(batch_size=3)
    assert s.batch_size == 3 and s.step(torch.randn(3, 3)).shape == (3, 4)


def test_bad_states_and_backends_raise_clear_errors():
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(3, [4], kernel_size=2).eval()
    other = fastres.TemporalConvNet(3, [4], kernel_size=3).eval()
    s = stream_fn(net, backend="torch")
    s.step(torch.randn(2, 3))
    saved = s.state()
    with pytest.raises(StreamError, match="from a model with other layers"):
        stream_fn(other, backend="torch").load_state(saved)
    with pytest.raises(StreamError, match=re.escape("takes the dict state() returns")):
        s.load_state({"rings": saved["rings"]})
    with pytest.raises(StreamError, match="must be a .*-value torch.float32 tensor"):
        s.load_state(dict(saved, rings=saved["rings"].double()))
    with pytest.raises(StreamError, match="unknown backend 'numpy'"):
        stream_fn(net, backend="numpy")
    assert unavailable_reason("cpp", torch.device("cuda")) == "runs on CPU only"
    assert "computes in float32" in unavailable_reason("triton", torch.device("cuda"),
                                                       torch.float64)
    with pytest.raises(StreamError, match="backend 'triton' cannot run a float64 model"):
        stream_fn(copy.deepcopy(net).double(), backend="triton")
    with pytest.raises(StreamError, match="model's layers, dtype or device changed"):
        s._model = other
        s.refold()


def test_cpp_backend_without_the_extension_names_the_reason(monkeypatch):
    from fastres import _ext
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_load_error", "fastres._C does not load (test)")
    assert "does not load" in unavailable_reason("cpp", CPU)
    net = fastres.TemporalConvNet(2, [3]).eval()
    assert stream_fn(net).backend == "torch"   # the fallback takes over
    with pytest.raises(StreamError, match="backend 'cpp' cannot run a float32 model on cpu: "
                                          ".*does not load"):
        stream_fn(net, backend="cpp")
    assert whole_sequence(net, torch.randn(1, 2, 8)) is None



# ----------------------------------------------------------------------------- strides


def strided_views(x: torch.Tensor):
    """(name, fn(t) -> x's step t as a view with other strides) for x (B, C, T)."""
    channels_last = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)   # (B, C, T), C fastest
    time_major = x.permute(2, 1, 0).contiguous()                       # (T, C, B)
    return [("slice", lambda t: x[:, :, t]),
            ("channels-last slice", lambda t: channels_last[:, :, t]),
            ("transpose", lambda t: time_major[t].t()),
            ("every other channel", lambda t: torch.repeat_interleave(x[:, :, t], 2, 1)[:, ::2])]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_give_the_steps_of_contiguous_copies(backend):
    rng = random.Random(f"strides-{backend}")
    small = backend == "triton"
    model = random_tcn(rng, "batch", max_levels=2 if small else 3)
    batch, length = 3, 4 if small else 9
    x = random_input(rng, in_channels(model), length, batch, torch.float32)
    s = stream_fn(model, batch_size=batch, backend=backend)
    want = run_steps(s, x)   # x[..., t] of a contiguous x is itself strided: copy each step
    s.reset()
    want = torch.stack([s.step(x[..., t].contiguous()) for t in range(length)], -1)
    same = torch.equal if backend == "cpp" else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6))
    for name, view in strided_views(x):
        s.reset()
        got = torch.stack([s.step(view(t)) for t in range(length)], -1)
        assert same(got, want), name
    # Expanded: one stream's input broadcast to every stream gives identical streams.
    s.reset()
    one = torch.stack([s.step(x[:1, :, t].expand(batch, -1)) for t in range(length)], -1)
    s.reset()
    alone = torch.stack([s.step(x[:1, :, t].repeat(batch, 1)) for t in range(length)], -1)
    assert same(one, alone)
    # Chunks with any strides, and outputs written into a slice of a longer tensor.
    for name, chunk in (("chunk slice", x[:, :, 1:]), ("channels-last chunk",
                                                       x.permute(0, 2, 1).contiguous()
                                                       .permute(0, 2, 1)[:, :, 1:]),
                        ("batch-fastest chunk", x.permute(2, 1, 0).contiguous()
                                                .permute(2, 1, 0)[:, :, 1:])):
        s.reset()
        s.step(x[:, :, 0])
        out = torch.full((batch, s.out_channels, 2 * (length - 1)), float("nan"))
        s.step(chunk, out=out[:, :, ::2])
        assert same(out[:, :, ::2], want[..., 1:]), name
        assert out[:, :, 1::2].isnan().all()   # nothing written between


# ----------------------------------------------------------------------------- bf16 weights


def _bf16_reason():
    from fastres.stream.core import bf16_unavailable
    return bf16_unavailable()


@pytest.mark.skipif(_bf16_reason() is not None, reason=f"bf16 weights: {_bf16_reason()}")
@pytest.mark.parametrize("seed", range(3))
def test_bf16_weights_stay_within_the_bf16_bound(seed):
    """Single steps with bf16 weights and inputs (float32 sums) against the float64 forward;
    widths cover the kernel's 64-channel tiles, single vectors and scalar tails, and odd
    row counts (the padded pair)."""
    rng = random.Random(f"bf16-weights-{seed}")
    c_in = rng.choice([1, 3, 8])
    channels = [rng.choice([5, 16, 64, 80]) for _ in range(rng.randint(1, 3))]
    torch.manual_seed(rng.randint(0, 1000))
    model = randomize_bn(fastres.TemporalConvNet(c_in, channels, kernel_size=rng.randint(2, 3)))
    model = model.eval()
    x = random_input(rng, c_in, 12, rng.randint(1, 3), torch.float32)
    s = stream_fn(model, weight_dtype=torch.bfloat16)
    with _alloc.poisoned():
        got = run_steps(s, x)
    want = full_forward(model, x)
    err = rel_err(got, want)
    assert err < 1e-2, f"relative error {err:.2e} (bf16 bound 1e-2)"
    exact = stream_fn(model)
    assert rel_err(run_steps(exact, x), want) < 1e-5   # the float32 stream, for contrast
    assert err > 1e-6   # the bf16 path ran (it rounds)


def test_bf16_weights_refusals():
    net = fastres.TemporalConvNet(3, [4], kernel_size=2).eval()
    with pytest.raises(StreamError, match="bf16 weights on backend 'torch'"):
        stream_fn(net, backend="torch", weight_dtype=torch.bfloat16)
    with pytest.raises(StreamError, match="weight_dtype must be None or torch.bfloat16"):
        stream_fn(net, weight_dtype=torch.float16)
    with pytest.raises(StreamError, match="float64 model computes in float64"):
        stream_fn(copy.deepcopy(net).double(), weight_dtype=torch.bfloat16)
    if _bf16_reason() is not None:
        with pytest.raises(StreamError, match=re.escape(_bf16_reason())):
            stream_fn(net, weight_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_copied_stream_continues_on_its_own(backend):
    """copy.deepcopy of a stepped stream (its C++ step object included) continues from the
    same state, independently of the original."""
    rng = random.Random(f"copy-{backend}")
    model = random_tcn(rng, "batch")
    x = random_input(rng, in_channels(model), 8, 2, torch.float32)
    s = stream_fn(model, backend=backend)
    run_steps(s, x[..., :4])
    twin = copy.deepcopy(s)
    assert twin.position == 4
    want = run_steps(s, x[..., 4:])
    assert s.position == 8 and twin.position == 4
    assert torch.equal(run_steps(twin, x[..., 4:]), want)
