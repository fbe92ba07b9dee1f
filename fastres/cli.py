"""The `fastres` command: `fastres bench` (speed) and `fastres check` (correctness here).

    fastres bench                      default size: about a minute on a 2-core CPU
    fastres bench --full               the complete matrix (meant for a GPU)
    fastres bench --quick              a few seconds: smoke test of the whole pipeline
    fastres bench --only op,tcn-vs-rnn --dtype bf16 --device cuda --out results/
    fastres check [--device cuda]      every available backend vs the reference, then
                                       PyTorch's own conv1d (wrong upstream kernels are
                                       printed as such; they do not fail the check)
    fastres dispatch [--clear]         the backends measured per call signature on this machine
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional, Sequence

import torch

def _dtype_list(text: str) -> List[torch.dtype]:
    from fastres.bench.runner import parse_dtypes
    try:
        return parse_dtypes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _suite_list(text: str) -> List[str]:
    from fastres.bench.runner import SUITES
    names = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suite {unknown[0]!r} (choose from {', '.join(SUITES)})")
    if not names:
        raise argparse.ArgumentTypeError("no suite given")
    return [n for n in SUITES if n in names]     # run in the canonical order


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastres", description="Fused Conv1d + BatchNorm + ReLU (+ residual): "
        "benchmark it, or check it against the reference on this machine.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,check,dispatch}")
    sub.required = True

    bench = sub.add_parser("bench", help="time fastres against eager PyTorch and torch.compile",
                           description="Time fastres against eager PyTorch and torch.compile; "
                           "print tables and write JSON, markdown and a PNG.")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the complete matrix (sweeps, all dtypes, lengths up to 16384; for a GPU)")
    size.add_argument("--quick", action="store_true",
                      help="a tiny matrix in a few seconds, without torch.compile (smoke test)")
    bench.add_argument("--only", type=_suite_list, metavar="SUITES",
                       help="comma-separated suites: op, block, model, tcn-vs-rnn (default: all)")
    bench.add_argument("--dtype", type=_dtype_list, metavar="DTYPES",
                       help="comma-separated dtypes (default: float32 on CPU; float32,bfloat16 "
                       "on CUDA; --full adds float16)")
    bench.add_argument("--device", choices=["cpu", "cuda"],
                       help="default: cuda when available, else cpu")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="output folder (default: bench-results/)")
    bench.add_argument("--prefix", metavar="NAME",
                       help="file name stem (default: <device>-<UTC date>, e.g. cpu-2026-11-23)")
    bench.add_argument("--compile", dest="compile_mode", default="auto",
                       choices=["auto", "default", "max-autotune", "none"],
                       help="torch.compile mode of every compiled candidate (auto: the op "
                       "suite's stage max-autotune on CUDA, default on CPU; blocks and models "
                       "default mode, on CPU only with --full; nothing with --quick)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch CPU threads (default: torch's choice, usually all cores; "
                       "on a shared machine --threads 1 avoids oversubscription)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--reuse-dispatch-cache", action="store_true",
                       help="start from the dispatch choices stored by earlier processes "
                       "(default: every choice is measured afresh in this run and none is "
                       "stored, so a stale cache cannot skew the numbers)")

    check = sub.add_parser("check", help="every available backend vs the reference, here",
                           description="Run every available fastres backend against the float64 "
                           "reference on a fixed set of configurations (forward, gradients, "
                           "running statistics), then PyTorch's own conv1d over a grid of "
                           "geometries, printing any upstream kernel that is wrong here. Exit "
                           "status 1 if any fastres backend fails (a wrong PyTorch kernel "
                           "alone does not fail it).")
    check.add_argument("--device", choices=["cpu", "cuda"],
                       help="default: cuda when available, else cpu")
    check.add_argument("--backend", metavar="NAMES",
                       help="comma-separated backends to check (default: all available)")
    check.add_argument("--seed", type=int, metavar="N",
                       help="draw the inputs from seed N (default: fresh random inputs)")
    check.add_argument("--no-upstream", action="store_true",
                       help="skip checking PyTorch's own conv1d kernels")

    dispatch = sub.add_parser(
        "dispatch", help="which backend won each measured call signature here",
        description="List the dispatch choices measured on this machine (per device, call "
        "signature and software versions; see fastres.explain for a model's stages).")
    dispatch.add_argument("--device", choices=["cpu", "cuda"],
                          help="default: cuda when available, else cpu")
    dispatch.add_argument("--clear", action="store_true",
                          help="delete the stored choices (they are measured again on first use)")
    return parser


def _device(parser: argparse.ArgumentParser, name: Optional[str]) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here "
                     "(torch.cuda.is_available() is False)")
    return torch.device(name)


def _bench(parser, args) -> int:
    from fastres.bench import environment, report, runner

    device = _device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "full" if args.full else "quick" if args.quick else "default"
    settings = runner.make_settings(size, device, args.dtype, args.compile_mode, args.only)
    from fastres import dispatch
    previous = os.environ.get("FASTRES_DISPATCH_CACHE")
    if not args.reuse_dispatch_cache:
        os.environ["FASTRES_DISPATCH_CACHE"] = "0"
    dispatch.forget()
    try:
        results = runner.run(settings, progress=False if args.no_progress else None)
        results["dispatch"] = _dispatch_summary(dispatch.cache(), args.reuse_dispatch_cache)
    finally:
        if previous is None:
            os.environ.pop("FASTRES_DISPATCH_CACHE", None)
        else:
            os.environ["FASTRES_DISPATCH_CACHE"] = previous
        dispatch.forget()
    results["command"] = "fastres " + " ".join(args.argv)
    print(report.console_report(results))
    print(results["dispatch"]["summary"])
    prefix = args.prefix or (f"{environment.device_slug(device)}-"
                             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
                             + ("-quick" if size == "quick" else ""))
    paths = report.write_outputs(results, args.out, prefix)
    print("wrote " + ", ".join(paths.values()))
    failed = [(name, row["task"], row["impl"]) for name, suite in results["suites"].items()
              for row in suite["rows"] if row["status"] != "ok"]
    if failed:
        print(f"{len(failed)} candidate(s) failed to run; see the error cells above",
              file=sys.stderr)
    return 0


def _dispatch_summary(store, reused: bool) -> dict:
    """Where the run's dispatch choices came from, for the console and the JSON."""
    from fastres.dispatch.choice import CACHED, MEASURED
    choices = list(store.memory.values())
    cached = [c for c in choices if c.source == CACHED]
    measured = [c for c in choices if c.source == MEASURED]
    if not reused:
        summary = (f"dispatch: {len(measured)} choices measured in this run, the stored cache "
                   "neither read nor written (--reuse-dispatch-cache reads it)")
    else:
        when = sorted(str(c.provenance.get("measured_utc")) for c in cached)
        span = f", measured {when[0]} .. {when[-1]}" if when else ""
        summary = (f"dispatch: {len(cached)} choices came from the cache {store.path}{span}; "
                   f"{len(measured)} measured in this run")
    return {"reused_cache": reused, "cache_path": store.path, "from_cache": len(cached),
            "measured": len(measured), "summary": summary,
            "cached_measured_utc": sorted(str(c.provenance.get("measured_utc"))
                                          for c in cached)}


