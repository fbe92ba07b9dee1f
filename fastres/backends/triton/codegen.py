"""What the Triton kernels compile to on an H100 (sm_90), without a GPU.

`capture(run)` runs the real launchers (this backend's forward / backward on CPU tensors,
Triton not interpreting) against a stand-in driver: every kernel launch is recorded with
exactly the signature, specialization (pointer alignment, integers divisible by 16 or
equal to 1), constexprs and options the JIT would compile it with, and nothing is
launched. `compile_launch` then compiles one record for sm_90 and `inspect` reads the
result: registers, spills, shared memory, and the instruction mix of the SASS (tensor-core
HGMMA, global load widths, cp.async / TMA copies, local memory) and where the async copies
sit (inside the main loop, and before it: a software pipeline).

Used by tests/backends/test_triton_codegen.py (the CI checks) and
benchmarks/triton_codegen.py (the tables in benchmarks/NOTES.md). Works with triton 3.6
and 3.9. Must run in a process where TRITON_INTERPRET is unset when the kernels are
imported (the JIT decorates them as interpreted functions otherwise).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Callable, Dict, List, Optional

import triton


@dataclasses.dataclass
class Launch:
    """One kernel launch as the JIT would compile it."""

    fn: object                     # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def name(self) -> str:
        return self.fn.__name__


class _CompileOnlyDriver:
    """Enough of a Triton driver for the JIT to specialize and hand over a kernel."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"compile-only driver: {name} is not available (no GPU)")


@contextlib.contextmanager
def capture(capability: int = 90):
    """Record, instead of launching, every Triton kernel started inside the block.

    Yields the list the records are appended to. Kernels do not run: the launchers'
    outputs stay whatever memory they got."""
    from triton import knobs
    from triton.runtime.driver import driver

    launches: List[Launch] = []

    def hook(*, fn, compile, **_):
        options = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas")
                   if k in compile}
        launches.append(Launch(fn.jit_function, compile["signature"], compile["constants"],
                               compile["configs"][0], options))
        return True  # handled: the JIT neither compiles nor launches

    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_CompileOnlyDriver(capability))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver  # (reset_active would look for a real GPU driver)


