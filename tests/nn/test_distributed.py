"""Multi-process training: fastres models under DistributedDataParallel, and synchronized BN.

Two CPU processes (gloo, torch.multiprocessing spawn, a free local port) each train on
their half of a batch. With nn.SyncBatchNorm in fused blocks, every number must equal
single-process training on the whole batch (judged against float64, fp32 bound 1e-5):
outputs, input gradients, parameter gradients after DDP's averaging, running statistics.
Without SyncBN, DDP must train a fastres model exactly as each process would alone, with
the gradients averaged. All checks run in one pair of processes (starting them costs
seconds); assertions run inside the workers, and spawn re-raises a failure, which names
its check.
"""
import copy
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastres
from fastres.conventions import rel_err
from model_parity import TOL, grad_scale
from upstream import SeedTCN

WORLD = 2
BATCH = 4           # per process
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args):
    mp.spawn(worker, args=(_free_port(),) + args, nprocs=WORLD, join=True)


def _init(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)


def _close(what, got, want, scale=None):
    err = rel_err(got, want, scale)
    assert err < TOL, f"{what}: rel err {err:.2e}"


# --------------------------------------------------------------------------- models


def _tcn():
    return fastres.TemporalConvNet(3, [8, 6], kernel_size=3, dropout=0.0)


def _basic_blocks():
    return nn.Sequential(nn.Conv1d(3, 6, 1), fastres.BasicBlock(6, 6),
                         fastres.BasicBlock(6, 6, dilation=2, causal=True))


def _seed_tcn():
    return SeedTCN(3, [8, 6], kernel_size=3)


def _synchronized_ddp(name, model):
    """DDP over the model with every BN an nn.SyncBatchNorm inside fused blocks.

    On CPU, DDP refuses nn.SyncBatchNorm at construction (torch's own SyncBN kernel needs
    CUDA), so the model is wrapped first and converted inside the wrapper:
    convert_sync_batchnorm and fastres.convert replace submodules in place and keep the
    parameter objects DDP registered.
    """
    ddp = DDP(model)
    nn.SyncBatchNorm.convert_sync_batchnorm(ddp.module)
    if name == "seed-converted":
        _, report = fastres.convert(ddp.module, inplace=True, return_report=True)
        assert len(report.swapped) == 2 and not report.skipped, report.summary()
        assert all("synchronized batch norm" in s.note for s in report.swapped)
        assert "synchronized batch norm" in report.summary()
    assert set(map(id, ddp.parameters())) == set(map(id, model.parameters()))
    return ddp


# --------------------------------------------------------------------------- the checks


def _worker(rank, port):
    """Every check, in one pair of processes (starting them costs seconds); a failure
    names its check."""
    _init(rank, port)
    try:
        for name, build in (("tcn", _tcn), ("basic-blocks", _basic_blocks),
                            ("seed-converted", _seed_tcn)):
            _check_sync_training(rank, name, build)
        _check_sync_stage_relu_before_add(rank)
        _check_process_group_of_one(rank)
        _check_ddp_without_sync_batch_norm(rank)
    finally:
        dist.destroy_process_group()


def _check_sync_training(rank, name, build):
    torch.manual_seed(0)  # the same initial weights in every process
    plain = build()
    reference = fastres.unfuse(plain).double() if name != "seed-converted" \
        else copy.deepcopy(plain).double()
    model = _synchronized_ddp(name, copy.deepcopy(plain))
    n_bn = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert n_bn == sum(isinstance(m, nn.BatchNorm1d) for m in reference.modules()) > 0
    # DDP's gradients are the whole-batch loss's divided by WORLD: scale the rate back.
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * WORLD)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10)  # the same global batches in every process
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    for step in range(STEPS):
        x = torch.randn(WORLD * BATCH, 3, 40, generator=g, dtype=torch.float64) * 2 + 0.5
        weights = torch.randn(WORLD * BATCH, 6, 40, generator=g, dtype=torch.float64)
        x_ref = x.clone().requires_grad_()
        out_ref = reference(x_ref)
        (out_ref * weights).sum().backward()
        x_mine = x[mine].float().requires_grad_()
        out = model(x_mine)
        (out * weights[mine].float()).sum().backward()
        what = f"{name} step {step}"
        _close(f"{what} output", out, out_ref[mine])
        _close(f"{what} input gradient", x_mine.grad, x_ref.grad[mine])
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        for n, p in model.module.named_parameters():
            # DDP averages over processes; the whole-batch loss is their sum.
            _close(f"{what} gradient of {n}", p.grad * WORLD, ref_grads[n],
                   grad_scale(n, ref_grads))
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    ref_buffers = dict(reference.named_buffers())
    for n, buf in model.module.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert buf.item() == ref_buffers[n].item() == STEPS, n
        else:
            _close(f"{name} buffer {n}", buf, ref_buffers[n])
    # Eval: running statistics, nothing to synchronize. Judged on the trained state (the
    # float64 reference takes it), so that training's rounding is not counted twice.
    reference.load_state_dict(model.module.state_dict())
    model.eval()
    reference.eval()
    x = torch.randn(WORLD * BATCH, 3, 40, generator=g, dtype=torch.float64)
    with torch.no_grad():
        _close(f"{name} eval output", model(x[mine].float()), reference(x)[mine])