def _check(parser, args) -> int:
    from fastres import backends
    from fastres.bench.formatting import text_table
    from fastres.parity import check_plan, run_check

    device = _device(parser, args.device)
    names = None
    if args.backend:
        names = [n.strip() for n in args.backend.split(",") if n.strip()]
        for name in names:
            if name not in backends.names():
                parser.error(f"--backend: unknown backend {name!r} "
                             f"(known: {', '.join(backends.names())})")
            reason = backends.unavailable_reason(name)
            if reason is not None:
                parser.error(f"--backend: {name} is not available here: {reason}")
    if not check_plan(device.type, names):
        print(f"no available fastres backend runs on {device.type}", file=sys.stderr)
        return 1
    from tqdm.auto import tqdm
    results = run_check(device.type, names, seed=args.seed, progress=lambda plan: tqdm(
        plan, desc="fastres check", unit="case", leave=False))
    cells = [[r.backend, r.dtype, r.case, f"{r.max_error:.2e}" if r.errors else "-",
              r.worst or "-", f"{r.tol:.0e}", str(r.seed), "ok" if r.passed else "FAIL"]
             for r in results]
    print(f"fastres check on {device.type}: every backend vs the float64 reference "
          "(relative error ||a-b||/||b|| of output, gradients, running stats; fresh inputs "
          f"per case, --seed {results[0].seed if results else 0} repeats this run)")
    print(text_table(["backend", "dtype", "case", "max rel err", "worst", "tol", "seed",
                      "result"], cells))
    failures = [r for r in results if not r.passed]
    for r in failures:
        detail = r.error or ", ".join(f"{k}={v:.2e}" for k, v in r.errors.items() if not v < r.tol)
        print(f"FAIL {r.backend} {r.dtype} {r.case}: {detail}")
    print(f"{len(results) - len(failures)}/{len(results)} passed")
    if not args.no_upstream:
        _check_upstream(device, args.seed)
    return 1 if failures else 0


