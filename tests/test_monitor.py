"""fastres.GradientMonitor: what it records is the norm of .grad, and detached it leaves nothing."""
import numpy as np
import pytest
import torch
from torch import nn

import fastres
from fastres.monitor import GradientMonitor


def _tcn(seed):
    torch.manual_seed(seed)
    return fastres.TemporalConvNet(3, [8, 8, 12], kernel_size=3, dropout=0.0)


def _direct_norms(model, groups):
    """{group: ||grads of its parameters||} computed from .grad, independently of the hooks."""
    return {name: torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).item()
            for name, params in groups.items()}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_recorded_norms_equal_grad_norms(seed, fused):
    model = _tcn(seed)
    if not fused:
        model = fastres.unfuse(model)
    monitor = GradientMonitor(model)
    groups = {name: list(m.parameters(recurse=False)) for name, m in model.named_modules()
              if list(m.parameters(recurse=False))}
    assert monitor.names == list(groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + seed)
    want = []
    for _ in range(3):
        x = torch.randn(4, 3, 40, generator=g)
        (model(x) * torch.randn(4, 12, 40, generator=g)).sum().backward()
        row = monitor.step()
        want.append(_direct_norms(model, groups))
        np.testing.assert_allclose(row, list(want[-1].values()), rtol=1e-12)
        opt.step()
        opt.zero_grad()
    assert monitor.steps == 3
    table = monitor.as_array()
    assert table.shape == (3, len(groups))
    for name, series in monitor.norms().items():
        np.testing.assert_allclose(series, [w[name] for w in want], rtol=1e-12)
        assert (series > 0).all()


def test_blocks_as_layers_and_gradient_accumulation():
    model = _tcn(2)
    blocks = {f"block{i}": b for i, b in enumerate(model.network)}
    by_type = GradientMonitor(model, fastres.TemporalBlock)
    by_map = GradientMonitor(model, {**blocks, "whole": model})  # overlapping groups
    assert by_type.names == ["network.0", "network.1", "network.2"]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two micro-batches accumulate into .grad before the step
        model(torch.randn(2, 3, 30, generator=g)).square().mean().backward()
    rows = by_type.step(), by_map.step()
    groups = {name: list(b.parameters()) for name, b in blocks.items()}
    direct = _direct_norms(model, {**groups, "whole": list(model.parameters())})
    np.testing.assert_allclose(rows[0], [direct[f"block{i}"] for i in range(3)], rtol=1e-12)
    np.testing.assert_allclose(rows[1], list(direct.values()), rtol=1e-12)


def test_layer_without_gradient_is_nan():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    monitor = GradientMonitor(model, nn.Linear)
    model[1](torch.randn(5, 3)).sum().backward()  # layer 0 takes no part
    row = monitor.step()
    assert np.isnan(row[0]) and row[1] > 0


def test_detach_leaves_no_hooks_and_stops_recording():
    model = _tcn(4)
    params = list(model.parameters())

    def hooks():
        return sum(len(p._post_accumulate_grad_hooks or {}) for p in params)

    assert hooks() == 0
    with GradientMonitor(model) as monitor:
        assert monitor.attached and hooks() == len(params)
        monitor.attach()  # idempotent: never two hooks on one parameter
        assert hooks() == len(params)
        model(torch.randn(2, 3, 20)).sum().backward()
        monitor.step()
    assert not monitor.attached and hooks() == 0
    model(torch.randn(2, 3, 20)).sum().backward()
    assert np.isnan(monitor.step()).all()  # nothing heard after detach
    assert monitor.steps == 2 and np.isfinite(monitor.as_array()[0]).all()
    monitor.reset()
    assert monitor.steps == 0 and monitor.as_array().shape == (0, len(monitor.names))


@pytest.mark.parametrize("kind", ["heatmap", "lines"])
def test_plot_writes_a_file(tmp_path, kind):
    model = _tcn(5)
    monitor = GradientMonitor(model, nn.Conv1d)
    with pytest.raises(ValueError, match="nothing recorded"):
        monitor.plot()
    for _ in range(4):
        model(torch.randn(2, 3, 24)).sum().backward()
        monitor.step()
        model.zero_grad()
    path = tmp_path / f"flow-{kind}.png"
    fig = monitor.plot(str(path), kind=kind, title="test", log_range=(-3, 1))
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.axes[0].get_title() == "test"
    if kind == "heatmap":
        assert fig.axes[0].images[0].get_clim() == (-3, 1)
    with pytest.raises(ValueError, match="kind"):
        monitor.plot(kind="bars")
    with pytest.raises(ValueError, match="unknown layers"):
        monitor.plot(layers=["nope"])


def test_bad_layer_specs():
    model = _tcn(6)
    with pytest.raises(TypeError, match="layers must be"):
        GradientMonitor(model, "conv")
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientMonitor(model, nn.LSTM)
