"""fastres.convert / fastres.unfuse on models built from plain PyTorch blocks.

A converted model must give the same outputs, gradients and running statistics as the
model it came from (judged against float64 as in test_modules), keep its state_dict keys,
and leave alone what it cannot verify. unfuse must give back plain, scriptable modules.
"""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres.nn import (ConvBNReLUSequential, PlainBasicBlock, PlainTemporalBlock,
                        PlainWeightNormTemporalBlock)
from fastres.conventions import rel_err
from model_parity import TOL, assert_train_and_eval_match
from upstream import (LocuslabTCN, SeedTCN, TorchvisionBasicBlock1d, TorchvisionResNet1d,
                      projection, randomize_bn, warnings_ignored)


class CausalPadSeedBlock(nn.Module):
    """The seed block written with an explicit left pad instead of padding + chomp."""

    def __init__(self, n_in, n_out, k, d):
        super().__init__()
        self.pad = (k - 1) * d
        self.conv1 = nn.Conv1d(n_in, n_out, k, dilation=d)
        self.bn1 = nn.BatchNorm1d(n_out)
        self.conv2 = nn.Conv1d(n_out, n_out, k, dilation=d)
        self.bn2 = nn.BatchNorm1d(n_out)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(F.pad(x, (self.pad, 0)))))
        out = self.bn2(self.conv2(F.pad(h, (self.pad, 0))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ShortcutResBlock1D(nn.Module):
    """A ResBlock1D with the projection in `shortcut` (nn.Sequential() when identity)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut = projection(cin, cout, stride) if (stride != 1 or cin != cout) \
            else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class LeakyBlock(nn.Module):
    """Looks like a seed block, computes something else: must stay untouched."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv1d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(c)
        self.downsample = None

    def forward(self, x):
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        return F.relu(self.bn2(self.conv2(h)) + x)


class TwoDropoutBlock(LeakyBlock):
    """A real seed-like computation, but with two dropouts whose placement the probe
    (eval mode) cannot see: must stay untouched."""

    def __init__(self, c):
        super().__init__(c)
        self.drop_a, self.drop_b = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x):
        h = self.drop_a(F.relu(self.bn1(self.conv1(x))))
        return self.drop_b(F.relu(self.bn2(self.conv2(h)) + x))


def seed_model():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(SeedTCN(3, [6, 6, 8], kernel_size=3),
                                      nn.Conv1d(8, 2, 1)))


def test_seed_style_tcn_converts_and_keeps_numbers():
    model = seed_model()
    new, report = fastres.convert(model, return_report=True)
    blocks = [new[0].network[i] for i in range(3)]
    assert all(type(b) is fastres.TemporalBlock for b in blocks)
    assert [s.name for s in report.swapped] == ["0.network.0", "0.network.1", "0.network.2"]
    assert all(s.rel_err < 1e-5 for s in report.swapped)
    assert new.state_dict().keys() == model.state_dict().keys()
    assert type(model[0].network[0]).__name__ == "SeedTemporalBlock"  # not inplace
    assert_train_and_eval_match(new, model, (2, 3, 20))


def test_causal_pad_seed_blocks_and_the_root_block_convert():
    torch.manual_seed(0)
    block = randomize_bn(CausalPadSeedBlock(4, 6, 2, 3))
    new = fastres.convert(block)
    assert type(new) is fastres.TemporalBlock
    assert_train_and_eval_match(new, block, (2, 4, 15))


@pytest.mark.parametrize("old_weight_norm", [False, True], ids=["parametrize", "weight_g_v"])
def test_locuslab_tcn_converts_and_keeps_numbers(old_weight_norm):
    from upstream import LocuslabTemporalBlock

    def block(*args, **kw):
        return LocuslabTemporalBlock(*args, old_weight_norm=old_weight_norm, **kw)

    torch.manual_seed(0)
    with warnings_ignored():
        model = LocuslabTCN(3, [5, 5, 7], kernel_size=3, dropout=0.2, block=block)
    new, report = fastres.convert(model, return_report=True)
    assert len(report.swapped) == 3 and not report.skipped
    assert all(type(b) is fastres.TemporalBlock and b.norm == "weight" for b in new.network)
    if not old_weight_norm:
        assert new.state_dict().keys() == model.state_dict().keys()
        assert_train_and_eval_match(new, model, (2, 3, 24))
        return
    # Old weight_norm: the converted model holds parametrizations; same values, same
    # outputs (dropout included, same seed) and the same gradients for g and v.
    rename = {"weight_g": "parametrizations.weight.original0",
              "weight_v": "parametrizations.weight.original1"}
    x = torch.randn(2, 3, 24)
    torch.manual_seed(7)
    out_old = model(x)
    torch.manual_seed(7)
    out_new = new(x)
    assert rel_err(out_new, out_old) < TOL
    grad = torch.randn_like(out_old)
    old_params = dict(model.named_parameters())
    new_params = dict(new.named_parameters())
    grads_old = torch.autograd.grad(out_old, list(old_params.values()), grad)
    grads_new = dict(zip(new_params, torch.autograd.grad(out_new, list(new_params.values()),
                                                         grad)))
    for name, g_old in zip(old_params, grads_old):
        key = name
        for old, new_name in rename.items():
            key = key.replace(old, new_name)
        assert rel_err(grads_new[key], g_old) < TOL, name
    model.eval()
    new.eval()
    assert rel_err(new(x), model(x)) < TOL


