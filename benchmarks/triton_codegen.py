"""What the Triton backend's kernels compile to for an H100 (sm_90), without a GPU.

Captures the launches of one training step (forward + backward of a stage with a residual,
B=32, L=4096, K=3, and stage 1's dgrad, which adds the block's shortcut gradient) as the
backend really issues them, compiles each kernel for sm_90
with the JIT's own specialization, and prints one table row per kernel: registers, spill
bytes, shared memory, tensor-core instructions (HGMMA = wgmma; HMMA = the older mma.sync),
global load widths (all, and inside the GEMM loop: the operand loads), cp.async (LDGSTS)
and TMA (UTMALDG) copies, local-memory traffic, and whether the operand copies are
software-pipelined (issued inside the GEMM loop and ahead of it).

    python benchmarks/triton_codegen.py                       # the installed triton
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/triton_codegen.py   # another triton:
        # pip download triton==3.6.0 --no-deps -d /tmp/triton36-whl
        # pip install --no-deps --target /tmp/triton36 /tmp/triton36-whl/*.whl

Options: --channels 64 256, --dtypes bf16 fp32 (fp32 compiles tf32 dots), --length
(4100 shows the masked-pointer path of rows that are not 16-byte multiples), --all
(also the elementwise and finalize kernels), --candidates (also every tile config that
FASTRES_TRITON_TUNE=1 may time: one that spills or fails to compile is one to prune).
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastres.backends.triton import codegen  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--all", action="store_true", help="elementwise and finalize kernels too")
    parser.add_argument("--candidates", action="store_true",
                        help="every tuning candidate's tiles, not only the heuristic's")
    args = parser.parse_args(argv)

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90; "
          f"training step of a stage, B={args.batch}, L={args.length}, K=3, residual")
    for dtype_name in args.dtypes:
        for C in args.channels:
            launches = codegen.training_step_launches(C, DTYPES[dtype_name], B=args.batch,
                                                      L=args.length)
            # Stage 1 of an identity block: its dgrad also adds the shortcut's gradient.
            launches += [launch for launch in codegen.training_step_launches(
                C, DTYPES[dtype_name], B=args.batch, L=args.length, residual=False,
                shortcut_grad=True) if launch.name == "conv_dgrad_kernel"]
            if args.candidates:
                for index in range(1, 12):
                    launches += codegen.training_step_launches(
                        C, DTYPES[dtype_name], B=args.batch, L=args.length, candidate=index)
                launches = codegen.unique(launches)
            if not args.all:
                launches = [launch for launch in launches if launch.name.startswith("conv_")]
            reports = []
            for launch in tqdm(launches, desc=f"{dtype_name} C={C}", leave=False):
                compiled = codegen.compile_launch(launch)
                reports.append(codegen.inspect(compiled, launch.name, codegen.describe(launch)))
            precision = " (tf32 dots)" if dtype_name == "fp32" else ""
            print(f"\n{dtype_name}{precision}, C_in = C_out = {C}\n")
            print(codegen.markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