def _describe_key(key: str) -> str:
    """A stored choice's key in words: 'float32 B8 64->64 L1024 K3 d4 s1 pad 8,0 eval +res
    grad' for an op call, 'TemporalBlock 8x64x1024 float32 eval' for a module."""
    parts = key.split("|")
    if parts[0] == "module" and len(parts) >= 8:
        return f"{parts[1]} ({parts[2]}) {parts[5]} {parts[4]} {parts[6]}" + \
            (" +grad" if parts[7] == "grad1" else "")
    fields = {}
    for part in parts[1:]:
        for prefix in ("Cin", "Cout", "B", "L", "K", "s", "d", "p", "bias", "res", "rba", "grad"):
            if part.startswith(prefix) and part[len(prefix):][:1].isdigit():
                fields[prefix] = part[len(prefix):]
                break
        else:
            fields.setdefault("words", []).append(part)
    if not {"B", "Cin", "Cout", "L", "K"} <= set(fields):
        return key
    words = fields.get("words", [])  # the dtype, then the norm mode
    return (f"{words[0] if words else ''} B{fields['B']} {fields['Cin']}->{fields['Cout']} "
            f"L{fields['L']} K{fields['K']} d{fields.get('d', '?')} s{fields.get('s', '?')} "
            f"pad {fields.get('p', '?')} {' '.join(words[1:])}"
            + (" +res" if fields.get("res") == "1" else "")
            + (" +grad" if fields.get("grad") == "1" else ""))


def _check_upstream(device: torch.device, seed: Optional[int]) -> None:
    """PyTorch's own conv1d kernels: printed apart, never part of the exit status."""
    from fastres.parity import check_upstream

    results = check_upstream(device.type, seed=seed)
    wrong = [r for r in results if r.wrong]
    what = (f"PyTorch's own conv1d on {device.type} (float32 against float64: output, input, "
            f"weight and bias gradients; {len(results)} geometries, strided and widely "
            f"dilated among them)")
    if not wrong:
        print(f"\n{what}: right on every one")
        return
    print(f"\n{what}: wrong on {len(wrong)}")
    for r in wrong:
        for line in r.describe():
            print(line)
    print(f"These are PyTorch's kernels ({torch.__version__}), not fastres's: they do not "
          "change this command's exit status, and fastres routes around the ones it knows "
          "(fastres/upstream_kernels.py; the backends above are checked on such geometries "
          "too). To report them upstream: python benchmarks/upstream_conv1d_wgrad.py")


def _dispatch(parser, args) -> int:
    import os

    from fastres import dispatch
    from fastres.dispatch.cache import read_file

    device = str(_device(parser, args.device))
    store = dispatch.cache()
    if store.path is None:
        print("FASTRES_DISPATCH_CACHE=0: choices are kept in memory only, nothing is stored")
        return 0
    current = store.file_for(device)
    # One file per device, thread count and software versions; list them all.
    paths = store.files(device.split(":")[0])
    if args.clear:
        for path in paths:
            for stale in (path, path + ".lock"):
                if os.path.exists(stale):
                    os.remove(stale)
        print(f"cleared {len(paths)} file(s) in {store.path}")
        return 0
    if not paths:
        print(f"no dispatch choices stored for {device} in {store.path} yet: "
              "calls are measured on first use, or with fastres.autotune")
    for path in paths:
        mark = " (this process's settings)" if path == current else ""
        doc, entries, problem = read_file(path)
        print(f"{path}{mark}")
        if problem is not None:
            print(f"  ignored by fastres: {problem}" if doc is None else f"  {problem}")
            if doc is None:
                continue
        print(f"  {doc.get('device')}, {doc.get('threads')} threads, " + ", ".join(
            f"{k} {v}" for k, v in (doc.get("versions") or {}).items()))
        for key, choice in sorted(entries.items()):
            print(f"  {_describe_key(key)}\n      runs {choice.name}: {choice.why()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "bench":
        return _bench(parser, args)
    if args.command == "dispatch":
        return _dispatch(parser, args)
    return _check(parser, args)


if __name__ == "__main__":
    sys.exit(main())
