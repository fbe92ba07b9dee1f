"""fastres.stream: stepping a causal stack gives the full causal forward at every step.

Every parity test draws a fresh random model and input and judges the stream against the
full forward of the same model's plain twin run in float64 (fp32 1e-5, bf16 1e-2), for
each backend: the C++ kernel, the pure-PyTorch fallback and the Triton kernel (in the
interpreter, tiny shapes). Then the state (reset, save/restore, independent streams, moving
between backends), every refused case, and TemporalConvNet's whole-sequence fast path.
"""
import copy
import importlib
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
from fastres.stream import (BACKENDS, Stream, StreamError, unavailable_reason, whole_sequence)
from availability import requires_cuda
from upstream import (LocuslabTCN, SeedTCN, SeedTemporalBlock, randomize_bn,
                      warnings_ignored)

stream_module = importlib.import_module("fastres.stream")   # fastres.stream is the function

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in BACKENDS if unavailable_reason(b, CPU) is None]
# Triton's interpreter runs a step in tens of milliseconds: its tests use tiny stacks.
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]
requires_cpp = pytest.mark.skipif(unavailable_reason("cpp", CPU) is not None,
                                  reason=f"cpp stream kernel: {unavailable_reason('cpp', CPU)}")
requires_triton = pytest.mark.skipif(
    unavailable_reason("triton", CPU) is not None,
    reason=f"triton stream kernel: {unavailable_reason('triton', CPU)}")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (as tests/nn): on a busy 2-core machine a second thread makes
    every tiny op wait milliseconds for a core. test_threads_split_the_work uses two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers


def random_tcn(rng: random.Random, norm: str, dtype=torch.float32, max_channels=10,
               max_levels=3, max_kernel=4) -> nn.Module:
    """A TemporalConvNet with random widths (some levels change width: a downsample),
    kernel size and depth, random BN statistics; in eval mode."""
    c_in = rng.randint(1, 6)
    channels, width = [], c_in
    for _ in range(rng.randint(1, max_levels)):
        width = width if rng.random() < 0.4 else rng.randint(2, max_channels)
        channels.append(width)
    torch.manual_seed(rng.randint(0, 2**31))
    net = fastres.TemporalConvNet(c_in, channels, kernel_size=rng.randint(1, max_kernel),
                                  dropout=0.3, norm=norm)
    if norm == "weight":   # locuslab's init makes tiny weights; make the outputs matter
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("original0"):
                    p.uniform_(0.5, 1.5)
    return randomize_bn(net, seed=rng.randint(0, 2**31)).eval().to(dtype)


def full_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The causal forward of the model's plain twin, in float64."""
    plain = fastres.unfuse(copy.deepcopy(model)).double().eval()
    with torch.no_grad():
        return plain(x.double())


