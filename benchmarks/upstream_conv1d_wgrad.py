"""Reproducer for PyTorch: a wrong float32 conv1d weight gradient on x86 CPUs (oneDNN).

    python benchmarks/upstream_conv1d_wgrad.py            # the 720-geometry grid, plain PyTorch
    python benchmarks/upstream_conv1d_wgrad.py --cost     # also: fastres's route vs oneDNN, timed

Plain PyTorch only (fastres is imported for --cost alone), so the output can go into an
upstream report as it is: the versions (torch, oneDNN), the CPU, then every geometry of the
grid where F.conv1d in float32 differs from F.conv1d in float64 (same rounded inputs) by
more than 1e-5 relative, in the output, the input gradient or the weight gradient, and the
same geometry with oneDNN disabled. The grid is issue 26's: K 2-7, dilation 1/2/4/8/16,
stride 1-3, L 32/48/64/100, (C_in, C_out) (3, 19) and (16, 64), padding (K-1)*dilation//2 on
both sides, batch 2: 720 geometries. Fresh inputs each run (--seed repeats one). Run with
ONEDNN_VERBOSE=1 to see which oneDNN kernel runs, and ONEDNN_MAX_CPU_ISA=AVX2 to compare
another ISA.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import time
import warnings

import torch
import torch.nn.functional as F

BOUND = 1e-5
GRID = [dict(K=k, dilation=d, stride=s, L=length, C_in=c_in, C_out=c_out, B=2)
        for k, d, s, length, (c_in, c_out) in itertools.product(
            range(2, 8), (1, 2, 4, 8, 16), (1, 2, 3), (32, 48, 64, 100), ((3, 19), (16, 64)))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags) or "none of AVX2/AVX-512/AMX"


def onednn_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.strip(" -")
    return "not found in torch.__config__.show()"


def padding_of(g) -> int:
    return (g["K"] - 1) * g["dilation"] // 2


def errors(g, seed: int, onednn: bool = True):
    """Relative errors (output, input gradient, weight gradient) of float32 against float64."""
    gen = torch.Generator().manual_seed(seed)
    pad = padding_of(g)
    l_out = (g["L"] + 2 * pad - g["dilation"] * (g["K"] - 1) - 1) // g["stride"] + 1
    x = torch.randn(g["B"], g["C_in"], g["L"], generator=gen, dtype=torch.float64)
    w = torch.randn(g["C_out"], g["C_in"], g["K"], generator=gen, dtype=torch.float64)
    go = torch.randn(g["B"], g["C_out"], l_out, generator=gen, dtype=torch.float64)
    x, w, go = (t.float().double() for t in (x, w, go))  # the same rounded inputs for both

    def run(dtype):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        y = F.conv1d(xx, ww, None, stride=g["stride"], padding=pad, dilation=g["dilation"])
        gx, gw = torch.autograd.grad(y, (xx, ww), go.to(dtype))
        return y.detach(), gx, gw

    ref = run(torch.float64)
    with torch.backends.mkldnn.flags(enabled=onednn):
        got = run(torch.float32)
    return [((a.double() - b).norm() / b.norm()).item() if b.norm() > 0 else
            (a.double() - b).norm().item() for a, b in zip(got, ref)]


def report(seed: int) -> int:
    print(f"torch {torch.__version__}; {onednn_version()}; oneDNN enabled: "
          f"{torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled}")
    print(f"CPU: {cpu_model()} ({cpu_isa_flags()}); {os.cpu_count()} logical CPUs, "
          f"{torch.get_num_threads()} torch threads; ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; Python {platform.python_version()}")
    print(f"grid: {len(GRID)} geometries of F.conv1d(x (B, C_in, L), w (C_out, C_in, K), "
          "stride, padding=(K-1)*dilation//2, dilation), float32 vs float64, "
          f"bound {BOUND:g} relative; seed {seed}")
    header = ("  K  dil  str    L  C_in  C_out  pad  L_out   out err   dx err    dw err  "
              "dw (no oneDNN)")
    wrong = []
    for i, g in enumerate(GRID):
        errs = errors(g, seed + i)
        if not max(errs) < BOUND:
            wrong.append((g, errs, errors(g, seed + i, onednn=False)))
    print(f"wrong: {len(wrong)} of {len(GRID)}")
    if wrong:
        print(header)
        for g, (e_out, e_x, e_w), (_, _, e_w_plain) in wrong:
            pad = padding_of(g)
            l_out = (g["L"] + 2 * pad - g["dilation"] * (g["K"] - 1) - 1) // g["stride"] + 1
            print(f"{g['K']:3d} {g['dilation']:4d} {g['stride']:4d} {g['L']:4d} {g['C_in']:5d} "
                  f"{g['C_out']:6d} {pad:4d} {l_out:6d}  {e_out:8.1e} {e_x:8.1e}  {e_w:8.2g}  "
                  f"{e_w_plain:8.1e}")
        strides = sorted({g["stride"] for g, _, _ in wrong})
        pads = sorted({padding_of(g) for g, _, _ in wrong})
        print(f"strides of the wrong ones: {strides}; paddings: {pads}")
    return len(wrong)


def cost(rounds: int) -> None:
    """fastres's route (oneDNN conv with the weight detached, weight gradient by a matmul over
    x's columns) against oneDNN's own weight gradient, and the whole conv forward+backward."""
    from fastres.upstream_kernels import route_weight_grad, weight_grad_by_columns

    shapes = [(8, 16, 16, 128, 3, 2, 1), (8, 64, 64, 256, 3, 2, 1), (8, 64, 64, 256, 3, 2, 8),
              (8, 12, 64, 1000, 7, 2, 1), (16, 64, 128, 1024, 3, 2, 1),
              (4, 256, 256, 128, 3, 2, 2), (32, 128, 128, 512, 3, 2, 4)]

    def best_times(*fns):
        """Each fn's fastest of `rounds` runs, the fns interleaved round by round (on a
        shared machine other work only ever adds time)."""
        for fn in fns:
            fn()
        best = [float("inf")] * len(fns)
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
        return best

    print(f"\ncost, best of {rounds} interleaved (CPU: {cpu_model()}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}):")
    print(f"{'B':>3} {'C_in':>4} {'C_out':>5} {'L':>5} {'K':>2} {'s':>2} {'d':>2} | "
          f"{'wgrad oneDNN':>12} {'by columns':>10} | {'fwd+bwd oneDNN':>14} {'routed':>8} ratio")
    for b, c_in, c_out, length, k, s, d in shapes:
        pad = (k - 1) * d // 2
        x = torch.randn(b, c_in, length, requires_grad=True)
        w = torch.randn(c_out, c_in, k, requires_grad=True)
        l_out = (length + 2 * pad - d * (k - 1) - 1) // s + 1
        go = torch.randn(b, c_out, l_out)
        def onednn_wgrad():
            torch.ops.aten.convolution_backward(go, x, w, None, [s], [pad], [d], False, [0], 1,
                                                [False, True, False])

        def columns():
            weight_grad_by_columns(go, x, k, s, d, pad, pad)

        def plain():
            y = F.conv1d(x, w, None, s, pad, d)
            torch.autograd.grad(y, (x, w), go)

        def routed():
            y = route_weight_grad(F.conv1d(x, w.detach(), None, s, pad, d), x, w, s, d, pad,
                                  pad)
            torch.autograd.grad(y, (x, w), go)

        t_onednn, t_columns, t_plain, t_routed = best_times(onednn_wgrad, columns, plain,
                                                            routed)
        print(f"{b:3d} {c_in:4d} {c_out:5d} {length:5d} {k:2d} {s:2d} {d:2d} | "
              f"{t_onednn * 1e6:10.0f}us {t_columns * 1e6:8.0f}us | {t_plain * 1e6:12.0f}us "
              f"{t_routed * 1e6:6.0f}us {t_routed / t_plain:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, help="repeat a run's inputs")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cost", action="store_true",
                        help="also time fastres's route against oneDNN's weight gradient")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds for --cost")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # torch.backends.mkldnn.flags() warns about TF32 on Intel GPUs on every entry.
    warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
    report(random.randrange(2**31) if args.seed is None else args.seed)
    if args.cost:
        cost(args.rounds)


if __name__ == "__main__":
    main()
