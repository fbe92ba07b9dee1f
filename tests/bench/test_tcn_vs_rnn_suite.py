"""The tcn-vs-rnn suite's streaming rows (fastres/bench/tcn_vs_rnn.py): the candidates do
what their names say, a quick streaming task times all of them, and the plot draws."""
import pytest
import torch

from fastres.bench import runner, tcn_vs_rnn
from fastres.bench.tcn_vs_rnn import (STREAM_CONFIGS, STREAM_IMPLS, CellStack, build_models,
                                      stream_ratios)
from fastres.conventions import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def quick_settings():
    return runner.Settings(size="quick", device=CPU, dtypes=[torch.float32],
                           only=["tcn-vs-rnn"], compile_mode=None)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cell_stacks_step_as_the_rnn(kind):
    models, _ = build_models(STREAM_CONFIGS["quick"], CPU, torch.float32)
    seq = models[kind].eval()
    cells = CellStack(seq.backbone, seq.head)
    x = torch.randn(3, 5, STREAM_CONFIGS["quick"].features)
    state_seq = state_cells = None
    with torch.no_grad():
        for t in range(5):
            y_seq, state_seq = seq.step(x[:, t:t + 1], state_seq)
            y_cells, state_cells = cells.step(x[:, t], state_cells)
            assert rel_err(y_cells, y_seq[:, 0]) < 1e-6


def test_stream_candidates_compute_one_step():
    """tcn-stream's output for a step equals the full model's last output on the history."""
    config = STREAM_CONFIGS["quick"]
    models, _ = build_models(config, CPU, torch.float32)
    step = tcn_vs_rnn._stream_call(models, "tcn-stream", config, 2, CPU, torch.float32)
    outs = torch.stack([step() for _ in range(4)], -1)     # the same x_t four times
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, config.features, generator=g)
    with torch.no_grad():
        want = models["tcn-plain"].eval()(x_t[..., None].expand(-1, -1, 4).contiguous())
    assert rel_err(outs, want) < 1e-5


def test_quick_stream_task_times_every_candidate():
    settings = quick_settings()
    tasks = [t for t in tcn_vs_rnn.tasks(settings) if t.case["mode"] == "stream"]
    assert [t.case["B"] for t in tasks] == [1, 4]
    rows = runner.run_task(tasks[0], settings)
    assert [r["impl"] for r in rows] == STREAM_IMPLS
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows), rows
    summary = tcn_vs_rnn.summarize(rows, settings)
    latency = summary["stream_latency_s"]
    assert set(latency) == {f"float32/B1/{impl}" for impl in STREAM_IMPLS}
    ratios = stream_ratios(latency, "float32/B1/")
    assert set(ratios) == set(STREAM_IMPLS) - {"tcn-stream"}
    assert ratios["lstm"] == pytest.approx(latency["float32/B1/lstm"] /
                                           latency["float32/B1/tcn-stream"])
    lines = tcn_vs_rnn.summary_lines(summary)
    assert any(line.startswith("per step, float32/B1: tcn-stream") for line in lines)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(tcn_vs_rnn.PLOT_PANELS, 1)
    tcn_vs_rnn.plot(list(axes), rows, summary)   # (no L-sweep rows: those panels stay empty)
    assert len(axes[2].patches) == len(STREAM_IMPLS)    # one bar per candidate
    plt.close(fig)


def test_stream_variants_compute_the_same_steps():
    """tcn-stream-strided and tcn-onnx step the same model as tcn-stream: the strided
    candidate on x[:, :, t] of its sequence, the ONNX one on the same x_t as tcn-stream."""
    config = STREAM_CONFIGS["quick"]
    models, _ = build_models(config, CPU, torch.float32)
    contiguous = tcn_vs_rnn._stream_call(models, "tcn-stream", config, 2, CPU, torch.float32)
    onnx_step = tcn_vs_rnn._stream_call(models, "tcn-onnx", config, 2, CPU, torch.float32)
    want = torch.stack([contiguous() for _ in range(3)], -1)
    got = torch.stack([torch.from_numpy(onnx_step()) for _ in range(3)], -1)
    assert rel_err(got, want) < 1e-5
    strided = tcn_vs_rnn._stream_call(models, "tcn-stream-strided", config, 2, CPU,
                                      torch.float32)
    g = torch.Generator().manual_seed(2)
    torch.randn(2, config.features, generator=g)   # (x_t, drawn first)
    sequence = torch.randn(2, config.features, 64, generator=g)
    outs = torch.stack([strided() for _ in range(5)], -1)
    model = models["tcn-plain"].eval()
    with torch.no_grad():
        assert rel_err(outs, model(sequence[:, :, :5])) < 1e-5


def test_matched_lstm_cell_and_pytorch_tcn_step():
    config = STREAM_CONFIGS["default"]
    models, info = build_models(config, CPU, torch.float32)
    tcn_params = info["params"]["tcn-fastres"]
    hidden = tcn_vs_rnn.matched_hidden("lstm", tcn_params, config.features, 1)
    assert abs(tcn_vs_rnn._rnn_params("lstm", config.features, hidden, 1) - tcn_params) \
        < 0.02 * tcn_params
    cell = tcn_vs_rnn._stream_call(models, "lstmcell-matched", config, 1, CPU, torch.float32)
    assert cell().shape == (1, config.features)
    pytorch_tcn = tcn_vs_rnn._stream_call(models, "pytorch-tcn", config, 1, CPU, torch.float32)
    assert pytorch_tcn().shape == (1, config.features)
