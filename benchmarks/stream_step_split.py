"""Where a streaming step's time goes (issue 24): the single-stream float32 step of the bench's
stream model (fastres/bench/tcn_vs_rnn.py, STREAM_CONFIGS["default"]: 8 blocks x 64 channels,
K=3, an 8-channel read-out; 786 KB of folded float32 weights) split into the kernel alone and
everything else, beside the floor of reading the folded weights once and the bench's matched
nn.LSTMCell step. One process, one torch thread, interleaved rounds, medians.

    OMP_NUM_THREADS=1 python benchmarks/stream_step_split.py [--rounds 21] [--steps 2000]
        [--weights bf16 [--bf16-kernel widen|dot]]

--weights bf16 runs the stream with bf16 folded weights (weight_dtype=torch.bfloat16);
--bf16-kernel picks which of csrc/cpu/stream_cpu.cpp's two single-row bf16 kernels runs
(default: the dot product where the CPU has AVX512_BF16, else widen).

Rows, microseconds per step, as wall-clock and as thread CPU time (the latter leaves out the
time other jobs held the core on a shared machine):
    step(x)            Stream.step on a contiguous x_t, a new output each step
    step(x, out)       the same into a preallocated output
    step(x[:, :, t])   a slice of a (B, F, 64) sequence, read in place
    kernel alone       the C++ kernel in a loop in C++ (fastres._C.StreamStep._time): no
                       Python, no checks, no allocation (thread CPU time only)
    weight read        the fastest single read of the folded weights a step reads (float32,
                       or the bf16 ones with --weights bf16; their sum):
                       what a step that reads its weights from where they sit cannot go below
    lstmcell-matched   the bench's one nn.LSTMCell of matched parameters (and its read-out)
"everything else" is step(x) minus the kernel alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastres
from fastres.bench import tcn_vs_rnn
from fastres.machine import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=2000, help="steps a round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--weights", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--bf16-kernel", choices=["widen", "dot"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    config, cpu, dtype = tcn_vs_rnn.STREAM_CONFIGS["default"], torch.device("cpu"), torch.float32
    models, _ = tcn_vs_rnn.build_models(config, cpu, dtype)
    model = models["tcn-fastres"].eval()
    weight_dtype = torch.bfloat16 if args.weights == "bf16" else None
    s = fastres.stream(torch.nn.Sequential(model.backbone, model.head), batch_size=args.batch,
                       weight_dtype=weight_dtype)
    kernel_name = ""
    if weight_dtype is not None:
        import fastres._C as extension
        kernel_name = f" ({extension.stream_bf16_kernel(args.bf16_kernel)} kernel)"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, config.features, generator=g)
    sequence = torch.randn(args.batch, config.features, 64, generator=g)
    columns = [sequence[:, :, t] for t in range(64)]
    out = torch.empty(args.batch, s.out_channels)
    lstm = tcn_vs_rnn._stream_call(models, "lstmcell-matched", config, args.batch, cpu, dtype)
    bound = s._fast   # fastres._C.StreamStep, where the cpp backend runs

    def strided(n):
        for t in range(n):
            s.step(columns[t % 64])

    rows = {
        "step(x)": lambda n: [s.step(x) for _ in range(n)],
        "step(x, out)": lambda n: [s.step(x, out) for _ in range(n)],
        "step(x[:, :, t])": strided,
        "lstmcell-matched": lambda n: [lstm() for _ in range(n // 10)],
    }
    scale = {"lstmcell-matched": 10}
    wall = {k: [] for k in rows}
    cpu_time = {k: [] for k in rows}
    kernel, read = [], []
    for name, fn in rows.items():   # warm up
        fn(200)
    for _ in range(args.rounds):
        for name, fn in rows.items():
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            fn(args.steps)
            per = scale.get(name, 1) / args.steps / 1e3
            wall[name].append((time.perf_counter_ns() - w0) * per)
            cpu_time[name].append((time.thread_time_ns() - c0) * per)
        if hasattr(bound, "_time"):
            k, r = bound._time(x, out, args.steps)
            kernel.append(k * 1e6)
            read.append(r * 1e6)
    load_after = os.getloadavg()[0]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; B={args.batch}; float32 with "
          f"{args.weights} weights{kernel_name}; "
          f"1 thread; {args.rounds} rounds x {args.steps} steps; load average "
          f"{load_before:.2f} before, {load_after:.2f} after")
    print(f"{'per step (us)':20s} {'wall':>8s} {'thread CPU':>11s}")
    for name in rows:
        print(f"{name:20s} {statistics.median(wall[name]):8.2f} "
              f"{statistics.median(cpu_time[name]):11.2f}")
    if kernel:
        k, r = statistics.median(kernel), statistics.median(read)
        step_cpu = statistics.median(cpu_time["step(x)"])
        print(f"{'kernel alone':20s} {'':8s} {k:11.2f}")
        print(f"{'weight read':20s} {'':8s} {r:11.2f}")
        print(f"everything else (step(x) - kernel): {step_cpu - k:.2f} us; kernel over the "
              f"weight read: {k - r:.2f} us")
    print(f"lstmcell-matched / step(x): "
          f"{statistics.median(wall['lstmcell-matched']) / statistics.median(wall['step(x)']):.1f}x"
          f" wall, {statistics.median(cpu_time['lstmcell-matched']) / statistics.median(cpu_time['step(x)']):.1f}x"
          " thread CPU")


if __name__ == "__main__":
    main()