def compile_launch(launch: Launch, capability: int = 90):
    """triton.compile the recorded launch for sm_<capability>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=launch.options)


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass(compiled) -> str:
    """The SASS of a compiled kernel (nvdisasm from Triton's own wheel)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout


def resources(compiled) -> Dict[str, int]:
    """Registers, local memory (spills) and static shared memory, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


# SASS opcode -> what the tables call it.
_LOAD = re.compile(r"\b(LDG|LDGSTS|LDS|LDSM|LDL|STL|UTMALDG|UBLKCP|STG|UTMASTG)(\.[A-Z0-9_.]+)?")


def _load_width(op: str, suffix: str) -> str:
    """LDG.E.U16 -> '2B', LDG.E.64 -> '8B', LDG.E.128 -> '16B', LDG.E -> '4B'."""
    for token, width in ((".128", "16B"), (".64", "8B"), (".U16", "2B"), (".S16", "2B"),
                         (".U8", "1B"), (".S8", "1B")):
        if token in suffix:
            return width
    return "4B"


@dataclasses.dataclass
class Report:
    """What one compiled kernel is made of."""

    kernel: str
    config: str
    regs: int
    spill_bytes: int           # local memory per thread (spills and stack arrays)
    shared_bytes: int          # Triton's dynamic shared memory
    hgmma: int                 # Hopper tensor-core instructions (wgmma in PTX)
    mma_sync: int              # pre-Hopper mma.sync (HMMA): no wgmma
    ldg: Dict[str, int]        # global loads by bytes per thread
    loop_ldg: Dict[str, int]   # those inside the GEMM loop (operand loads)
    cp_async: int              # LDGSTS (Ampere-style async copies)
    tma: int                   # UTMALDG (tensor-memory-accelerator copies)
    local: int                 # LDL + STL
    async_in_loop: bool        # an async copy (cp.async / TMA) inside a loop body
    async_before_loop: bool    # and one before it: the pipeline's prologue

    @property
    def pipelined(self) -> bool:
        return self.async_in_loop and self.async_before_loop

    def row(self) -> List[str]:
        widths = lambda d: " ".join(f"{w}:{n}" for w, n in sorted(d.items())) or "-"  # noqa
        return [self.kernel, self.config, str(self.regs), str(self.spill_bytes),
                str(self.shared_bytes), str(self.hgmma), str(self.mma_sync), widths(self.ldg),
                widths(self.loop_ldg), str(self.cp_async), str(self.tma), str(self.local),
                "yes" if self.pipelined else "no"]

    @property
    def narrow_operand_loads(self) -> int:
        """Global loads under 8 bytes a thread inside the GEMM loop."""
        return sum(n for w, n in self.loop_ldg.items() if w in ("1B", "2B", "4B"))


HEADER = ["kernel", "config", "regs", "spill B", "smem B", "HGMMA", "HMMA", "LDG widths",
          "LDG in loop", "LDGSTS", "UTMALDG", "LDL/STL", "pipelined"]


def _addresses(lines: List[str]):
    """The address of each SASS line (cuobjdump prints /*0a40*/ before each instruction)."""
    out, last = [], -1
    for line in lines:
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        last = int(m.group(1), 16) if m else last
        out.append(last)
    return out


def _gemm_loops(lines: List[str], addresses: List[int]):
    """(first, last) line ranges of the loops that hold a tensor-core instruction: a
    conditional branch back to an earlier address whose body contains HGMMA / HMMA (not
    the mbarrier spin loops, which hold no math, nor the unconditional jumps back from
    out-of-line code)."""
    line_of = {a: i for i, a in reversed(list(enumerate(addresses)))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"@!?U?P\w*\s+BRA\s+(?:`\()?0x([0-9a-f]+)", line)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < addresses[i] and target in line_of:
            body = lines[line_of[target]:i + 1]
            if any(re.search(r"\bH(G)?MMA\b", x) for x in body):
                loops.append((line_of[target], i))
    return loops


def inspect(compiled, kernel: str = "", config: str = "") -> Report:
    text = sass(compiled)
    lines = text.splitlines()
    ldg: Dict[str, int] = collections.Counter()
    counts: Dict[str, int] = collections.Counter()
    loops = _gemm_loops(lines, _addresses(lines))
    loop_ldg: Dict[str, int] = collections.Counter()
    async_lines = []
    for i, line in enumerate(lines):
        if re.search(r"\bHGMMA\b", line):
            counts["hgmma"] += 1
        if re.search(r"\bHMMA\b", line):
            counts["hmma"] += 1
        for m in _LOAD.finditer(line):
            op, suffix = m.group(1), m.group(2) or ""
            if op == "LDG":
                ldg[_load_width(op, suffix)] += 1
                if any(a <= i <= b for a, b in loops):
                    loop_ldg[_load_width(op, suffix)] += 1
            elif op in ("LDGSTS", "UTMALDG"):
                counts[op] += 1
                async_lines.append(i)
            elif op in ("LDL", "STL"):
                counts["local"] += 1
    in_loop = any(a <= i <= b for i in async_lines for a, b in loops)
    first_loop = min((a for a, _ in loops), default=len(lines))
    before = any(i < first_loop for i in async_lines)
    res = resources(compiled)
    return Report(kernel or compiled.name, config, res.get("reg", 0), res.get("local", 0)
                  + res.get("stack", 0), int(compiled.metadata.shared), counts["hgmma"],
                  counts["hmma"], dict(ldg), dict(loop_ldg), counts["LDGSTS"], counts["UTMALDG"],
                  counts["local"], in_loop, before)


def tickets(compiled) -> List[Dict[str, bool]]:
    """The fused finalizes' tickets (batch_stats.last_to_arrive) as the PTX has them: for
    each atomic, whether it is an acq_rel, gpu-scope add; whether one thread issues it (a
    predicate); and whether a bar.sync separates it from the partial stores before it
    (the last of any `st.global` or `bar.sync` before it is the barrier)."""
    code = [x.strip() for x in compiled.asm["ptx"].splitlines()]
    code = [x for x in code if x and not x.startswith((".loc", "//", "$L__"))]
    found = []
    for i, line in enumerate(code):
        if "atom." not in line:
            continue
        previous = next((x for x in reversed(code[:i]) if "bar.sync" in x or "st.global" in x),
                        "")
        found.append(dict(acq_rel_gpu=".gpu" in line and ".acq_rel" in line and ".add" in line,
                          one_thread=line.startswith("@%p"),
                          barrier_before="bar.sync" in previous))
    return found


def describe(launch: Launch) -> str:
    """The tile constexprs and options of a launch, for a table's config column."""
    constexprs = _named_constexprs(launch)
    tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK_")}
    parts = [f"{k[6:]}{v}" for k, v in tiles.items()]
    if launch.name == "conv_forward_kernel":  # which pass: conv_forward.MODE_*
        parts.insert(0, {0: "none", 1: "norm", 2: "stats", 3: "layer"}[constexprs["MODE"]])
        if constexprs.get("SAVE_MASK"):
            parts.insert(1, "+bits")
    if constexprs.get("HAS_ADDEND"):
        parts.insert(0, "+shortcut")
    parts += [f"w{launch.options.get('num_warps', 4)}", f"s{launch.options.get('num_stages', 3)}"]
    return " ".join(parts)


def _named_constexprs(launch: Launch) -> dict:
    names = launch.fn.arg_names
    out = {}
    for key, value in launch.constexprs.items():
        index = key[0] if isinstance(key, tuple) else key
        if isinstance(index, int):
            out[names[index]] = value
        else:
            out[index] = value
    return out


def constexpr(launch: Launch, name: str):
    return _named_constexprs(launch).get(name)


def markdown(reports: List[Report]) -> str:
    rows = [HEADER, ["---"] * len(HEADER)] + [r.row() for r in reports]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def unique(launches: List[Launch]) -> List[Launch]:
    """One launch per distinct compile (same kernel, signature, constants, options)."""
    seen, out = set(), []
    for launch in launches:
        key = (launch.name, repr(sorted(launch.signature.items())),
               repr(sorted(launch.constexprs.items(), key=repr)), repr(launch.attrs),
               repr(sorted(launch.options.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def run_captured(run: Callable[[], None], capability: int = 90,
                 distinct: bool = True) -> List[Launch]:
    with capture(capability) as launches:
        run()
    return unique(launches) if distinct else launches


@contextlib.contextmanager
def _candidate_tiles(index: Optional[int]):
    """Make the launchers use candidate `index` of tiling.candidate_configs (the tiles
    tuning.py may choose) instead of the heuristic; None leaves the heuristic."""
    from . import tiling
    if index is None:
        yield
        return
    originals = {name: getattr(tiling, name)
                 for name in ("forward_config", "dgrad_config", "wgrad_config")}
    problem = {"forward_config": lambda C_in, C_out, L: (C_out, L),
               "dgrad_config": lambda C_in, C_out, L: (C_in, L),
               "wgrad_config": lambda C_in, C_out, L: (C_out, C_in)}

    def picker(name):
        def config(C_in, C_out, L, dtype):
            base = originals[name](C_in, C_out, L, dtype)
            candidates = tiling.candidate_configs(base, *problem[name](C_in, C_out, L), dtype)
            return candidates[min(index, len(candidates) - 1)]
        return config

    try:
        for name in originals:
            setattr(tiling, name, picker(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(tiling, name, fn)


def training_step_launches(C: int, dtype, *, tf32: bool = True, B: int = 32, L: int = 4096,
                           K: int = 3, dilation: int = 1, residual: bool = True,
                           shortcut_grad: bool = False, candidate: Optional[int] = None,
                           distinct: bool = True) -> List[Launch]:
    """The launches of one training forward + backward of a stage at (B, C, L), as the
    backend issues them for real shapes; float32 with tf32 dots if `tf32`; with
    `candidate`, the GEMMs take that tuning candidate's tiles (tiling.candidate_configs);
    one per distinct compile, or every launch in order (distinct=False). A stage with a
    residual saves mask bits (stage 2 of a block); `shortcut_grad`: its data gradient adds
    the block's shortcut gradient, stage 2's grad_out under its mask bits (stage 1 of an
    identity block: ops.ResidualGradLink)."""
    import torch
    from ...conventions import mask_bits_shape
    from . import tiling
    from .. import triton as backend

    # Kernels do not run here: only shapes, dtypes and alignment matter.
    x = torch.zeros(B, C, L, dtype=dtype)
    w = torch.zeros(C, C, K, dtype=dtype)
    bias = torch.zeros(C, dtype=dtype)
    gamma, beta = torch.ones(C), torch.zeros(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    res = torch.zeros(B, C, L, dtype=dtype) if residual else None
    geometry = dict(stride=1, dilation=dilation, pad_left=(K - 1) * dilation, pad_right=0)
    previous = tiling.dot_precision
    if tf32:
        tiling.dot_precision = lambda dt, dev: "tf32"
    try:
        def run():
            out, saved, mask_bits, _, var = backend.forward(
                x, w, bias, gamma, beta, rm, rv, res, norm="train", eps=1e-5,
                momentum_factor=0.1, relu_before_add=False, save_for_backward=True, **geometry)
            backend.backward(torch.zeros_like(out), x, w, gamma, beta, saved, out, var,
                             has_bias=True, has_residual=residual, norm="train", eps=1e-5,
                             relu_before_add=False, mask_bits=mask_bits,
                             grad_x_addend=torch.zeros_like(x) if shortcut_grad else None,
                             grad_x_addend_bits=torch.zeros(mask_bits_shape(B, C, L),
                                                            dtype=torch.uint8)
                             if shortcut_grad else None, **geometry)
        with _candidate_tiles(candidate):
            return run_captured(run, distinct=distinct)
    finally:
        tiling.dot_precision = previous