def _check_sync_stage_relu_before_add(rank):
    """One stage with relu_before_add and a residual, against float64 on the whole batch."""
    from fastres.nn._stage import conv_bn_relu_stage
    torch.manual_seed(1)
    conv, bn = nn.Conv1d(4, 4, 3, dilation=2), nn.BatchNorm1d(4, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    sync_bn = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(WORLD * BATCH, 4, 30, generator=g, dtype=torch.float64)
    res = torch.randn(WORLD * BATCH, 4, 30, generator=g, dtype=torch.float64)
    weights = torch.randn(WORLD * BATCH, 4, 30, generator=g, dtype=torch.float64)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x_ref, res_ref = x.clone().requires_grad_(), res.clone().requires_grad_()
    y = F.conv1d(F.pad(x_ref, [4, 0]), ref_conv.weight, ref_conv.bias, dilation=2)
    out_ref = F.relu(F.relu(ref_bn(y)) + res_ref)
    (out_ref * weights).sum().backward()
    x_mine, res_mine = x[mine].float().requires_grad_(), res[mine].float().requires_grad_()
    out = conv_bn_relu_stage(x_mine, conv, sync_bn, "causal", residual=res_mine,
                             relu_before_add=True)
    (out * weights[mine].float()).sum().backward()
    _close("stage output", out, out_ref[mine])
    _close("stage input gradient", x_mine.grad, x_ref.grad[mine])
    _close("stage residual gradient", res_mine.grad, res_ref.grad[mine])
    for n in ("weight", "bias"):
        got = getattr(sync_bn, n).grad.clone()
        dist.all_reduce(got)  # each process holds its own share of gamma's and beta's
        _close(f"stage BN {n} gradient", got, getattr(ref_bn, n).grad)
    _close("stage running mean", sync_bn.running_mean, ref_bn.running_mean)
    _close("stage running var", sync_bn.running_var, ref_bn.running_var)


def _check_process_group_of_one(rank):
    """A SyncBatchNorm whose process_group holds only this process uses local statistics."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every process creates every group
    torch.manual_seed(2)
    model = _tcn()
    local = copy.deepcopy(model)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=groups[rank])
    x = torch.randn(BATCH, 3, 20) + rank  # different data per process
    _close("process group of one", synced(x), local(x))
    _close("process group of one, running mean", synced.network[0].bn1.running_mean,
           local.network[0].bn1.running_mean)


# --------------------------------------------------------------------------- DDP, plain BN


def _check_ddp_without_sync_batch_norm(rank):
    torch.manual_seed(0)
    model = _tcn()
    # DDP by hand: this process's own forward and backward, buffers broadcast from
    # process 0 before each forward, gradients averaged over the processes.
    by_hand = copy.deepcopy(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    hand_opt = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each process its own data
    for step in range(STEPS):
        x = torch.randn(BATCH, 3, 32, generator=g)
        for buf in by_hand.buffers():
            dist.broadcast(buf, 0)
        out, out_by_hand = ddp(x), by_hand(x)
        _close(f"DDP without SyncBN, step {step} output", out, out_by_hand)
        out.square().mean().backward()
        out_by_hand.square().mean().backward()
        grads = {n: p.grad for n, p in by_hand.named_parameters()}
        for p in grads.values():
            dist.all_reduce(p)
            p /= WORLD
        for n, p in ddp.module.named_parameters():
            _close(f"DDP without SyncBN, step {step} gradient of {n}", p.grad, grads[n],
                   grad_scale(n, grads))
        for o in (opt, hand_opt):
            o.step()
            o.zero_grad()
        # Per-process statistics without SyncBN: this process's batch alone.
        _close(f"DDP without SyncBN, step {step} running var", model.network[1].bn2.running_var,
               by_hand.network[1].bn2.running_var)
    params = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    copies = [torch.empty_like(params) for _ in range(WORLD)]
    dist.all_gather(copies, params)
    assert torch.equal(copies[0], copies[1]), "DDP replicas diverged"


def test_multi_process_training():
    """Synchronized BN against single-process training, and DDP without SyncBN."""
    _spawn(_worker)
