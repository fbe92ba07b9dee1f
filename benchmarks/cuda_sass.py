"""The compiled CUDA kernels of fastres._C, read without a GPU.

For every kernel of the built extension and one GPU architecture: registers, stack and local
memory (spills), and how many global loads and stores are 16 bytes wide (LDG.E.128 /
STG.E.128) or 8 bytes wide. Read with cuobjdump from the extension's fatbinary.

    python benchmarks/cuda_sass.py [--arch sm_90] [--match apply] [--so PATH]

Prints a markdown table (benchmarks/NOTES.md, "CUDA extension", quotes it).
tests/backends/test_cuda_ext.py checks the same report: no spills, 16-byte accesses in the
elementwise kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional


@dataclasses.dataclass
class Kernel:
    name: str             # demangled, without namespaces or parameters
    registers: int
    stack: int            # bytes; spills land here or in local memory
    local: int            # bytes of local memory
    local_accesses: int   # LDL/STL instructions
    loads: Dict[int, int]   # access width in bytes -> global load instructions
    stores: Dict[int, int]  # access width in bytes -> global store instructions


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the copy Triton bundles, or the CUDA toolkit torch knows."""
    def usable(path):
        return path if path and os.access(path, os.X_OK) else None

    found = usable(shutil.which("cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if found is None and spec is not None and spec.origin:
        found = usable(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin",
                                    "cuobjdump"))
    if found is None:
        from torch.utils import cpp_extension
        found = usable(os.path.join(cpp_extension.CUDA_HOME or "", "bin", "cuobjdump"))
    return found


def extension_path() -> Optional[str]:
    """The built fastres._C shared library, if any."""
    spec = importlib.util.find_spec("fastres")
    if spec is None or not spec.origin:
        return None
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    return found[0] if found else None


def _short_names(mangled: List[str]) -> List[str]:
    """Demangled names without namespaces or parameters (mangled ones without c++filt)."""
    try:
        names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    names = [re.sub(r"fastres::\(anonymous namespace\)::|c10::|^void ", "", n) for n in names]
    return [re.sub(r"\(.*", "", n) for n in names]


def _width(opcode: str) -> int:
    match = re.search(r"\.(128|64|U16|S16|U8|S8)\b", opcode)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[match.group(1)] \
        if match else 4


def kernels(so: str, arch: str, cuobjdump: str) -> List[Kernel]:
    """Every kernel compiled for `arch` (e.g. "sm_90") in the shared library `so`."""
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", "--gpu-architecture", arch, so],
                           capture_output=True, text=True, check=True).stdout
    resources = {}
    for name, regs, stack, local in re.findall(
            r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage):
        resources[name] = (int(regs), int(stack), int(local))
    sass = subprocess.run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, so],
                          capture_output=True, text=True, check=True).stdout
    blocks = [block.split("\n", 1) for block in re.split(r"\n\s*Function : ", sass)[1:]]
    found = []
    for (name, body), short in zip(blocks, _short_names([b[0].strip() for b in blocks])):
        loads, stores = {}, {}
        for op in re.findall(r"\b(LDG\.E[\.\w]*|STG\.E[\.\w]*)", body):
            table = loads if op.startswith("LDG") else stores
            table[_width(op)] = table.get(_width(op), 0) + 1
        regs, stack, local = resources.get(name.strip(), (-1, -1, -1))
        found.append(Kernel(short, regs, stack, local,
                            len(re.findall(r"\b(?:LDL|STL)\b", body)), loads, stores))
    return sorted(found, key=lambda k: k.name)


def markdown(found: List[Kernel], arch: str) -> str:
    lines = [f"| kernel ({arch}) | registers | stack / local bytes | 16-byte loads | "
             "16-byte stores | 8-byte loads | 8-byte stores |",
             "|---|---|---|---|---|---|---|"]
    for k in found:
        lines.append(f"| `{k.name}` | {k.registers} | {k.stack} / {k.local} | "
                     f"{k.loads.get(16, 0)} | {k.stores.get(16, 0)} | {k.loads.get(8, 0)} | "
                     f"{k.stores.get(8, 0)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", default=None, help="the extension (default: fastres/_C*.so)")
    parser.add_argument("--arch", default="sm_90", help="GPU architecture (default sm_90)")
    parser.add_argument("--match", default="", help="only kernels whose name matches")
    args = parser.parse_args(argv)
    so, tool = args.so or extension_path(), find_cuobjdump()
    if so is None or tool is None:
        parser.error("needs a built fastres._C and cuobjdump "
                     f"(extension: {so}, cuobjdump: {tool})")
    found = [k for k in kernels(so, args.arch, tool) if re.search(args.match, k.name)]
    if not found:
        parser.error(f"no {args.arch} kernels matching {args.match!r} in {so}")
    print(markdown(found, args.arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
