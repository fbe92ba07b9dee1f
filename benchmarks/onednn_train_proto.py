"""Prototype (issue 22, part 2): a TemporalBlock train step in channels-last through oneDNN.

    python benchmarks/onednn_train_proto.py [--threads 1] [--rounds 11]

Not a backend: a measurement of what the channels-last layout buys a training step before
anything is built on it. The prototype runs the block's forward on (B, C, 1, L) tensors with
channels_last strides (memory (B, L, C)) through PyTorch's own ops: F.conv2d with a (C_out,
C_in, 1, K) view of the conv weight (oneDNN's NHWC forward, and under autograd its NHWC data
and weight gradients), F.batch_norm with batch statistics (running statistics updated),
ReLU, the residual add; autograd gives dgrad and wgrad. Candidates, one SGD step each
(forward, MSE loss, backward, step), interleaved:

    plain           fastres.unfuse(block), NCL data
    fastres         the fused block at its default dispatch, NCL data
    nlc-proto       the prototype fed (B, L, C) data (no conversion)
    nlc-proto+conv  the prototype fed NCL data, converted at entry and exit

Its outputs and gradients are checked against the plain block's before timing.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import fastres
from fastres.bench import timing
from fastres.conventions import cpu_name, rel_err


def nlc_block_forward(block, x4):
    """TemporalBlock(norm="batch") forward on a (B, C, 1, L) channels_last tensor."""
    def stage(h, conv, bn, residual=None):
        k, d = conv.kernel_size[0], conv.dilation[0]
        h = F.pad(h, ((k - 1) * d, 0))  # keeps channels_last
        z = F.conv2d(h, conv.weight.unsqueeze(2), conv.bias, dilation=(1, d))
        z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         bn.training, bn.momentum, bn.eps)
        if residual is not None:
            z = z + residual
        return F.relu(z)
    res = x4 if block.downsample is None else F.conv2d(
        x4, block.downsample.weight.unsqueeze(2), block.downsample.bias)
    return stage(stage(x4, block.conv1, block.bn1), block.conv2, block.bn2, res)


def _step(model, forward, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = timing.TimingConfig(min_rounds=args.rounds, max_rounds=args.rounds,
                                 max_time_s=1e9, min_block_s=0.02, warmup_s=0.3)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, float32, "
          f"train step, medians of {args.rounds} interleaved rounds")
    for c, d, shape in ((64, 4, (16, 64, 1024)), (128, 8, (8, 128, 2048)),
                        (32, 2, (8, 32, 1024))):
        torch.manual_seed(0)
        block = fastres.TemporalBlock(c, c, 3, dilation=d, dropout=0.0).train()
        plain = fastres.unfuse(copy.deepcopy(block)).train()
        proto = fastres.unfuse(copy.deepcopy(block)).train()
        x = torch.randn(shape)
        target = torch.randn(shape)
        b, _, n = shape
        x_nlc, target_nlc = x.transpose(1, 2).contiguous(), target.transpose(1, 2).contiguous()

        def as4(t_nlc):  # (B, L, C) -> (B, C, 1, L) channels_last view
            return t_nlc.transpose(1, 2).unsqueeze(2)

        # parity of one step's output and gradients against plain (fresh copies)
        check_p, check_n = copy.deepcopy(plain), copy.deepcopy(proto)
        xa = x.clone().requires_grad_()
        xb = x_nlc.clone().requires_grad_()
        out_p = check_p(xa)
        out_n = nlc_block_forward(check_n, as4(xb)).squeeze(2)
        out_p.backward(target)
        out_n.backward(target)
        errors = [rel_err(out_n, out_p), rel_err(xb.grad.transpose(1, 2), xa.grad)]
        # (a conv bias before training BN has zero gradient in exact arithmetic: its rounding
        # noise is judged against its conv weight's gradient, as tests/model_parity.py does)
        grads_p = dict(check_p.named_parameters())
        for (name, p), q in zip(check_n.named_parameters(), check_p.parameters()):
            scale = grads_p[name.replace("bias", "weight")].grad.norm().item() \
                if name.startswith("conv") and name.endswith("bias") else None
            errors.append(rel_err(p.grad, q.grad, scale))
        print(f"\nTemporalBlock({c},{c},k3,d{d}) B{b} L{n}: max rel err vs plain "
              f"{max(errors):.1e} (output, input and parameter gradients)")

        candidates = {
            "plain": _step(plain, plain, x, target),
            "fastres": _step(block, block, x, target),
            "nlc-proto": _step(proto, lambda t: nlc_block_forward(proto, as4(t)).squeeze(2),
                               x_nlc, target_nlc.transpose(1, 2)),
            "nlc-proto+conv": _step(proto, lambda t: nlc_block_forward(
                proto, as4(t.transpose(1, 2).contiguous())).squeeze(2).contiguous(),
                x, target),
        }
        stats = timing.measure(candidates, torch.device("cpu"), config)
        base = stats["plain"].median_s
        print("  " + "; ".join(
            f"{name} {s.median_s * 1e3:.1f} ms ({base / s.median_s:.2f}x, spread "
            f"{100 * s.spread:.0f}%)" if not isinstance(s, Exception) else f"{name} error {s}"
            for name, s in stats.items()))


if __name__ == "__main__":
    main()