def test_torchvision_style_resnet_converts_and_keeps_numbers():
    torch.manual_seed(0)
    model = randomize_bn(TorchvisionResNet1d(2, 5, widths=(8, 8, 16, 16)))
    new, report = fastres.convert(model, return_report=True)
    blocks = [m for m in new.modules() if isinstance(m, nn.Module) and hasattr(m, "bn2")]
    assert len(blocks) == 8 and all(type(b) is fastres.BasicBlock for b in blocks)
    assert len(report.swapped) == 8
    assert new.state_dict().keys() == model.state_dict().keys()
    assert_train_and_eval_match(new, model, (4, 2, 64), steps=2)


def test_shortcut_resblocks_convert_with_the_rename_reported():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(ShortcutResBlock1D(3, 3), ShortcutResBlock1D(3, 6, 2)))
    new, report = fastres.convert(model, return_report=True)
    assert [type(b) for b in new] == [fastres.BasicBlock, fastres.BasicBlock]
    assert "shortcut.* -> downsample.*" in report.swapped[1].note
    x = torch.randn(4, 3, 21)
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    assert rel_err(new(x), ref(x)) < TOL  # train mode: batch statistics
    assert rel_err(new[1].bn1.running_var, ref[1].bn1.running_var) < TOL
    new.eval()
    ref.eval()
    assert rel_err(new(x), ref(x)) < TOL


def test_sequential_conv_bn_relu_runs_are_fused_in_place():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),              # same
        nn.ConstantPad1d((4, 0), 0.0), nn.Conv1d(8, 8, 3, dilation=2, bias=False),
        nn.BatchNorm1d(8), nn.ReLU(inplace=True),                                # causal
        nn.Conv1d(8, 8, 4, stride=2, padding=1), nn.BatchNorm1d(8), nn.ReLU(),   # strided same
        nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),                        # "valid": no
        nn.Conv1d(8, 4, 1)))
    new, report = fastres.convert(model, return_report=True)
    assert type(new) is ConvBNReLUSequential
    assert new.fused_runs == {0: (3, "same"), 3: (4, "causal"), 7: (3, "same")}
    assert new.state_dict().keys() == model.state_dict().keys()
    assert len(report.swapped) == 3
    assert_train_and_eval_match(new, model, (2, 3, 30))


def test_bn_without_affine_or_running_stats_and_biasless_convs_carry_over():
    torch.manual_seed(0)
    model = SeedTCN(3, [6, 6], kernel_size=2)
    for block in model.network:
        block.bn1 = nn.BatchNorm1d(6, affine=False, track_running_stats=False)
        block.bn2 = nn.BatchNorm1d(6, momentum=None)
        d = block.conv2.dilation[0]
        block.conv2 = nn.Conv1d(6, 6, 2, padding=d, dilation=d, bias=False)
    randomize_bn(model)
    new, report = fastres.convert(model, return_report=True)
    assert len(report.swapped) == 2
    assert new.network[0].bn1.running_mean is None and new.network[0].conv2.bias is None
    assert_train_and_eval_match(new, model, (3, 3, 12))


def test_unverifiable_blocks_are_left_untouched_and_reported():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(LeakyBlock(4), TwoDropoutBlock(4)))
    new, report = fastres.convert(model, return_report=True)
    assert [type(m) for m in new] == [LeakyBlock, TwoDropoutBlock]
    assert not report.swapped
    reasons = dict(report.skipped)
    assert "probe outputs differ" in reasons["0"]
    assert "more than one dropout" in reasons["1"]


