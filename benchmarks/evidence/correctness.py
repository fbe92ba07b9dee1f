"""Sections 3 (`fastres check` on the device) and 4 (parity at realistic shapes).

Both judge every kernel backend against the float64 reference through fastres.parity, which
draws the inputs, poisons every output with NaN before the kernels write it, and measures
||out - ref|| / ||ref|| for the output, every gradient and the running statistics.

Section 4 runs the kernels at the sizes they are meant for, with their default tiles: a
fixed list of configurations spanning C 64-512, K 2-7, dilation up to 64, ragged lengths,
B up to 256, L up to 16k, stride 2, every norm mode, residual kind and ReLU placement, then
random configurations while its budget lasts; each in bf16, fp16, TF32 and strict fp32, with
its own seed. Activations are kept to about 2M elements per tensor (B*C*L), so that the
float64 reference and the host-side error computation take milliseconds, not seconds.
Before that, a bitwise repeat: the same inputs twice must give identical bits for the output,
every gradient and the running statistics.

The smoke run (CPU) shrinks the same configurations and runs the kernel backends that run
on CPU tensors (Triton in its interpreter, the C++ kernels); TF32 there is skipped: no GPU.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Dict, List, Optional, Tuple

import torch

from fastres import backends, parity
from fastres.parity import CHECK_CASES, NONFINITE_CASES, TF32_TOLERANCE, TOLERANCE, Case

from .context import SPENT, Context, tf32_convs
from .results import Section, error_text

P = Case
# (label, configuration). Activations stay near 2M elements per tensor (see the docstring).
FIXED_CASES: List[Tuple[str, Case]] = [
    ("TCN stage + identity", P(B=32, C_in=64, C_out=64, L=1000, K=3, dilation=1,
                               residual="identity")),
    ("d16, tensor residual, relu before add",
     P(B=16, C_in=128, C_out=128, L=999, K=3, dilation=16, residual="tensor",
       relu_before_add=True)),
    ("C256 d4", P(B=8, C_in=256, C_out=256, L=1023, K=3, dilation=4)),
    ("C512 + identity", P(B=4, C_in=512, C_out=512, L=1000, K=3, dilation=2,
                          residual="identity")),
    ("B256 K5 d8 + tensor", P(B=256, C_in=64, C_out=64, L=123, K=5, dilation=8,
                              residual="tensor")),
    ("L16k K7 d64 + identity", P(B=2, C_in=64, C_out=64, L=16384, K=7, dilation=64,
                                 residual="identity")),
    ("L16001 C96 K2 d32 + tensor", P(B=1, C_in=96, C_out=96, L=16001, K=2, dilation=32,
                                     residual="tensor")),
    ("ResNet downsample, same s2", P(B=16, C_in=64, C_out=128, L=1001, K=3, stride=2,
                                     padding="same")),
    ("ResNet projection, same s2 + tensor",
     P(B=8, C_in=128, C_out=256, L=1023, K=3, stride=2, padding="same", residual="tensor")),
    ("eval d16 + identity", P(B=32, C_in=128, C_out=128, L=500, K=3, dilation=16,
                              residual="identity", norm="eval")),
    ("eval same K5, tensor, relu before add",
     P(B=8, C_in=256, C_out=256, L=777, K=5, dilation=2, padding="same", residual="tensor",
       norm="eval", relu_before_add=True)),
    ("eval C512 K7 same s2", P(B=4, C_in=512, C_out=512, L=999, K=7, stride=2, padding="same",
                               norm="eval")),
    ("no norm d8, identity, relu before add",
     P(B=16, C_in=128, C_out=128, L=1000, K=3, dilation=8, residual="identity", norm="none",
       relu_before_add=True)),
    ("no norm C64->96 K2 d64 + tensor", P(B=8, C_in=64, C_out=96, L=1500, K=2, dilation=64,
                                          residual="tensor", norm="none")),
    ("no bias, no affine, momentum=None",
     P(B=16, C_in=128, C_out=128, L=1000, K=3, dilation=4, residual="identity", bias=False,
       affine=False, momentum=None)),
    ("B128 d32, identity, relu before add",
     P(B=128, C_in=64, C_out=64, L=250, K=3, dilation=32, residual="identity",
       relu_before_add=True)),
    ("B1 L8191 C256", P(B=1, C_in=256, C_out=256, L=8191, K=3)),
    ("C64->256 K2", P(B=16, C_in=64, C_out=256, L=500, K=2)),
    ("C100 K4 d3 same", P(B=32, C_in=100, C_out=100, L=601, K=4, dilation=3, padding="same")),
    ("C384 d8, tensor, relu before add",
     P(B=8, C_in=384, C_out=384, L=680, K=3, dilation=8, residual="tensor",
       relu_before_add=True)),
    ("eval C80 K6 d5 + identity", P(B=48, C_in=80, C_out=80, L=511, K=6, dilation=5,
                                    residual="identity", norm="eval")),
    ("causal s2 d2", P(B=16, C_in=128, C_out=128, L=1001, K=3, dilation=2, stride=2)),
    ("C512 d64 + identity", P(B=2, C_in=512, C_out=512, L=2047, K=3, dilation=64,
                              residual="identity")),
    ("no norm C256->128 K5 same s2, relu before add",
     P(B=8, C_in=256, C_out=128, L=1000, K=5, stride=2, padding="same", norm="none",
       relu_before_add=True)),
]

# The configurations of the bitwise repeat (indices into FIXED_CASES) and their dtypes.
REPEAT_CASES = (0, 1)
REPEAT_DTYPES = ("bfloat16", "float32")

# label -> (dtype, TF32 convs on); the order they run in.
DTYPES: Dict[str, Tuple[torch.dtype, bool]] = {
    "bfloat16": (torch.bfloat16, False), "float16": (torch.float16, False),
    "tf32": (torch.float32, True), "float32": (torch.float32, False),
}

ELEMENTS = 2_000_000      # target B * C * L of a random configuration
MAX_RANDOM_CASES = 40


def describe(case: Case) -> str:
    """A compact configuration string for tables."""
    flags = [f"res={case.residual}", f"norm={case.norm}"]
    if case.relu_before_add:
        flags.append("relu-before-add")
    if not case.bias:
        flags.append("no-bias")
    if not case.affine:
        flags.append("no-affine")
    if case.momentum is None:
        flags.append("momentum=None")
    return (f"B{case.B} C{case.C_in}->{case.C_out} L{case.L} K{case.K} d{case.dilation} "
            f"s{case.stride} {case.padding} " + " ".join(flags))


def random_case(rng: random.Random, elements: int = ELEMENTS) -> Case:
    """A random valid configuration within the section's ranges, about `elements` big."""
    while True:
        c_in = rng.choice([64, 96, 128, 192, 256, 384, 512])
        stride = rng.choice([1, 1, 2])
        residual = rng.choice(["none", "tensor"] + (["identity"] if stride == 1 else []))
        c_out = c_in if residual == "identity" else rng.choice([c_in, 64, 128, 256])
        length = rng.randint(100, 16384)
        case = Case(
            B=max(1, min(256, elements // (max(c_in, c_out) * length))), C_in=c_in, C_out=c_out,
            L=length, K=rng.randint(2, 7), dilation=rng.choice([1, 2, 4, 8, 16, 32, 64]),
            stride=stride, padding=rng.choice(["causal", "same"]), residual=residual,
            norm=rng.choice(["train", "train", "eval", "none"]),
            bias=rng.random() < 0.8, affine=rng.random() < 0.8,
            relu_before_add=rng.random() < 0.3, momentum=rng.choice([0.1, 0.1, None]))
        if case.L_out >= 1 and case.B * case.L_out > 1:
            return case


def shrink(case: Case) -> Case:
    """The smoke-run version of a configuration: same structure, a few dozen elements."""
    c_in = min(case.C_in, 8)
    c_out = c_in if case.residual == "identity" else min(case.C_out, 12)
    return dataclasses.replace(case, B=min(case.B, 2), C_in=c_in, C_out=c_out,
                               L=min(case.L, 37), dilation=min(case.dilation, 4))


def _dtype_labels(ctx: Context, section: Section) -> List[str]:
    if ctx.cuda:
        return list(DTYPES)
    section.skip("TF32 (float32 with TF32 convs)", "skipped: no GPU")
    return [label for label in DTYPES if label != "tf32"]


# --------------------------------------------------------------------------- section 3


def run_check(ctx: Context, section: Section) -> None:
    """fastres.parity.run_check on this device, one (backend, case) at a time so that the
    budget can stop it between cases. Cases go in the outer loop and backends in the inner
    one, so a run cut short by its budget still has rows of every backend; a sharded run
    (ctx.shard) takes every n-th (case, backend) pair."""
    device = ctx.device.type
    names = [n for n in backends.available_backends() if device in backends.get(n).devices]
    every = {**CHECK_CASES, **NONFINITE_CASES}
    cases = every if ctx.cuda else dict(list(CHECK_CASES.items())[:1])
    section.data.update(device=device, backends=names, cases={k: str(v) for k, v in cases.items()},
                        results=[])
    table = section.table("", ["backend", "dtype", "case", "max rel err", "worst", "tol",
                               "result"])
    items = [(name, case_name) for case_name in cases for name in names]
    for index, (name, case_name) in enumerate(items):
        if not ctx.mine(index):
            continue
        if ctx.budget.spent():
            section.skip(f"{name} {case_name}", SPENT)
            continue
        for r in parity.run_check(device, [name], {case_name: cases[case_name]}):
            section.data["results"].append(
                {"backend": r.backend, "dtype": r.dtype, "case": r.case, "errors": r.errors,
                 "max_error": r.max_error if r.errors else None, "worst": r.worst,
                 "tol": r.tol, "passed": r.passed, "error": r.error})
            table.add(r.backend, r.dtype, r.case,
                      f"{r.max_error:.2e}" if r.errors else "-", r.worst or r.error or "-",
                      f"{r.tol:.0e}", "ok" if r.passed else "FAIL")
        ctx.flush()
    if ctx.whole:
        summarize_check(section)


def summarize_check(section: Section) -> None:
    """Totals and failures of the check section (after its shards are merged)."""
    results = section.data.get("results", [])
    passed = sum(r["passed"] for r in results)
    section.data.update(passed=passed, total=len(results))
    per_backend = {}
    for r in results:
        ok, total = per_backend.get(r["backend"], (0, 0))
        per_backend[r["backend"]] = (ok + r["passed"], total + 1)
    section.notes.insert(0, f"{passed}/{len(results)} passed (" + ", ".join(
        f"{name} {ok}/{total}" for name, (ok, total) in per_backend.items()) + ")")
    missing = [n for n in section.data.get("backends", []) if n not in per_backend]
    if missing:
        section.notes.append("NO rows for backend(s) " + ", ".join(missing))
    for r in results:
        if not r["passed"]:
            section.notes.append(f"FAIL {r['backend']} {r['dtype']} {r['case']}: "
                                 f"{r['error'] or r['errors']}")


# --------------------------------------------------------------------------- section 4


def same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Identical bits (NaN included), same shape and dtype; two Nones are the same."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.detach().contiguous().view(ints), b.detach().contiguous().view(ints))


def repeat_differences(case: Case, backend: str, dtype: torch.dtype, device: str,
                       seed: int) -> List[str]:
    """Run the same inputs twice on `backend`: the names of the results whose bits differ."""
    inputs = parity.make_inputs(case, dtype, device, seed)
    first = parity.run_backend(case, inputs, dtype, backend)
    second = parity.run_backend(case, inputs, dtype, backend)
    named = lambda run: {"out": run[0], "running_mean": run[2], "running_var": run[3],  # noqa
                         **{"grad_" + k: v for k, v in run[1].items()}}
    a, b = named(first), named(second)
    return [name for name in a if not same_bits(a[name], b[name])]


def _bitwise_repeat(ctx: Context, section: Section, kernels: List[str], cases) -> None:
    rows = section.data["bitwise_repeat"] = []
    table = section.table("Bitwise repeat: the same inputs twice",
                          ["configuration", "backend", "dtype", "result"])
    for index in REPEAT_CASES if ctx.cuda else REPEAT_CASES[:1]:
        label, case = cases[index]
        for dtype_label in REPEAT_DTYPES:
            dtype, tf32 = DTYPES[dtype_label]
            for backend in kernels:
                if ctx.budget.spent():
                    section.skip(f"bitwise repeat {label} {backend} {dtype_label}", SPENT)
                    continue
                try:
                    with tf32_convs(tf32):
                        differ = repeat_differences(case, backend, dtype, ctx.device.type,
                                                    seed=100 + index)
                    result = "identical" if not differ else "DIFFERENT: " + ", ".join(differ)
                except Exception as exc:  # noqa: BLE001 - a failure is a row, not a crash
                    differ, result = None, "error: " + error_text(exc)
                rows.append({"case": label, "config": describe(case), "backend": backend,
                             "dtype": dtype_label, "identical": differ == [],
                             "differ": differ, "result": result})
                table.add(f"{label}: {describe(case)}", backend, dtype_label, result)
    ctx.flush()


def _parity_rows(ctx: Context, section: Section, table, label: str, case: Case, seed: int,
                 kernels: List[str], dtype_labels: List[str]) -> None:
    for offset, dtype_label in enumerate(dtype_labels):
        dtype, tf32 = DTYPES[dtype_label]
        tol = TF32_TOLERANCE if tf32 else TOLERANCE[dtype]
        for backend in kernels:
            row = {"case": label, "config": dataclasses.asdict(case), "backend": backend,
                   "dtype": dtype_label, "seed": seed + offset, "tol": tol}
            try:
                with tf32_convs(tf32):
                    errors = parity.parity_errors(case, backend, dtype, ctx.device.type,
                                                  seed + offset)
                worst = max(errors, key=errors.get)
                row.update(errors=errors, worst=worst, max_error=errors[worst],
                           passed=errors[worst] < tol)
                shown = f"{errors[worst]:.2e}"
            except Exception as exc:  # noqa: BLE001 - a failure is a row, not a crash
                row.update(errors={}, worst=None, max_error=None, passed=False,
                           error=error_text(exc))
                worst, shown = row["error"], "-"
            section.data["cases"].append(row)
            table.add(label, describe(case), backend, dtype_label, seed + offset, worst, shown,
                      f"{tol:.0e}", "ok" if row["passed"] else "FAIL")


def triton_tiles() -> Dict[str, object]:
    """The tile limits the Triton backend ships with (tests shrink them; this run does not)."""
    if backends.unavailable_reason("triton") is not None:
        return {}
    from fastres.backends.triton import tiling
    return {k: v for k, v in vars(tiling).items() if k.isupper() and isinstance(v, (int, bool))}


def run_parity(ctx: Context, section: Section) -> None:
    kernels = ctx.kernel_backends()
    if not kernels:
        raise RuntimeError("no fused kernel backend runs on this device")
    dtype_labels = _dtype_labels(ctx, section)
    fixed = FIXED_CASES if ctx.cuda else [(label, shrink(c)) for label, c in FIXED_CASES[:2]]
    n_random = MAX_RANDOM_CASES if ctx.cuda else 1
    section.data.update(backends=kernels, dtypes=dtype_labels, cases=[], tiles=triton_tiles())
    section.notes.append(f"backends {', '.join(kernels)}; Triton's default tiles "
                         + ", ".join(f"{k}={v}" for k, v in section.data["tiles"].items()))

    if ctx.shard[0] == 0:
        _bitwise_repeat(ctx, section, kernels, fixed)

    table = section.table("Parity against the float64 reference (worst quantity per run)",
                          ["case", "configuration", "backend", "dtype", "seed", "worst",
                           "rel err", "bound", "result"])
    rng = random.Random(2026)
    durations: List[float] = []
    plan = [(label, case) for label, case in fixed]
    for i in range(n_random):
        case = random_case(rng)
        plan.append((f"random {i + 1}", case if ctx.cuda else shrink(case)))
    for index, (label, case) in enumerate(ctx.progress(plan, "parity")):
        if not ctx.mine(index):
            continue
        # Start a case only if a case like the ones so far still fits in the budget.
        typical = sorted(durations)[len(durations) // 2] if durations else 0.0
        if ctx.budget.spent(typical):
            section.skip(f"{label} ({describe(case)})", SPENT)
            continue
        started = time.perf_counter()
        _parity_rows(ctx, section, table, label, case, seed=1000 + 10 * index, kernels=kernels,
                     dtype_labels=dtype_labels)
        durations.append(time.perf_counter() - started)
        ctx.flush()

    section.data["configurations"] = [len(durations)]   # a list: shards' counts add up
    if ctx.whole:
        summarize_parity(section)


def summarize_parity(section: Section) -> None:
    """Totals and failures of the parity section (after its shards are merged)."""
    rows = section.data.get("cases", [])
    passed = sum(r["passed"] for r in rows)
    repeats = section.data.get("bitwise_repeat", [])
    identical = sum(r["identical"] for r in repeats)
    configurations = section.data.get("configurations", 0)
    if isinstance(configurations, list):
        configurations = sum(configurations)
    section.data.update(passed=passed, total=len(rows), repeat_identical=identical,
                        repeat_total=len(repeats), configurations=configurations)
    per_backend = {}
    for r in rows:
        ok, total = per_backend.get(r["backend"], (0, 0))
        per_backend[r["backend"]] = (ok + r["passed"], total + 1)
    section.notes.insert(0, f"parity {passed}/{len(rows)} runs within bounds over "
                         f"{configurations} configurations (" + ", ".join(
                             f"{name} {ok}/{total}" for name, (ok, total) in per_backend.items())
                         + f"); bitwise repeat {identical}/{len(repeats)} identical")
    for r in rows:
        if not r["passed"]:
            section.notes.append(f"FAIL {r['case']} {r['backend']} {r['dtype']}: "
                                 f"{r.get('error') or r['errors']}")
    for r in repeats:
        if not r["identical"]:
            section.notes.append(f"NOT REPEATABLE {r['case']} {r['backend']} {r['dtype']}: "
                                 f"{r['result']}")


# What the parent process runs on a sharded section once its shards are merged.
SUMMARIZE = {"check": summarize_check, "parity": summarize_parity}


def failures(section: Section) -> int:
    """How many checked rows failed (check, parity and its bitwise repeat)."""
    data = section.data
    failed = data.get("total", 0) - data.get("passed", 0)
    return failed + data.get("repeat_total", 0) - data.get("repeat_identical", 0)