def random_input(rng: random.Random, model_channels: int, length: int, batch: int,
                 dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    return torch.randn(batch, model_channels, length, generator=g).to(dtype)


def run_steps(s: Stream, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([s.step(x[..., t]) for t in range(x.shape[-1])], dim=-1)


def run_chunks(s: Stream, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    outs, t = [], 0
    while t < x.shape[-1]:
        n = rng.randint(1, max(1, x.shape[-1] // 2))
        outs.append(s.step(x[..., t:t + n]))
        t += n
    return torch.cat(outs, dim=-1)


def assert_parity(got, want, dtype, what=""):
    assert got.dtype == dtype
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} (bound {TOL[dtype]:g})"


def in_channels(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv1d)).in_channels


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


def test_stale_and_refold_keep_the_state():
    rng = random.Random(14)
    model = random_tcn(rng, "batch", max_levels=3)
    x = random_input(rng, in_channels(model), 10, 1, torch.float32)
    s = stream_fn(model, backend=CPU_BACKENDS[0])
    s.step(x[..., :4])
    assert not s.stale()
    # The last conv's output feeds no ring, so after changing it (through .data: no version
    # counter moves) and refolding, the kept state continues as the new model's forward.
    model.network[-1].conv2.weight.data.mul_(1.5)
    assert s.stale()
    s.refold()
    assert not s.stale() and s.position == 4
    assert_parity(s.step(x[..., 4:]), full_forward(model, x)[..., 4:], torch.float32)


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


# ----------------------------------------------------------------------------- refusals


def _bn_training():
    net = fastres.TemporalConvNet(2, [4], kernel_size=2).eval()
    net.network[0].bn2.train()
    return net, "network.0.bn2 (BatchNorm1d): batch norm in training mode"


def _no_running_stats():
    net = fastres.TemporalConvNet(2, [4], kernel_size=2).eval()
    net.network[0].bn1 = nn.BatchNorm1d(4, track_running_stats=False).eval()
    return net, "without running statistics"


def _seed_tcn_root():
    return fastres.convert(SeedTCN(2, [4, 4])), "if its forward runs .network, stream that"


REFUSED = {
    "same padding (BasicBlock)": lambda: (fastres.BasicBlock(4, 4).eval(), "'same' padding"),
    "ResNet1d": lambda: (fastres.ResNet1d(in_channels=2).eval(), "ResNet1d"),
    "stride (causal BasicBlock)": lambda: (
        fastres.BasicBlock(4, 8, 2, "auto", causal=True).eval(), "stride 2"),
    "stride (1x1 conv)": lambda: (nn.Conv1d(4, 4, 1, stride=2), "stride 2"),
    "bare conv with kernel 3": lambda: (nn.Conv1d(4, 4, 3, padding=1), "kernel_size 3"),
    "training-mode batch norm": lambda: (
        fastres.TemporalConvNet(2, [4], dropout=0.0).train(),
        "network.0.bn1 (BatchNorm1d): batch norm in training mode"),
    "one BN in training mode": _bn_training,
    "BN without running stats": _no_running_stats,
    "active dropout": lambda: (
        fastres.TemporalConvNet(2, [4], dropout=0.2, norm="weight").train(),
        "dropout (p=0.2) is active in training mode"),
    "unknown module": lambda: (nn.Sequential(nn.LSTM(4, 4)), "0 (LSTM): unknown module"),
    "upstream block not converted": lambda: (SeedTemporalBlock(4, 4, 3),
                                             "fastres.convert(model) first"),
    "converted model root": _seed_tcn_root,
    "fused conv runs": lambda: (fastres.convert(nn.Sequential(
        nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())).eval(),
        "ConvBNReLUSequential"),
    "channel mismatch": lambda: (nn.Sequential(fastres.TemporalConvNet(2, [4]).eval(),
                                               nn.Conv1d(5, 3, 1)), "takes 5 channels"),
    "leading ReLU": lambda: (nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1)),
                             "cannot start with a ReLU"),
    "nothing to stream": lambda: (nn.Sequential(nn.Identity()), "no layer to stream"),
    "grouped conv": lambda: (nn.Conv1d(4, 4, 1, groups=2), "grouped"),
    "not a module": lambda: ("model", "expected an nn.Module"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_models_say_which_module_and_why(case):
    with warnings_ignored():
        model, message = REFUSED[case]()
    with pytest.raises(StreamError) as exc:
        stream_fn(model, backend="torch")
    assert message in str(exc.value), str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_train_mode_without_bn_or_active_dropout_streams():
    # Training mode changes nothing here (weight norm, dropout 0): nothing to refuse.
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(2, [4, 4], kernel_size=2, dropout=0.0, norm="weight").train()
    x = torch.randn(1, 2, 7)
    assert_parity(stream_fn(net, backend="torch").step(x), full_forward(net, x), torch.float32)


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
    for out, message in ((torch.empty(2, 5), "out must be a contiguous (2, 4)"),
                         (torch.empty(4, 2).t(), "out must be a contiguous"),
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


# ----------------------------------------------------------------------------- whole sequences


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts calls of the stacked kernel by TemporalConvNet.forward."""
    calls = []
    original = stream_module._stacked_forward

    def counting(plan, x):
        calls.append(tuple(x.shape))
        return original(plan, x)
    monkeypatch.setattr(stream_module, "_stacked_forward", counting)
    return calls


def _always(monkeypatch, faster: bool):
    monkeypatch.setattr(stream_module, "_stacked_is_faster", lambda *args: faster)


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
def test_whole_sequence_keeps_the_measured_winner(monkeypatch, stacked_calls):
    from fastres.bench import timing
    net = fastres.TemporalConvNet(3, [8, 8], kernel_size=3).eval()
    timings = {"stacked": 2.0, "layered": 1.0}   # layered faster first
    measured = []

    def fake_measure(candidates, device, config):
        measured.append(sorted(candidates))
        for fn in candidates.values():
            fn()
        return {name: timing.Stats([timings[name]] * 5, 1, 0.0) for name in candidates}
    monkeypatch.setattr(timing, "measure", fake_measure)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        for length in (32, 32, 17, 31):                      # L rounds up to 32
            net(x[..., :length])
    assert measured == [["layered", "stacked"]]              # once per signature
    stacked_calls.clear()
    with torch.no_grad():
        net(x)
    assert stacked_calls == []                               # the slower path never runs
    timings["stacked"] = 0.5
    with torch.no_grad():
        net(torch.randn(2, 3, 32))                           # a new signature: measured
        net(torch.randn(2, 3, 32))
    assert len(measured) == 2 and stacked_calls[-1] == (2, 3, 32)
    choices = net.__dict__[stream_module._CACHE_ATTR].choices
    assert choices == {(1, 32, torch.float32, 1): False, (2, 32, torch.float32, 1): True}
    timings["stacked"] = 0.95   # faster, but under the margin: not worth the risk
    with torch.no_grad():
        net(torch.randn(3, 3, 32))
    assert choices[(3, 32, torch.float32, 1)] is False


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
    assert len(stacked_calls) == n + 4
    assert rel_err(out, net.network(x)) == 0


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
    assert net.__dict__[stream_module._CACHE_ATTR].plan is not None
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        cache = copied.__dict__[stream_module._CACHE_ATTR]
        assert cache.plan is None and cache.choices == {}


def test_unfused_temporal_conv_net_still_scripts():
    torch.manual_seed(0)
    net = randomize_bn(fastres.TemporalConvNet(3, [4, 4], kernel_size=2)).eval()
    with warnings_ignored():
        scripted = torch.jit.script(fastres.unfuse(net))
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        assert rel_err(scripted(x), net.network(x)) < 1e-5