def test_convert_reports_logs_and_keeps_rng_and_modes(caplog):
    model = seed_model().train()
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="fastres"):
        new = fastres.convert(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert "fastres.convert: swapped 3 module(s)" in caplog.text
    assert all(m.training for m in new.modules())
    assert fastres.convert(new, return_report=True)[1].swapped == []  # nothing left to fuse
    same = fastres.convert(model, inplace=True)
    assert same is model and type(model[0].network[0]) is fastres.TemporalBlock


def _freeze_bn(model):
    """The usual fine-tuning setup: the model trains, its batch norms keep their statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    return model


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("build", [
    seed_model,
    lambda: randomize_bn(nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8),
                                       nn.ReLU(), nn.Conv1d(8, 2, 1))),
    lambda: randomize_bn(TorchvisionResNet1d(3, 4, widths=(8, 8, 16, 16))),
], ids=["seed-tcn", "sequential", "resnet"])
def test_convert_keeps_frozen_batch_norm_frozen(build, inplace):
    torch.manual_seed(0)
    model = _freeze_bn(build())
    reference = copy.deepcopy(model)
    modes = {name: m.training for name, m in model.named_modules()}
    new, report = fastres.convert(model, inplace=inplace, return_report=True)
    assert report.swapped
    kept = {name: m.training for name, m in new.named_modules() if name in modes}
    assert kept == {name: modes[name] for name in kept} and any(not m for m in kept.values())
    frozen = {name: buf.clone() for name, buf in new.named_buffers()}
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        got, want = new(x), reference(x)
    assert rel_err(got, want) < 1e-5
    for name, buf in new.named_buffers():  # frozen statistics are not updated
        assert torch.equal(buf, frozen[name]), name


def test_convert_keeps_a_mixed_mode_dropout_and_the_block_mode():
    torch.manual_seed(0)
    model = nn.Sequential(SeedTCN(3, [6, 6], kernel_size=2, dropout=0.3)).train()
    model[0].network[0].dropout.eval()   # one dropout off, the other on
    new = fastres.convert(model)
    block0, block1 = new[0].network
    assert type(block0) is fastres.TemporalBlock and block0.training
    assert not block0.dropout.training and block1.dropout.training
    assert block0.bn1.training and block0.conv1.training


def test_unfuse_round_trip_is_plain_scriptable_and_equal():
    model = seed_model()
    fused = fastres.convert(model)
    plain = fastres.unfuse(fused)
    assert all(type(b) is PlainTemporalBlock for b in plain[0].network)
    assert type(fused[0].network[0]) is fastres.TemporalBlock  # not inplace
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert_train_and_eval_match(plain, model, (2, 3, 20))
    x = torch.randn(2, 3, 20)
    with warnings_ignored():
        scripted = torch.jit.script(plain.eval())
    model.eval()
    assert rel_err(scripted(x), model(x)) < TOL
    again, report = fastres.convert(plain, return_report=True)
    assert all(type(b) is fastres.TemporalBlock for b in again[0].network)


def test_unfuse_fastres_models_and_convert_back():
    torch.manual_seed(0)
    for fused, shape in ((fastres.ResNet1d(in_channels=2, widths=(8, 8, 16, 16)), (2, 2, 64)),
                         (fastres.TemporalConvNet(2, [4, 4], norm="weight"), (2, 2, 16)),
                         (fastres.BasicBlock(4, 8, 2, "auto", causal=True), (2, 4, 16))):
        randomize_bn(fused).eval()
        plain = fastres.unfuse(fused)
        assert not any(isinstance(m, (fastres.TemporalBlock, fastres.BasicBlock,
                                      fastres.ResNet1d)) for m in plain.modules())
        assert any(isinstance(m, (PlainTemporalBlock, PlainWeightNormTemporalBlock,
                                  PlainBasicBlock)) for m in plain.modules())
        x = torch.randn(*shape)
        with torch.no_grad():
            want = fused(x)
            assert rel_err(plain(x), want) < TOL
            with warnings_ignored():
                assert rel_err(torch.jit.trace(plain, x)(x), want) < TOL
        back = fastres.convert(plain)
        assert type(back) is type(fused)
        with torch.no_grad():
            assert rel_err(back(x), want) < TOL


def test_an_unfused_tcn_is_not_measured(monkeypatch):
    """fastres.unfuse keeps the TemporalConvNet container around plain blocks: it runs them
    as they are, with no module-level measurement (which would time the same plain network
    under every policy name on each new signature) and no choice to report."""
    measured, plains = [], []
    measure = fastres.dispatch.module._measure
    monkeypatch.setattr(fastres.dispatch.module, "_measure",
                        lambda module, *args: measured.append(module) or measure(module, *args))
    torch.manual_seed(0)
    for kw in ({}, {"skip_connections": True}, {"activation": "gelu"}):
        fused = fastres.TemporalConvNet(4, [6, 6], dropout=0.0, **kw)
        plain = fastres.unfuse(fused)
        plains.append(plain)
        for mode in (True, False):
            fused.train(mode), plain.train(mode)
            x = torch.randn(2, 4, 32)
            assert not list(fastres.explain(plain, x))
            with torch.no_grad():  # (both update their running statistics alike)
                assert rel_err(plain(x), fused(x)) < TOL
    # The fused networks were measured (the spy works); no unfused one was.
    assert measured and not any(m is p for m in measured for p in plains)


def test_unfused_resnet_scripts():
    torch.manual_seed(0)
    fused = randomize_bn(fastres.ResNet1d(in_channels=2, widths=(8, 8, 16, 16))).eval()
    with warnings_ignored():
        scripted = torch.jit.script(fastres.unfuse(fused))
    x = torch.randn(2, 2, 64)
    with torch.no_grad():
        assert rel_err(scripted(x), fused(x)) < TOL


def test_torchvision_blocks_stay_basic_blocks_after_round_trip():
    torch.manual_seed(0)
    block = randomize_bn(TorchvisionBasicBlock1d(4, 8, 2, projection(4, 8, 2), kernel_size=5))
    fused = fastres.convert(block)
    assert type(fused) is fastres.BasicBlock and not fused.causal
    assert type(fastres.unfuse(fused)) is PlainBasicBlock
    assert_train_and_eval_match(fused, block, (2, 4, 19))
