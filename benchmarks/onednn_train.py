"""The channels-last training program (fastres/backends/onednn_train.py) against its peers.

    python benchmarks/onednn_train.py [--threads 1] [--rounds 15] [--rows 64,128,32] [--no-compile]

One SGD step each (zero_grad, forward, MSE loss, backward, step), interleaved medians:

    plain            fastres.unfuse(block), NCL data (the baseline)
    fastres          the fused block at its default dispatch, NCL data
    onednn-train     the block through its training program, NCL data (converted once at
                     entry and once at exit)
    onednn-train-nlc the same fed (B, L, C) data (input_layout="NLC": no conversion)
    compiled         torch.compile(plain), default mode (compile time reported apart)

Before timing, one step's output and gradients of the program are compared with the plain
block's and the float64 block's (the worst relative error of each). Prints the load average
at the start and the end: numbers taken at a load above the core count say little.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

import fastres
from fastres.backends import onednn_train
from fastres.bench import timing
from fastres.conventions import rel_err
from fastres.machine import cpu_name

def _block(c, d):
    return lambda: fastres.TemporalBlock(c, c, 3, dilation=d, dropout=0.0)


# key -> (label, constructor, input shape); the first four are issue 22's training rows
ROWS = {
    "64": ("TemporalBlock(64,64,k3,d4) B16 L1024", _block(64, 4), (16, 64, 1024)),
    "128": ("TemporalBlock(128,128,k3,d8) B8 L2048", _block(128, 8), (8, 128, 2048)),
    "tcn64": ("TemporalConvNet(64,[64]x8) B1 L256", lambda: fastres.TemporalConvNet(
        64, [64] * 8, kernel_size=3, dropout=0.0), (1, 64, 256)),
    "tcn32": ("TemporalConvNet(16,[32]x6) B8 L1024", lambda: fastres.TemporalConvNet(
        16, [32] * 6, kernel_size=3, dropout=0.0), (8, 16, 1024)),
    "32": ("TemporalBlock(32,32,k3,d2) B8 L1024", _block(32, 2), (8, 32, 1024)),
}


def _step(model, forward, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _errors(block, shape):
    """Worst relative error of one training forward + backward against float64, for the
    program and for plain float32 (outputs, input and parameter gradients)."""
    plain = fastres.unfuse(copy.deepcopy(block)).train()
    ref = copy.deepcopy(plain).double()
    prog = copy.deepcopy(block)
    x = torch.randn(shape)
    with torch.no_grad():
        g = torch.randn(copy.deepcopy(plain)(x).shape)
    results = {}
    for name, model in (("program", prog), ("plain", plain), ("ref", ref)):
        dtype = torch.float64 if name == "ref" else torch.float32
        xm = x.to(dtype).requires_grad_()
        out = onednn_train.run(model, xm) if name == "program" else model(xm)
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(out, [xm] + list(params.values()), g.to(dtype))
        results[name] = dict(zip(["out", "x"] + list(params), [out] + list(grads)))
    worst = {}
    for name in ("program", "plain"):
        worst[name] = max(
            (rel_err(results[name][k], results["ref"][k],
                     results["ref"][k.replace("bias", "weight")].norm().item()
                     if k.split(".")[-2:-1] and k.split(".")[-2].startswith("conv")
                     and k.endswith("bias") else None), k)
            for k in results["ref"])
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", default="64,128,tcn64,tcn32")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = timing.TimingConfig(min_rounds=args.rounds, max_rounds=args.rounds,
                                 max_time_s=1e9, min_block_s=0.02, warmup_s=0.3)
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, float32, "
          f"train step, medians of {args.rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.2f}")
    for key in args.rows.split(","):
        label, build, shape = ROWS[key]
        torch.manual_seed(0)
        block = build().train()
        worst = _errors(block, shape)
        print(f"\n{label}: worst rel err vs float64: program {worst['program'][0]:.1e} "
              f"({worst['program'][1]}), plain {worst['plain'][0]:.1e} ({worst['plain'][1]})")
        plain = fastres.unfuse(copy.deepcopy(block)).train()
        fused = copy.deepcopy(block)
        prog = copy.deepcopy(block)
        prog_nlc = copy.deepcopy(block)
        prog_nlc.input_layout = "NLC"
        x = torch.randn(shape)
        with torch.no_grad():
            target = torch.randn(plain(x).shape)
        x_nlc, target_nlc = x.transpose(1, 2).contiguous(), target.transpose(1, 2).contiguous()
        candidates = {
            "plain": _step(plain, plain, x, target),
            "fastres": _step(fused, fused, x, target),
            "onednn-train": _step(prog, lambda t: onednn_train.run(prog, t), x, target),
            "onednn-train-nlc": _step(prog_nlc, lambda t: onednn_train.run(prog_nlc, t),
                                      x_nlc, target_nlc),
        }
        if not args.no_compile:
            compiled_model = copy.deepcopy(plain)
            compiled = torch.compile(compiled_model)
            start = time.perf_counter()
            candidates["compiled"] = _step(compiled_model, compiled, x, target)
            candidates["compiled"]()
            print(f"  compiled: first step {time.perf_counter() - start:.1f} s")
        stats = timing.measure(candidates, torch.device("cpu"), config)
        base = stats["plain"].median_s
        for name, s in stats.items():
            if isinstance(s, Exception):
                print(f"  {name:17s} error {s}")
            else:
                print(f"  {name:17s} {s.median_s * 1e3:7.1f} ms  {base / s.median_s:5.2f}x "
                      f"plain  (spread {100 * s.spread:.0f}%)")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
