"""Where the CPU eval time of a block goes: eager NCL conv vs oneDNN NLC conv vs fastres's C++.

    python benchmarks/onednn_conv.py [--threads 1] [--rounds 25]

For each case (issue 22's rows: TemporalBlock(64,64,k3,d4) B16 L1024,
TemporalBlock(128,128,k3,d8) B8 L2048, and ResNet1d([2,2,2,2], 12 in) B4 L1024's first and
last stages as BasicBlocks at the shapes they see), eval mode, float32, times interleaved
(fastres.bench.timing.measure, medians over the rounds):

    stage  conv2 -> BN -> (+ residual) -> ReLU, one stage:
        eager-ncl       F.conv1d on NCL, F.batch_norm, add, relu (what the plain block runs)
        conv-ncl        F.conv1d alone on NCL (oneDNN reorders in and out on every call)
        onednn-nlc      torch.ops.mkldnn._convolution_pointwise.binary on channels-last,
                        BN folded, weight packed once, add + ReLU as post-ops
        onednn-nlc-raw  the same with the plain (unpacked) weight: oneDNN reorders it per call
        cpp             fastres.conv_bn_relu forced onto the C++ backend (NCL)
    block  the whole block:
        plain           fastres.unfuse(block)
        onednn          fastres.backends.onednn's program (entry and exit conversion included)
        onednn-nlc-io   the same fed channels-last data (input_layout="NLC"): no conversion
        cpp             the fused block with every stage on the C++ backend

and prints FLOPs and the activation / weight bytes of each, for benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastres
from fastres.backends import onednn
from fastres.bench import timing
from fastres.machine import cpu_name


def _cases():
    return [
        ("TemporalBlock(64,64,k3,d4) B16 L1024",
         fastres.TemporalBlock(64, 64, 3, dilation=4, dropout=0.0), (16, 64, 1024)),
        ("TemporalBlock(128,128,k3,d8) B8 L2048",
         fastres.TemporalBlock(128, 128, 3, dilation=8, dropout=0.0), (8, 128, 2048)),
        ("ResNet1d layer1 BasicBlock(64,64) B4 L256",
         fastres.BasicBlock(64, 64), (4, 64, 256)),
        ("ResNet1d layer4 BasicBlock(512,512) B4 L32",
         fastres.BasicBlock(512, 512), (4, 512, 32)),
    ]


def _stage_candidates(block, x):
    conv, bn = block.conv2, block.bn2
    k, d = conv.kernel_size[0], conv.dilation[0]
    causal = isinstance(block, fastres.TemporalBlock)
    padding = "causal" if causal else "same"
    res = x
    if causal:
        x_pad = F.pad(x, [(k - 1) * d, 0])
        pad = 0
    else:
        x_pad, pad = x, (k - 1) * d // 2

    def eager():
        z = F.batch_norm(F.conv1d(x_pad, conv.weight, conv.bias, 1, pad, d), bn.running_mean,
                         bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.relu(z + res)

    step = onednn._Conv(conv, bn, padding, x.dtype)
    h = onednn._as_4d(onednn.to_channels_last(x))
    step(h, relu=True, add=h)  # packs for this shape
    raw = step.weight

    def raw_call():
        hp = h
        if step.pad_copy is not None:
            hp = onednn._as_4d(F.pad(h.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2],
                                                                   x.shape[1]),
                                     (0, 0, step.pad_copy[0], step.pad_copy[1])).transpose(1, 2))
        return torch.ops.mkldnn._convolution_pointwise.binary(
            hp, h, raw, step.bias, step.pad_op, step.stride_op, step.dilation_op, 1, "add",
            None, "relu", [], "")

    def cpp():
        with fastres.use_backend("cpp"):
            return fastres.conv_bn_relu(
                x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                bn.bias, training=False, eps=bn.eps, dilation=d, padding=padding, residual=res)

    return {"eager-ncl": eager,
            "conv-ncl": lambda: F.conv1d(x_pad, conv.weight, conv.bias, 1, pad, d),
            "onednn-nlc": lambda: step(h, relu=True, add=h),
            "onednn-nlc-raw": raw_call,
            "cpp": cpp}


def _block_candidates(block, x):
    plain = fastres.unfuse(block).eval()
    program = onednn.build(block)

    def cpp():
        with fastres.use_backend("cpp"):
            return block(x)
    x_nlc = onednn.to_channels_last(x)  # (B, C, L) view of (B, L, C) data: NLC in and out
    return {"plain": lambda: plain(x), "onednn": lambda: program(x),
            "onednn-nlc-io": lambda: program(x_nlc), "cpp": cpp}


def _work(block, shape):
    """(FLOPs, activation bytes in + out, weight bytes) of the block's eval forward."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fastres.unfuse(block).eval()(x)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    return counter.get_total_flops(), x.numel() * 4 + out.numel() * 4, weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = timing.TimingConfig(min_rounds=args.rounds, max_rounds=args.rounds,
                                 max_time_s=1e9, min_block_s=0.02, warmup_s=0.2)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, float32, "
          f"medians of {args.rounds} interleaved rounds")
    torch.manual_seed(0)
    for label, block, shape in _cases():
        block.eval()
        x = torch.randn(shape)
        flops, act, weights = _work(block, shape)
        print(f"\n{label}: {flops / 1e6:.0f} MFLOP, activations in+out {act / 2**20:.2f} MiB, "
              f"weights {weights / 2**20:.2f} MiB")
        with torch.no_grad():
            for what, candidates in (("stage", _stage_candidates(block, x)),
                                     ("block", _block_candidates(block, x))):
                stats = timing.measure(candidates, torch.device("cpu"), config)
                base = stats["eager-ncl" if what == "stage" else "plain"].median_s
                cells = []
                for name, s in stats.items():
                    if isinstance(s, Exception):
                        cells.append(f"{name} error {s}")
                        continue
                    cells.append(f"{name} {s.median_s * 1e3:.3f} ms ({base / s.median_s:.2f}x, "
                                 f"spread {100 * s.spread:.0f}%)")
                print(f"  {what}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
