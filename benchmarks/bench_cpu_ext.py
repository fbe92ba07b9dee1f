"""CPU benchmark of the C++ backend against eager PyTorch and torch.compile, same process.

    PYTHONPATH=$PWD python benchmarks/bench_cpu_ext.py            # the full run (minutes)
    PYTHONPATH=$PWD python benchmarks/bench_cpu_ext.py --quick    # two shapes, fewer repeats

What is timed, per TemporalBlock stage out = relu(bn(conv_causal(x)) + x), K=3, B=16:
- eval forward (no grad), and a train step (forward + backward, running stats updated);
- "eager": nn.Conv1d(padding=(K-1)*d) + chomp + nn.BatchNorm1d + add + ReLU (the seed block);
- "compile": the same module under torch.compile (inductor, CPU), compiled before timing;
- "cpp": fastres.conv_bn_relu on the C++ backend (the public function, Python layer included).
And small-batch latency: B=1, L=256, an 8-block TCN of 64 channels (two stages per block,
dilations 1..128, eval), fastres vs the same in nn modules vs torch.compile.

Runs are interleaved (every repeat runs each implementation once, in rotating order) and the
median of the repeats is reported. The script checks the implementations agree before timing.
Results: benchmarks/results/cpu-<date>-ext.json (raw timings, medians, machine, versions, git
commit) and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import fastres
from fastres import backends
from fastres.conventions import cpu_name as _cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
K = 3

FULL_SHAPES = [  # (C, L, dilation) at B=16
    (64, 1024, 1), (64, 4096, 4), (128, 1024, 2), (128, 4096, 8), (256, 1024, 16),
    (256, 4096, 16),
]
QUICK_SHAPES = [(64, 1024, 1), (128, 2048, 4)]


class EagerStage(nn.Module):
    """The seed TemporalBlock stage in plain nn modules: conv, chomp, BN, add, ReLU."""

    def __init__(self, channels, dilation):
        super().__init__()
        self.chomp = (K - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, K, dilation=dilation, padding=self.chomp)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x, residual):
        y = self.conv(x)[:, :, :-self.chomp] if self.chomp else self.conv(x)
        return torch.relu(self.bn(y) + residual)


def fused_stage(stage: EagerStage, x, residual):
    """The same stage through fastres.conv_bn_relu, sharing the module's parameters."""
    bn = stage.bn
    return fastres.conv_bn_relu(
        x, stage.conv.weight, stage.conv.bias, bn.running_mean, bn.running_var, bn.weight,
        bn.bias, training=bn.training, momentum=bn.momentum, eps=bn.eps,
        dilation=stage.conv.dilation[0], padding="causal", residual=residual,
        num_batches_tracked=bn.num_batches_tracked)


