"""Byte, FLOP and launch model of one TemporalBlock training step, and predicted H100 times.

A prediction, not a measurement: every number comes from the per-kernel counts below and
the device constants, which are assumptions stated here (benchmarks/NOTES.md explains
them). Run on a GPU, `fastres bench` measures; until then the table's "measured" column
says pending.

    python benchmarks/step_model.py                 # B=32, L=4096, K=3, bf16, C=64/128/256
    python benchmarks/step_model.py --kernels 64    # the per-kernel list at C=64

Step: TemporalBlock(C, C, 3) forward + backward, bf16 activations, identity residual,
no dropout. N = B*C*L elements; bytes are HBM bytes (L2 reuse assumed for the
overlapping tap windows and for tiles of one operand read by neighbouring programs).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import List

# H100 SXM (80 GB): HBM3 3.35 TB/s, dense bf16 tensor cores 989 TFLOP/s. Achieved shares
# assumed: 80% of bandwidth for streaming kernels, 55% of tensor peak for implicit-GEMM
# convs (ours and cuDNN's alike), 10% for the old Triton GEMMs (2-byte scalar operand
# loads, no pipelining: load-latency bound). A C-sized kernel costs SMALL_KERNEL_US, and
# every kernel a LAUNCH_GAP_US bubble after the previous one.
HBM_BYTES_PER_US = 3.35e6 * 0.80
TENSOR_FLOP_PER_US = 989e6 * 0.55
OLD_TENSOR_FLOP_PER_US = 989e6 * 0.10
SMALL_KERNEL_US = 3.0
LAUNCH_GAP_US = 1.0
E = 2  # bytes per bf16 element
XH = 4  # bytes per saved x-hat element at f1e780f and before: float32 in 16-bit training
XH16 = 2  # ... now: float16 (the Triton backend's saved_dtype)
BITS = 1 / 8  # a ReLU mask saved one bit an element (mask_bits.py)
# A fused finalize's serial tail: the last program of a group reduces 32 partial rows, the
# last group the group rows (<= 64 at these shapes): two short C-sized passes over L2.
FINALIZE_TAIL_US = 2.0


@dataclasses.dataclass
class Kernel:
    name: str
    bytes_per_n: float = 0.0     # HBM bytes / N
    gemm_taps: int = 0           # GEMM work in units of 2*C*K*N FLOPs (one conv pass)
    count: int = 1               # launches of it per step
    torch: bool = False          # a torch kernel (else Triton / cuDNN)
    old_gemm: bool = False       # operands loaded the old way (see OLD_TENSOR_FLOP_PER_US)
    extra_bytes: float = 0.0     # absolute bytes not proportional to N (partials)
    tail_us: float = 0.0         # serial time after the body (a fused finalize)

    def time_us(self, C: int, N: int, K: int) -> float:
        byte_time = (self.bytes_per_n * N + self.extra_bytes) / HBM_BYTES_PER_US
        flops = self.gemm_taps * 2 * C * K * N
        rate = OLD_TENSOR_FLOP_PER_US if self.old_gemm else TENSOR_FLOP_PER_US
        body = max(byte_time, flops / rate, SMALL_KERNEL_US if not flops else 0.0)
        return self.count * (body + self.tail_us + LAUNCH_GAP_US)


def wgrad_partial_bytes(C: int, K: int, B: int, L: int) -> float:
    """Write + read of wgrad's split partials (float32), as tiling.wgrad_splits sizes them."""
    from fastres.backends.triton import tiling
    import torch
    cfg = tiling.wgrad_config(C, C, L, torch.bfloat16)
    tile_programs = -(-C // cfg.block_m) * -(-C // cfg.block_n)
    n_splits, _ = tiling.wgrad_splits(B * -(-L // cfg.block_k), tile_programs * K)
    return 2 * n_splits * C * C * K * 4


def this_branch(C, K, B, L) -> List[Kernel]:
    """The kernels now: as at 8fc22de, with stage 2's residual gradient deferred
    (defer_grad_residual): pass 1 writes no grad_residual, and pass 2 and stage 1's dgrad
    read grad_out and the mask bits in its place; and stage 1's ReLU mask saved as bits
    too (out comes from the float32 x-hat: a mask recomputed from the float16 x-hat
    flipped 1e-4 of the elements), read by both its backward passes."""
    partials = wgrad_partial_bytes(C, K, B, L)
    return [
        Kernel("weight tap-major copy (torch)", torch=True, count=2),
        Kernel("conv_forward STATS + finalize: read x", E, 1, count=2,
               tail_us=FINALIZE_TAIL_US),
        Kernel("conv_forward NORM s1: read x; write out, x-hat fp16, mask bits",
               2 * E + XH16 + BITS, 1),
        Kernel("conv_forward NORM s2: read x, res; write out, x-hat fp16, mask bits",
               3 * E + XH16 + BITS, 1),
        Kernel("bn backward pass 1 s1 + finalize: read g_out, bits, x-hat", E + BITS + XH16,
               tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 1 s2 + finalize: read g_out, bits, x-hat",
               E + BITS + XH16, tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 2 s1: read g_out, bits, x-hat; write g_y",
               2 * E + BITS + XH16),
        Kernel("bn backward pass 2 s2: read g_out, bits, x-hat; write g_y",
               2 * E + BITS + XH16),
        Kernel("conv_dgrad s2: read g_y; write g_x", 2 * E, 1),
        Kernel("conv_dgrad s1: read g_y, g_out s2 + bits (the shortcut's); write g_x",
               3 * E + BITS, 1),
        Kernel("conv_wgrad + split sum: read g_y, x; partials", 2 * E, 1, count=2,
               extra_bytes=partials, tail_us=FINALIZE_TAIL_US),
    ]


def at_8fc22de(C, K, B, L) -> List[Kernel]:
    """The kernels at 8fc22de: as at f1e780f, plus x-hat saved in float16 (and out computed
    from it, so stage 1 still recomputes its mask), stage 2's final ReLU mask saved as bits
    (no read of out), and the block input's two gradients added inside stage 1's dgrad
    (ops.ResidualGradLink: no autograd add)."""
    partials = wgrad_partial_bytes(C, K, B, L)
    return [
        Kernel("weight tap-major copy (torch)", torch=True, count=2),
        Kernel("conv_forward STATS + finalize: read x", E, 1, count=2,
               tail_us=FINALIZE_TAIL_US),
        Kernel("conv_forward NORM s1: read x; write out, x-hat fp16", 2 * E + XH16, 1),
        Kernel("conv_forward NORM s2: read x, res; write out, x-hat fp16, mask bits",
               3 * E + XH16 + BITS, 1),
        Kernel("bn backward pass 1 s1 + finalize: read g_out, x-hat", E + XH16,
               tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 1 s2 + finalize: read g_out, bits, x-hat; write grad_res",
               2 * E + BITS + XH16, tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 2 s1: read g_out, x-hat; write g_y", 2 * E + XH16),
        Kernel("bn backward pass 2 s2: read grad_res, x-hat; write g_y", 2 * E + XH16),
        Kernel("conv_dgrad s2: read g_y; write g_x", 2 * E, 1),
        Kernel("conv_dgrad s1: read g_y, grad_res (the shortcut's); write g_x", 3 * E, 1),
        Kernel("conv_wgrad + split sum: read g_y, x; partials", 2 * E, 1, count=2,
               extra_bytes=partials, tail_us=FINALIZE_TAIL_US),
    ]


def at_f1e780f(C, K, B, L) -> List[Kernel]:
    """The kernels at f1e780f: finalizes fused into the kernels that produce their partials
    (a ticket; the last programs reduce in two short levels: FINALIZE_TAIL_US), the batch
    counted inside the statistics pass's finalize, stage 1's ReLU mask recomputed from
    its float32 x-hat (no read of out)."""
    partials = wgrad_partial_bytes(C, K, B, L)
    return [
        Kernel("weight tap-major copy (torch)", torch=True, count=2),
        Kernel("conv_forward STATS + finalize: read x", E, 1, count=2,
               tail_us=FINALIZE_TAIL_US),
        Kernel("conv_forward NORM s1: read x; write out, x-hat fp32", 2 * E + XH, 1),
        Kernel("conv_forward NORM s2: read x, res; write out, x-hat fp32", 3 * E + XH, 1),
        Kernel("bn backward pass 1 s1 + finalize: read g_out, x-hat", E + XH,
               tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 1 s2 + finalize: read g_out, out, x-hat; write grad_res",
               3 * E + XH, tail_us=FINALIZE_TAIL_US),
        Kernel("bn backward pass 2 s1: read g_out, x-hat; write g_y", 2 * E + XH),
        Kernel("bn backward pass 2 s2: read grad_res, x-hat; write g_y", 2 * E + XH),
        Kernel("conv_dgrad: read g_y; write g_x", 2 * E, 1, count=2),
        Kernel("conv_wgrad + split sum: read g_y, x; partials", 2 * E, 1, count=2,
               extra_bytes=partials, tail_us=FINALIZE_TAIL_US),
        Kernel("autograd: grad_x + grad_res (torch)", 3 * E, torch=True),
    ]


def session_start(C, K, B, L) -> List[Kernel]:
    """The kernels at 9091905 (this round's start): separate finalize launches, the batch
    counted by a torch kernel, every backward pass reading out. (This model's earlier
    versions counted x-hat at 2 bytes; it has been float32 in 16-bit training since the
    precision fix of docs/spec.md, "What backward reads".)"""
    partials = wgrad_partial_bytes(C, K, B, L)
    return [
        Kernel("weight tap-major copy (torch)", torch=True, count=2),
        Kernel("num_batches_tracked += 1 (op, torch)", torch=True, count=2),
        Kernel("conv_forward STATS: read x", E, 1, count=2),
        Kernel("welford_merge + running stats", count=2),
        Kernel("conv_forward NORM s1: read x; write out, x-hat fp32", 2 * E + XH, 1),
        Kernel("conv_forward NORM s2: read x, res; write out, x-hat fp32", 3 * E + XH, 1),
        Kernel("bn backward pass 1 s1: read g_out, out, x-hat", 2 * E + XH),
        Kernel("bn backward pass 1 s2: + write grad_res", 3 * E + XH),
        Kernel("bn_grad_finalize", count=2),
        Kernel("bn backward pass 2 s1: read g_out, out, x-hat; write g_y", 3 * E + XH),
        Kernel("bn backward pass 2 s2: read grad_res, x-hat; write g_y", 2 * E + XH),
        Kernel("conv_dgrad: read g_y; write g_x", 2 * E, 1, count=2),
        Kernel("conv_wgrad: read g_y, x; write partials", 2 * E, 1, count=2,
               extra_bytes=partials / 2),
        Kernel("sum_partials (wgrad splits)", count=2, extra_bytes=partials / 2),
        Kernel("autograd: grad_x + grad_res (torch)", 3 * E, torch=True),
    ]


def before(C, K, B, L) -> List[Kernel]:
    """The kernels at f49810d: x re-read per 64 output channels, y kept in float32; at
    L=4096 its 64-long tiles make 2048 partial rows, which its finalizes reduced in two
    levels (FINALIZE_ROWS was 1024)."""
    r = max(1, C // 64)
    partials = wgrad_partial_bytes(C, K, B, L)
    return [
        Kernel("num_batches_tracked += 1 (op, torch)", torch=True, count=2),
        Kernel("conv_forward TRAIN: read x (x C/64), write y fp32", r * E + 4, 1, count=2,
               old_gemm=True),
        Kernel("welford_merge (two levels: 2048 tiles > 1024)", count=4),
        Kernel("running stats (5 torch kernels)", torch=True, count=10),
        Kernel("bn_relu_apply s1: read y fp32; write out, x-hat", 4 + 2 * E),
        Kernel("bn_relu_apply s2: read y fp32, res; write out, x-hat", 4 + 3 * E),
        Kernel("bn backward reduce s1", 3 * E),
        Kernel("bn backward reduce s2 (+ grad_res)", 4 * E),
        Kernel("sum_partials, two levels (grad_beta, grad_gamma)", count=8),
        Kernel("bn backward grad_y", 4 * E, count=2),
        Kernel("sum_partials, two levels (grad_bias)", count=4),
        Kernel("conv_dgrad: read g_y (x C/64); write g_x", (r + 1) * E, 1, count=2,
               old_gemm=True),
        Kernel("conv_wgrad: read g_y, x", 2 * E, 1, count=2, old_gemm=True,
               extra_bytes=partials / 2),
        Kernel("sum_partials (wgrad)", count=2, extra_bytes=partials / 2),
        Kernel("autograd: grad_x + grad_res (torch)", 3 * E, torch=True),
    ]


def eager(C, K, B, L) -> List[Kernel]:
    """PyTorch: cuDNN convs, native batch norm (statistics, then apply), separate ReLU/add."""
    return [
        Kernel("cuDNN conv fwd: read x, write y", 2 * E, 1, count=2),
        Kernel("BN stats: read y (+ running stats)", E, count=2),
        Kernel("BN apply: read y, write z", 2 * E, count=2),
        Kernel("num_batches_tracked += 1", torch=True, count=2),
        Kernel("ReLU s1 / final ReLU s2: read, write", 2 * E, count=2),
        Kernel("add s2: read z, res; write", 3 * E),
        Kernel("ReLU backward: read grad, out; write", 3 * E, count=2),
        Kernel("BN backward reduce: read grad, y", 2 * E, count=2),
        Kernel("BN backward apply: read grad, y; write g_y", 3 * E, count=2),
        Kernel("cuDNN dgrad: read g_y, write g_x", 2 * E, 1, count=2),
        Kernel("cuDNN wgrad: read g_y, x", 2 * E, 1, count=2),
        Kernel("conv bias grad: read g_y", E, count=2),
        Kernel("autograd: grad_x + grad_res", 3 * E),
    ]


def compiled(C, K, B, L) -> List[Kernel]:
    """torch.compile (inductor, default mode): cuDNN convs as extern calls, batch norm,
    ReLU and the add fused into one reduction and one pointwise kernel a stage, each way."""
    return [
        Kernel("cuDNN conv fwd: read x, write y", 2 * E, 1, count=2),
        Kernel("stats reduction (+ running stats, counter): read y", E, count=2),
        Kernel("fused normalize+ReLU s1: read y; write out", 2 * E),
        Kernel("fused normalize+ReLU+add+ReLU s2: read y, res; write out", 3 * E),
        Kernel("bwd reduction s1: read grad, y", 2 * E),
        Kernel("bwd reduction s2: read grad, y, res (mask recomputed)", 3 * E),
        Kernel("bwd pointwise s1: read grad, y; write g_y", 3 * E),
        Kernel("bwd pointwise s2: read grad, y, res; write g_y, grad_res", 5 * E),
        Kernel("cuDNN dgrad: read g_y, write g_x", 2 * E, 1, count=2),
        Kernel("cuDNN wgrad (+ bias grad): read g_y, x", 2 * E, 1, count=2),
        Kernel("grad_x + grad_res", 3 * E),
    ]


DESIGNS = {"eager (cuDNN)": eager, "torch.compile": compiled,
           "triton before (f49810d)": before, "triton at 9091905": session_start,
           "triton at f1e780f": at_f1e780f, "triton at 8fc22de": at_8fc22de,
           "triton (now)": this_branch}


def summarize(kernels: List[Kernel], C: int, K: int, B: int, L: int):
    N = B * C * L
    total_bytes = sum(k.bytes_per_n * k.count * N + k.extra_bytes * k.count for k in kernels)
    launches = sum(k.count for k in kernels)
    gpu_us = sum(k.time_us(C, N, K) for k in kernels)
    return total_bytes / N, launches, gpu_us


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--kernels", type=int, metavar="C",
                        help="print the per-kernel model of every design at this C")
    args = parser.parse_args(argv)
    B, L, K = args.batch, args.length, args.kernel_size
    if args.kernels:
        C = args.kernels
        N = B * C * L
        for name, design in DESIGNS.items():
            print(f"\n{name}, C={C}: kernel | launches | bytes/N | predicted us")
            for k in design(C, K, B, L):
                bytes_n = (k.bytes_per_n * N + k.extra_bytes) * k.count / N
                print(f"  {k.name} | {k.count} | {bytes_n:.1f} | {k.time_us(C, N, K):.1f}")
        return 0
    print(f"TemporalBlock train step, B={B}, L={L}, K={K}, bf16, identity residual; "
          "predicted H100 SXM times (model: benchmarks/step_model.py)\n")
    print("| C | design | HBM bytes / N | launches | predicted GPU us | vs eager | measured |")
    print("|---|---|---|---|---|---|---|")
    for C in args.channels:
        base = summarize(eager(C, K, B, L), C, K, B, L)[2]
        for name, design in DESIGNS.items():
            bytes_n, launches, us = summarize(design(C, K, B, L), C, K, B, L)
            print(f"| {C} | {name} | {bytes_n:.1f} | {launches} | {us:.0f} | "
                  f"{base / us:.2f}x | pending GPU run |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
