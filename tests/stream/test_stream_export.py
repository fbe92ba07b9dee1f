"""Streaming ONNX export (fastres/stream/export.py): onnxruntime running the exported step
(or chunk) over a sequence, feeding the state back, reproduces the full causal forward within
the fp32 bound; from the zero state, after reset and from a saved state; for any batch size."""
import random

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import fastres
from fastres import stream as stream_fn
from fastres.stream import StreamError
from stream_helpers import (CPU_BACKENDS, assert_parity, full_forward, random_input,
                            random_tcn)
from upstream import warnings_ignored

CHUNK = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random TCN (a width change, so a downsample) with a ReLU and a 1x1 head, exported
    once per chunk size: (model, {chunk: onnxruntime session})."""
    rng = random.Random("onnx-export")
    tcn = random_tcn(rng, "batch", max_levels=3, max_kernel=3)
    torch.manual_seed(rng.randint(0, 100))
    width = tcn.network[-1].conv2.out_channels
    model = nn.Sequential(tcn, nn.ReLU(), nn.Conv1d(width, 3, 1)).eval()
    s = stream_fn(model)
    sessions = {}
    for chunk in (1, CHUNK):
        path = tmp_path_factory.mktemp("onnx") / f"step{chunk}.onnx"
        with warnings_ignored():
            s.export_onnx(path, chunk=chunk)
        graph = onnx.load(str(path)).graph
        assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")]
        sessions[chunk] = onnxruntime.InferenceSession(str(path),
                                                       providers=["CPUExecutionProvider"])
    return model, sessions


def run_onnx(session, x, state, chunk):
    """Feed x (B, C, T) through the exported step, chunk by chunk: (outputs, final state)."""
    state = [t.numpy() for t in state]
    outs = []
    for t in range(0, x.shape[-1], chunk):
        xt = x[:, :, t] if chunk == 1 else x[:, :, t:t + chunk]
        feed = {"x": np.ascontiguousarray(xt.numpy())}
        feed.update({f"state_{i}": v for i, v in enumerate(state)})
        got = session.run(None, feed)
        outs.append(got[0] if chunk > 1 else got[0][..., None])
        state = got[1:]
    return torch.from_numpy(np.concatenate(outs, -1)), [torch.from_numpy(v) for v in state]


def in_channels(model):
    return model[0].network[0].conv1.in_channels


@pytest.mark.parametrize("chunk", [1, CHUNK])
def test_onnx_steps_give_the_full_forward(exported, chunk):
    model, sessions = exported
    rng = random.Random(f"onnx-steps-{chunk}")
    for batch in (1, 3):   # the batch size is dynamic
        x = random_input(rng, in_channels(model), 4 * CHUNK, batch, torch.float32)
        s = stream_fn(model, batch_size=batch)
        got, state = run_onnx(sessions[chunk], x, s.onnx_state(), chunk)
        assert_parity(got, full_forward(model, x), torch.float32, f"chunk {chunk}, B={batch}")
        s.step(x)   # the stream's state after the same steps is the exported one's
        for a, b in zip(state, s.onnx_state()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_onnx_continues_from_a_saved_state_and_after_reset(exported, backend):
    model, sessions = exported
    rng = random.Random(f"onnx-saved-{backend}")
    x = random_input(rng, in_channels(model), 3 * CHUNK + 3, 2, torch.float32)
    want = full_forward(model, x)
    s = stream_fn(model, backend=backend)
    s.step(x[..., :3])
    saved = s.state()
    s.step(torch.randn(2, in_channels(model), 5))   # anything in between
    fresh = stream_fn(model, backend=backend)
    fresh.load_state(saved)
    got, _ = run_onnx(sessions[CHUNK], x[..., 3:], fresh.onnx_state(), CHUNK)
    assert_parity(got, want[..., 3:], torch.float32, "from a saved state")
    s.reset()
    assert not any(t.any() for t in s.onnx_state())
    got, _ = run_onnx(sessions[1], x, s.onnx_state(), 1)
    assert_parity(got, want, torch.float32, "after reset")


def test_export_onnx_refuses_a_bad_chunk(tmp_path):
    s = stream_fn(fastres.TemporalConvNet(2, [3]).eval())
    for chunk in (0, -1, 2.0, True):
        with pytest.raises(StreamError, match="chunk must be an int >= 1"):
            s.export_onnx(tmp_path / "x.onnx", chunk=chunk)