class EagerTCN(nn.Module):
    """8 TemporalBlocks of two stages each (the second adds the block input), in nn modules."""

    def __init__(self, channels=64, blocks=8):
        super().__init__()
        self.stages = nn.ModuleList(
            EagerStage(channels, 2 ** (i // 2)) for i in range(2 * blocks))

    def forward(self, x):
        for first, second in zip(self.stages[0::2], self.stages[1::2]):
            h = first.bn(first.conv(x)[:, :, :-first.chomp])
            x = second(torch.relu(h), x)
        return x


def fused_tcn(model: EagerTCN, x):
    for first, second in zip(model.stages[0::2], model.stages[1::2]):
        h = fastres.conv_bn_relu(
            x, first.conv.weight, first.conv.bias, first.bn.running_mean, first.bn.running_var,
            first.bn.weight, first.bn.bias, training=False, eps=first.bn.eps,
            dilation=first.conv.dilation[0])
        x = fused_stage(second, h, x)
    return x


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Seconds per call of each fn: `repeats` samples of `inner` calls, interleaved."""
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def _train_step(forward, params, x, grad):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        forward().backward(grad)
    return step


def bench_stage(channels, length, dilation, batch, repeats, use_compile):
    torch.manual_seed(0)
    stage = EagerStage(channels, dilation)
    _randomize_bn(stage)
    # Every shape recompiles EagerStage.forward (eval and train each); without a reset dynamo
    # hits its recompile limit after 8 and silently runs the later shapes in eager.
    torch._dynamo.reset()
    compiled = torch.compile(stage) if use_compile else None
    x = torch.randn(batch, channels, length)
    rows = {}

    # Eval forward.
    stage.eval()
    with torch.no_grad():
        ref = stage(x, x)
        got = fused_stage(stage, x, x)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()
        fns = {"eager": lambda: stage(x, x), "cpp": lambda: fused_stage(stage, x, x)}
        if compiled is not None:
            compiled(x, x)  # compile outside the timing
            fns["compile"] = lambda: compiled(x, x)
        for fn in fns.values():
            fn()  # warm up
        rows["eval"] = interleaved(fns, repeats)

    # Train step: forward + backward, running statistics updated as in training.
    stage.train()
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(batch, channels, length)
    params = list(stage.parameters())
    fns = {"eager": _train_step(lambda: stage(xg, xg), params, xg, grad),
           "cpp": _train_step(lambda: fused_stage(stage, xg, xg), params, xg, grad)}
    if compiled is not None:
        fns["compile"] = _train_step(lambda: compiled(xg, xg), params, xg, grad)
    for fn in fns.values():
        fn()  # warm up (and compile the backward graph)
    rows["train"] = interleaved(fns, repeats)
    return rows


def bench_small_batch(repeats, inner, use_compile):
    torch.manual_seed(0)
    model = EagerTCN().eval()
    _randomize_bn(model)
    x = torch.randn(1, 64, 256)
    with torch.no_grad():
        ref = model(x)
        got = fused_tcn(model, x)
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3), (got - ref).abs().max()
        fns = {"eager": lambda: model(x), "cpp": lambda: fused_tcn(model, x)}
        if use_compile:
            torch._dynamo.reset()
            compiled = torch.compile(model)
            compiled(x)
            fns["compile"] = lambda: compiled(x)
        for fn in fns.values():
            fn()
        return interleaved(fns, repeats, inner)


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _median_ms(samples):
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice, all cores)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    reason = backends.unavailable_reason("cpp")
    if reason is not None:
        sys.exit(f"the cpp backend is not available: {reason}")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    use_compile = not args.no_compile
    batch = 16

    results = {
        "benchmark": "fastres C++ backend vs eager vs torch.compile (CPU)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _cpu_name(), "threads": torch.get_num_threads(), "dtype": "float32",
        "torch": torch.__version__, "python": platform.python_version(),
        "git_commit": _git_commit(), "repeats": repeats, "kernel_size": K,
        # Other processes on the machine skew the timings (OpenMP threads stall when a core is
        # taken): the load average before and after says how quiet the run was.
        "loadavg_start": os.getloadavg(),
        "stage": "relu(bn(conv_causal(x)) + x)", "stages": [], "small_batch": None,
    }
    with fastres.use_backend("cpp"):
        for channels, length, dilation in shapes:
            rows = bench_stage(channels, length, dilation, batch, repeats, use_compile)
            for mode, samples in rows.items():
                med = _median_ms(samples)
                results["stages"].append({
                    "B": batch, "C": channels, "L": length, "dilation": dilation, "mode": mode,
                    "raw_s": samples, "median_ms": med,
                    "speedup_vs_eager": med["eager"] / med["cpp"]})
                print(f"B={batch} C={channels} L={length} d={dilation} {mode:5s} "
                      + "  ".join(f"{n} {t:8.2f} ms" for n, t in med.items())
                      + f"  cpp speedup {med['eager'] / med['cpp']:.2f}x", flush=True)
        samples = bench_small_batch(repeats, 5 if args.quick else 20, use_compile)
        med = _median_ms(samples)
        results["small_batch"] = {
            "B": 1, "C": 64, "L": 256, "blocks": 8, "mode": "eval", "raw_s": samples,
            "median_ms": med, "speedup_vs_eager": med["eager"] / med["cpp"]}
        print("small batch (B=1 L=256, 8-block TCN, eval) "
              + "  ".join(f"{n} {t:8.3f} ms" for n, t in med.items())
              + f"  cpp speedup {med['eager'] / med['cpp']:.2f}x", flush=True)

    results["loadavg_end"] = os.getloadavg()
    os.makedirs(args.out_dir, exist_ok=True)
    suffix = f"-{args.threads}thread" if args.threads else ""
    stem = os.path.join(args.out_dir, f"cpu-{datetime.date.today().isoformat()}-ext{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    print(f"wrote {stem}.json and {stem}.md")


def markdown(results):
    has_compile = any("compile" in r["median_ms"] for r in results["stages"])
    lines = [
        f"# C++ backend vs eager vs torch.compile on CPU ({results['date'][:10]})", "",
        f"{results['device']}, {results['threads']} threads, torch {results['torch']}, "
        f"{results['dtype']}, commit {results['git_commit'][:10]}; median of "
        f"{results['repeats']} interleaved runs. Stage: {results['stage']}, K={K}, causal. "
        f"Load average (1 min) at start/end: {results['loadavg_start'][0]:.1f} / "
        f"{results['loadavg_end'][0]:.1f} (the machine has {os.cpu_count()} cores).", "",
        "| B | C | L | d | mode | eager ms | " + ("compile ms | " if has_compile else "")
        + "cpp ms | cpp vs eager |",
        "|---|---|---|---|---|---|" + ("---|" if has_compile else "") + "---|---|",
    ]
    for r in results["stages"]:
        m = r["median_ms"]
        lines.append(f"| {r['B']} | {r['C']} | {r['L']} | {r['dilation']} | {r['mode']} | "
                     f"{m['eager']:.2f} | " + (f"{m['compile']:.2f} | " if has_compile else "")
                     + f"{m['cpp']:.2f} | {r['speedup_vs_eager']:.2f}x |")
    sb = results["small_batch"]
    if sb:
        m = sb["median_ms"]
        lines += ["", "Small-batch latency, B=1, L=256, 8-block TCN (16 stages), 64 channels, eval:",
                  "", "| eager ms | " + ("compile ms | " if "compile" in m else "")
                  + "cpp ms | cpp vs eager |",
                  "|---|" + ("---|" if "compile" in m else "") + "---|---|",
                  f"| {m['eager']:.3f} | " + (f"{m['compile']:.3f} | " if "compile" in m else "")
                  + f"{m['cpp']:.3f} | {sb['speedup_vs_eager']:.2f}x |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
