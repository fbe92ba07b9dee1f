"""fastres.stream's functional core: step(plan, x, state, position) -> y, the caller owning
the state, matches its pure-PyTorch twin step_ref on fresh draws (steps, chunks, strided
inputs, every backend), and step_ref matches the full causal forward."""
import copy
import random

import pytest
import torch
from torch import nn

import fastres
from fastres.conventions import rel_err
from fastres.stream import Plan, StreamError, step, step_ref
from fastres.stream.core import step_cpp
from stream_helpers import (CPU_BACKENDS, assert_parity, full_forward, in_channels,
                            random_input, random_tcn, requires_cpp)
from upstream import randomize_bn


def fresh_state(plan, batch):
    return (torch.zeros(plan.state_size(batch), dtype=plan.compute_dtype),
            torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_step_matches_its_reference_twin(backend, seed):
    rng = random.Random(f"core-{backend}-{seed}")
    small = backend == "triton"   # the interpreter is slow
    model = random_tcn(rng, rng.choice(["batch", "weight"]), max_levels=2 if small else 3)
    batch, length = rng.randint(1, 3), 6 if small else 17
    x = random_input(rng, in_channels(model), length, batch, torch.float32)
    plan = Plan(model)
    state, position = fresh_state(plan, batch)
    ref_state, ref_position = fresh_state(plan, batch)
    got, want, t = [], [], 0
    while t < length:
        n = min(rng.choice([1, 1, rng.randint(1, 5)]), length - t)
        chunk = x[..., t:t + n] if n > 1 else x[..., t]
        got.append(step(plan, chunk, state, position, backend=backend).reshape(batch, -1, n))
        want.append(step_ref(plan, chunk, ref_state, ref_position).reshape(batch, -1, n))
        t += n
        assert int(position) == int(ref_position) == t
    got, want = torch.cat(got, -1), torch.cat(want, -1)
    assert_parity(got, want.double(), torch.float32, f"{backend} vs step_ref")
    assert torch.allclose(state, ref_state, rtol=1e-5, atol=1e-5)   # the same ring layout
    assert_parity(want, full_forward(model, x), torch.float32, "step_ref vs the forward")


def test_step_checks_what_the_caller_owns():
    rng = random.Random("core-checks")
    model = random_tcn(rng, "batch", max_levels=1)
    plan = Plan(model)
    x = random_input(rng, in_channels(model), 1, 2, torch.float32)[..., 0]
    state, position = fresh_state(plan, 2)
    with pytest.raises(StreamError, match="state must be a contiguous"):
        step(plan, x, state[:-1], position)
    with pytest.raises(StreamError, match="state must be a contiguous"):
        step(plan, x[:1], state, position)   # a state for 2 streams, x of 1
    with pytest.raises(StreamError, match="position must be a one-element int64"):
        step(plan, x, state, torch.zeros(1))
    with pytest.raises(StreamError, match="unknown backend"):
        step(plan, x, state, position, backend="numpy")
    assert int(position) == 0 and not state.any()   # nothing above advanced anything


def _random_stack(rng: random.Random):
    """(an eval-mode TemporalConvNet with a 1x1 head, its input channels), drawn from rng:
    widths that hit the kernels' 64-channel tiles, single vectors and scalar tails, kernel
    sizes 1-4 (1: no history), batch or weight norm, a head of 1, 8 or 33 outputs."""
    c_in = rng.choice([1, 3, 8, 17])
    channels = [rng.choice([5, 16, 20, 64, 80]) for _ in range(rng.randint(1, 3))]
    torch.manual_seed(rng.randint(0, 2**31))
    net = fastres.TemporalConvNet(c_in, channels, kernel_size=rng.randint(1, 4),
                                  norm=rng.choice(["batch", "weight"]))
    model = nn.Sequential(randomize_bn(net, seed=rng.randint(0, 2**31)),
                          nn.Conv1d(channels[-1], rng.choice([1, 8, 33]), 1)).eval()
    return model, c_in


@requires_cpp
def test_single_stream_steps_match_the_reference_on_fresh_draws(fresh_seed):
    """The C++ step of one stream (csrc/cpu/stream_cpu.cpp, Stack::run_step_rows: all taps of
    a conv in one pass, ReLU and residual on the row) against step_ref and the full forward,
    on a fresh draw: widths hit the 64-channel tiles, single vectors and scalar tails, kernel
    sizes 1-4 (1: no history), a 1x1 head; a slice x[:, :, t] read in place; then the same
    sequence from a fresh zero state kept nowhere (the whole-sequence kernel at length 1)."""
    rng = random.Random(fresh_seed)
    model, c_in = _random_stack(rng)
    length = 24
    x = random_input(rng, c_in, length, 1, torch.float32)
    plan = Plan(model)
    state, position = fresh_state(plan, 1)
    ref_state, ref_position = fresh_state(plan, 1)
    got = torch.full((1, plan.c_out, length), float("nan"))
    want = []
    for t in range(length):
        step(plan, x[:, :, t], state, position, out=got[:, :, t], backend="cpp")
        want.append(step_ref(plan, x[:, :, t], ref_state, ref_position))
    want = torch.stack(want, -1)
    assert_parity(got, want.double(), torch.float32, "cpp single steps vs step_ref")
    assert torch.allclose(state, ref_state, rtol=1e-5, atol=1e-5)
    full = full_forward(model, x)
    assert_parity(got, full, torch.float32, "cpp single steps vs the forward")
    first = torch.full((1, plan.c_out), float("nan"))
    step_cpp(plan, x[:, :, 0], plan.empty_state[0], plan.empty_state[1], first, plan.meta(1))
    assert_parity(first, full[..., 0], torch.float32, "a step from a state kept nowhere")


def _bf16_kernels():
    """The single-row bf16 kernels this CPU runs (csrc/cpu/stream_cpu.cpp, "bf16 weights"):
    the portable widening one everywhere, the AVX512_BF16 dot product where the CPU has it."""
    from fastres.stream.core import cpp_unavailable
    if cpp_unavailable() is not None:
        return ["widen"]
    import fastres._C as extension
    return ["widen", "dot"] if extension.stream_bf16_dot() else ["widen"]


@pytest.fixture(params=_bf16_kernels())
def bf16_kernel(request):
    """Runs the test with single bf16 rows on one kernel, then restores the default."""
    import fastres._C as extension
    default = extension.stream_bf16_kernel()
    extension.stream_bf16_kernel(request.param)
    yield request.param
    extension.stream_bf16_kernel(default)


@requires_cpp
def test_bf16_steps_match_the_reference_on_fresh_draws(fresh_seed, bf16_kernel):
    """Steps with bf16 weights (float32 sums) against the float32 twin step_ref and the
    float64 forward, within the spec's bf16 bound (see below), on a fresh draw: widths hit the 64-channel
    tiles, single vectors and scalar tails, odd row counts (the padded pair: odd C_in and K),
    kernel sizes 1-4, a 1x1 head; 1-3 streams (one row: Stack::run_step_rows, more:
    conv_rows_bf16); inputs are slices x[:, :, t] read in place, outputs a strided slice.
    Then from a zeroed state again (reset): the same outputs, bit for bit."""
    rng = random.Random(fresh_seed)
    model, c_in = _random_stack(rng)
    batch, length = rng.randint(1, 3), 20
    x = random_input(rng, c_in, length, batch, torch.float32)
    plan = Plan(model, weight_dtype=torch.bfloat16)
    state, position = fresh_state(plan, batch)
    ref_state, ref_position = fresh_state(plan, batch)

    def run():
        got = torch.full((batch, plan.c_out, 2 * length), float("nan"))
        for t in range(length):
            step(plan, x[:, :, t], state, position, out=got[:, :, 2 * t], backend="cpp")
        assert got[:, :, 1::2].isnan().all()   # nothing written between
        return got[:, :, ::2]

    got = run()
    want = torch.stack([step_ref(plan, x[:, :, t], ref_state, ref_position)
                        for t in range(length)], -1)
    assert int(position) == int(ref_position) == length
    full = full_forward(model, x)
    # The spec's bf16 bound, or twice plain PyTorch's own error running the same model in
    # bf16 where the draw amplifies rounding beyond it (a narrow head summing cancelling
    # channels: about 1 draw in 100 puts both PyTorch and these kernels above 1e-2).
    with torch.no_grad():
        plain = fastres.unfuse(copy.deepcopy(model)).eval().bfloat16()
        bound = max(1e-2, 2 * rel_err(plain(x.bfloat16()), full))
    for what, ref in (("step_ref", want.double()), ("the forward", full)):
        err = rel_err(got, ref)
        assert err < bound, \
            f"bf16 {bf16_kernel} vs {what}: relative error {err:.2e} (bound {bound:.2e})"
    assert rel_err(state, ref_state) < 1e-2   # the rings hold what the bf16 steps computed
    assert not torch.equal(got, want)   # the bf16 weights ran (they round)
    state.zero_()
    position.zero_()
    assert torch.equal(run(), got)


@requires_cpp
def test_bf16_kernel_choice_is_checked():
    import fastres._C as extension
    with pytest.raises(RuntimeError, match="'widen' or 'dot'"):
        extension.stream_bf16_kernel("amx")
    if not extension.stream_bf16_dot():
        with pytest.raises(RuntimeError, match="needs a CPU with AVX512_BF16"):
            extension.stream_bf16_kernel("dot")
    assert extension.stream_bf16_kernel() == ("dot" if extension.stream_bf16_dot() else "widen")
