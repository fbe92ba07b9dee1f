"""fastres.stream's functional core: step(plan, x, state, position) -> y, the caller owning
the state, matches its pure-PyTorch twin step_ref on fresh draws (steps, chunks, strided
inputs, every backend), and step_ref matches the full causal forward."""
import random

import pytest
import torch

from fastres.stream import Plan, StreamError, step, step_ref
from stream_helpers import (CPU_BACKENDS, assert_parity, full_forward, in_channels,
                            random_input, random_tcn)


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
