"""nn.SyncBatchNorm in fused blocks, in one process: the fallbacks and what convert does.

The multi-process behaviour is in test_distributed.py. Here: with nothing to synchronize
(torch.distributed not initialized, or eval mode) a synchronized stage is the ordinary
fused stage, exactly as nn.SyncBatchNorm falls back to nn.BatchNorm; and fastres.convert
swaps blocks holding nn.SyncBatchNorm, keeps those modules and says so.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastres
from fastres.conventions import rel_err
from fastres.nn import ConvBNReLUSequential
from fastres.nn.sync_batchnorm import sync_group
from model_parity import TOL
from upstream import SeedTCN, TorchvisionResNet1d, randomize_bn


def _synced(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_plain_batch_norm(momentum):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    model = fastres.TemporalConvNet(3, [6, 6], kernel_size=3, dropout=0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = momentum
    synced = _synced(model)
    assert all(sync_group(m) == (None, 1) for m in synced.modules()
               if isinstance(m, nn.SyncBatchNorm))
    g = torch.Generator().manual_seed(1)
    # One backend for both (the default measures each model on its own): bitwise equal.
    backend = "cpp" if "cpp" in fastres.available_backends() else "composite"
    with fastres.use_backend(backend):
        for _ in range(2):
            x = torch.randn(3, 3, 25, generator=g)
            out, want = synced(x), model(x)
            assert torch.equal(out, want)  # the same fused op on the same numbers
            out.sum().backward()
            want.sum().backward()
        for (n, p), q in zip(synced.named_parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad), n
        for (n, b), c in zip(synced.named_buffers(), model.buffers()):
            assert torch.equal(b, c), n
        synced.eval(), model.eval()
        x = torch.randn(3, 3, 25, generator=g)
        assert torch.equal(synced(x), model(x))


def test_convert_keeps_sync_batch_norm_and_reports_it():
    torch.manual_seed(2)
    seed = randomize_bn(SeedTCN(3, [6, 6], kernel_size=3))
    fused, report = fastres.convert(_synced(seed), return_report=True)
    assert [s.note for s in report.swapped] == ["synchronized batch norm"] * 2
    assert "synchronized batch norm" in report.summary() and not report.skipped
    blocks = list(fused.network)
    assert all(isinstance(b, fastres.TemporalBlock) for b in blocks)
    assert all(isinstance(b.bn1, nn.SyncBatchNorm) and isinstance(b.bn2, nn.SyncBatchNorm)
               for b in blocks)
    x = torch.randn(2, 3, 30)
    with torch.no_grad():
        assert rel_err(fused.eval()(x), seed.eval()(x)) < TOL


def test_convert_torchvision_resnet_with_sync_batch_norm():
    torch.manual_seed(3)
    resnet = randomize_bn(TorchvisionResNet1d(2, 3, widths=(8, 8, 16, 16)))
    fused, report = fastres.convert(_synced(resnet), return_report=True)
    assert len(report.swapped) == 8 and not report.skipped, report.summary()
    assert all(s.note == "synchronized batch norm" for s in report.swapped)
    # Projection shortcuts stay the user's own modules, with their SyncBatchNorm.
    assert isinstance(fused.layer2[0].downsample[1], nn.SyncBatchNorm)
    x = torch.randn(2, 2, 64)
    with torch.no_grad():
        assert rel_err(fused.eval()(x), resnet.eval()(x)) < TOL


def test_convert_sequential_run_with_sync_batch_norm():
    torch.manual_seed(4)
    seq = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Conv1d(4, 1, 1))
    fused, report = fastres.convert(_synced(seq), return_report=True)
    assert isinstance(fused, ConvBNReLUSequential) and isinstance(fused[1], nn.SyncBatchNorm)
    assert report.swapped[0].original == "Conv1d->SyncBatchNorm->ReLU"
    assert report.swapped[0].note == "synchronized batch norm"
    x = torch.randn(3, 2, 16)
    assert torch.allclose(fused(x), seq(x), atol=1e-6)  # training mode, no process group
