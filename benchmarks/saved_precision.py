"""What saving x-hat in float16 costs the Triton backend's gradients in 16-bit training.

Runs the parity harness (fastres.parity: the float64 reference, fresh inputs per draw) on
the Triton backend over many draws per case, once with x-hat saved as the other backends
save it (float32: conventions.saved_dtype) and once as the Triton backend saves it now
(float16 where C_in * K > 4 without relu_before_add, read only by batch norm's gradient:
out and its mask bits come from the float32 x-hat; fastres/backends/triton saved_dtype)
and once with float16 on every layer, and prints the worst
relative error of any output or gradient per case and dtype. The cases are the ones whose
16-bit gradients one draw never caught (tests/backends/test_backend_parity.py,
BF16_SENSITIVE), grid cases with training-mode batch norm, and `fastres check`'s largest
case: only at its size (32k values a channel set) do masks taken from a rounded x-hat
flip often enough to show (1e-2 of the gradients, where the small cases drew none).

    TRITON_INTERPRET=1 python benchmarks/saved_precision.py [--draws 20]   # CPU, minutes
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fastres import conventions  # noqa: E402
from fastres.backends import triton as triton_backend  # noqa: E402
from fastres.parity import Case, parity_errors  # noqa: E402

CASES = [
    Case(B=4, C_in=3, C_out=8, L=64, K=3, dilation=3, padding="same", norm="eval",
         relu_before_add=True),
    Case(B=4, C_in=1, C_out=32, L=5, K=2, stride=2, padding="same", residual="tensor",
         norm="train"),
    Case(B=2, C_in=4, C_out=8, L=6, K=3, norm="train", relu_before_add=True,
         residual="tensor"),
    Case(),
    Case(C_in=8, C_out=8, residual="identity", relu_before_add=True, dilation=2),
    Case(B=2, C_in=3, C_out=20, L=33, K=3, dilation=2, residual="tensor", norm="train"),
    Case(B=2, C_in=2, C_out=8, L=8, K=2, norm="train"),
    Case(B=4, C_in=32, C_out=32, L=256, K=3, dilation=8, residual="tensor"),
]


def worst_errors(draws: int):
    """{(variant, case index, dtype): (worst quantity, its error)}."""
    own = triton_backend.saved_dtype
    results = {}
    try:
        def as_others(dtype, norm, relu_before_add, weights_per_channel):
            return conventions.saved_dtype(dtype, norm, relu_before_add)

        def float16_everywhere(dtype, norm, relu_before_add, weights_per_channel):
            return own(dtype, norm, relu_before_add, 2**31)
        variants = (("float32", as_others), ("float16", own),
                    ("float16 everywhere", float16_everywhere))
        for variant, chooser in variants:
            triton_backend.saved_dtype = chooser
            for index, case in enumerate(CASES):
                for dtype in (torch.bfloat16, torch.float16):
                    worst = {}
                    for draw in range(draws):
                        errors = parity_errors(case, "triton", dtype, seed=1000 * index + draw)
                        for name, value in errors.items():
                            worst[name] = max(worst.get(name, 0.0), value)
                    top = max(worst, key=worst.get)
                    results[variant, index, dtype] = (top, worst[top])
    finally:
        triton_backend.saved_dtype = own
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args(argv)
    results = worst_errors(args.draws)
    print(f"Worst relative error over {args.draws} draws (bound 1e-2), Triton backend, "
          f"torch {torch.__version__}\n")
    print("| case | dtype | x-hat float32 (other backends) | x-hat float16 (Triton: float32 "
          "where C_in*K <= 4 or relu_before_add) | float16 everywhere |")
    print("|---|---|---|---|---|")
    for index, case in enumerate(CASES):
        for dtype in (torch.bfloat16, torch.float16):
            cells = [f"{results[v, index, dtype][1]:.2e} ({results[v, index, dtype][0]})"
                     for v in ("float32", "float16", "float16 everywhere")]
            print(f"| {case} | {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
