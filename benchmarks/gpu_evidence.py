"""Every GPU claim of fastres, measured in one run of at most 9 minutes.

    bash benchmarks/gpu_evidence.sh OUT_DIR              # on a GPU: build, then this script
    PYTHONPATH=$PWD python benchmarks/gpu_evidence.py --out OUT_DIR [--deadline EPOCH]
    PYTHONPATH=$PWD python benchmarks/gpu_evidence.py --smoke --out /tmp/ev   # CPU, < 1 min

Sections (benchmarks/evidence/ holds one module per theme):
     1 environment      GPU, clocks (read-only nvidia-smi), versions, TF32 settings, backends
     2 ceilings         device copy GB/s and bf16 matmul TFLOP/s, measured
     3 check            `fastres check` (fastres.parity.run_check) on the device
     4 parity           realistic shapes, default tiles, 4 precisions, bitwise repeat
     5 timings          op, TemporalBlock and TemporalConvNet vs eager and torch.compile
     6 profile          per-kernel device time of a TemporalBlock train step
     7 triton           registers, spills, shared memory, SASS mix of fastres's Triton kernels
     8 launch           CUDA-graph replay against plain launches at small shapes
     9 memory           peak memory of a TemporalConvNet train step
    10 streaming        fastres.stream step latency, with and without a CUDA graph
then the goals table and the PNG. Files: <device>-<date>-evidence.json/.md/.png in OUT_DIR,
rewritten after every section so that a run cut short keeps what it measured.

Time: the run ends by --deadline (epoch seconds; the wrapper passes its start + 9 minutes).
Each section gets its nominal budget, or a proportional share of what is left when the run
is late; anything that does not fit is recorded as skipped, with why. Every section runs in
try/except: an exception is recorded (type, message, traceback tail) and the run goes on.
Exit status 1 if any section ended in an error, else 0.

--smoke runs every section on the CPU with tiny shapes, Triton in its interpreter, CPU
clocks instead of CUDA events, and records what only a GPU has (CUDA graphs, allocator
counters, nvidia-smi) as "skipped: no GPU"; tests/bench/test_gpu_evidence.py runs it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from typing import List, Optional, Sequence

# (key, title, nominal seconds on a GPU, in the smoke run). Sum on a GPU: 430 s, which with
# the build (about 1-1.5 min) and start-up fits the 9 minutes.
SECTIONS = [
    ("environment", "1. Environment", 10, 5),
    ("ceilings", "2. Measured ceilings", 10, 5),
    ("check", "3. fastres check on every CUDA backend", 50, 10),
    ("parity", "4. Parity at realistic shapes with the default tiles", 100, 15),
    ("timings", "5. Timings against eager PyTorch and torch.compile", 170, 20),
    ("profile", "6. Where the time goes (per-kernel device time)", 15, 5),
    ("triton", "7. Triton metadata from the device's own compile", 20, 20),
    ("launch", "8. Launch overhead: CUDA-graph replay against plain launches", 25, 5),
    ("memory", "9. Peak memory of a TemporalConvNet train step", 15, 5),
    ("streaming", "10. Streaming step latency", 15, 5),
]
RUN_SECONDS = {"gpu": 540, "smoke": 150}   # default deadline from the start of the script
RESERVE_S = 10                              # kept back for the summary and the PNG


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    keys = [key for key, *_ in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--smoke", action="store_true",
                        help="every section on the CPU, tiny shapes, Triton interpreted")
    parser.add_argument("--deadline", type=float, metavar="EPOCH",
                        help="epoch seconds by which everything is written (default: start + "
                        "540 s on a GPU, + 150 s for --smoke)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="comma-separated sections to run: " + ",".join(keys))
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time torch.compile(mode='max-autotune') (minutes per workload)")
    parser.add_argument("--build-log", metavar="PATH", help="the extension build's log (wrapper)")
    parser.add_argument("--build-status", type=int, help="the build's exit status (wrapper)")
    parser.add_argument("--build-seconds", type=float, help="the build's duration (wrapper)")
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else keys
    unknown = [k for k in args.only if k not in keys]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(keys)})")
    return args


def build_record(args: argparse.Namespace) -> dict:
    """How the wrapper's in-place build went, and whether the extension loads."""
    from fastres import _ext

    record = {"seconds": args.build_seconds, "exit_status": args.build_status,
              "extension_load_error": _ext.load_error(),
              "compiled_with_cuda": _ext.compiled_with_cuda(), "log_tail": None}
    if args.build_log and os.path.exists(args.build_log):
        with open(args.build_log, errors="replace") as f:
            record["log_tail"] = "".join(f.readlines()[-25:])
    loads = record["extension_load_error"] is None
    if args.build_seconds is None:
        ran = "not built by this run"
    else:
        ran = f"build ran {args.build_seconds:.0f} s, exit status {args.build_status}"
    state = ("fastres._C loads" + (" with CUDA kernels" if record["compiled_with_cuda"]
                                   else " without CUDA kernels (no cuda backend)")
             if loads else "fastres._C does NOT load: this run continues without the extension "
             "(no cuda backend)")
    record["summary"] = f"{ran}; {state}"
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "gpu"
    if args.smoke:
        # Read when fastres's Triton kernels are decorated: set before importing fastres.
        os.environ["TRITON_INTERPRET"] = "1"
    deadline = (args.deadline or started + RUN_SECONDS[mode]) - RESERVE_S

    import torch
    if args.smoke:
        # One thread: tiny shapes gain nothing from more, and a busy CI machine's cores are
        # not spun on by idle OpenMP workers.
        torch.set_num_threads(1)

    from evidence import (context, correctness, environment, memory_stream, profiling, speed,
                          triton_meta)
    from evidence.results import ERROR, RUNNING, SKIPPED, EvidenceWriter, Section
    from fastres.bench.environment import device_name, device_slug

    runners = {
        "environment": environment.run_environment, "ceilings": environment.run_ceilings,
        "check": correctness.run_check, "parity": correctness.run_parity,
        "timings": speed.run_timings, "profile": profiling.run_profile,
        "triton": triton_meta.run_triton_meta, "launch": speed.run_launch_overhead,
        "memory": memory_stream.run_memory, "streaming": memory_stream.run_streaming,
    }
    have_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if have_gpu else "cpu")
    sections = [Section(key, title, smoke_s if args.smoke else gpu_s)
                for key, title, gpu_s, smoke_s in SECTIONS]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    prefix = f"{device_slug(device)}-{date}-evidence" + ("-smoke" if args.smoke else "")
    writer = EvidenceWriter(args.out, prefix, {
        "mode": mode,
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "device": {"type": device.type, "name": device_name(device),
                   "slug": device_slug(device)},
        "versions": environment.versions(), "commit": environment.commit(),
        "build": build_record(args),
        "deadline": {"epoch": deadline + RESERVE_S,
                     "utc": datetime.datetime.fromtimestamp(
                         deadline + RESERVE_S, datetime.timezone.utc).isoformat(),
                     "nominal_s": {s.key: s.nominal_s for s in sections}},
    }, sections)
    ctx = context.Context(
        device=device, smoke=args.smoke,
        timing=context.SMOKE_TIMING if args.smoke else context.GPU_TIMING,
        host_calls=2 if args.smoke else 15, max_autotune=args.max_autotune,
        flush=lambda: writer.flush(force=False))
    writer.flush()

    def say(text: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {text}", flush=True)

    say(f"fastres GPU evidence ({mode}) on {device_name(device)} -> {writer.paths['json']}")
    selected = [s for s in sections if s.key in args.only]
    for section in sections:
        if section not in selected:
            section.status, section.reason = SKIPPED, "not selected (--only)"
            continue
        if not have_gpu and not args.smoke and section.key != "environment":
            section.status = SKIPPED
            section.reason = "no CUDA device visible (torch.cuda.is_available() is False)"
            continue
        rest = sum(s.nominal_s for s in selected[selected.index(section):])
        budget = context.section_budget(section.nominal_s, deadline - time.time(), rest)
        if budget <= 0:
            section.status, section.reason = SKIPPED, "the run's deadline was reached"
            writer.flush()
            continue
        section.status, section.budget_s = RUNNING, budget
        ctx.budget = context.Budget(budget, deadline)
        writer.flush()
        run_section(runners[section.key], ctx, section)
        writer.flush()
        say(f"{section.title}: {section.status}" + (f" ({section.reason})" if section.reason
                                                     else ""))
    finish(writer, say)
    errors: List[str] = [s.key for s in sections if s.status == ERROR]
    if errors:
        say(f"sections with errors: {', '.join(errors)}")
    return 1 if errors else 0


def run_section(run, ctx, section) -> None:
    """Run one section; its outcome (or exception) becomes the record's status."""
    from evidence.results import (OK, PARTIAL, SKIPPED, UNAVAILABLE, SectionSkipped,
                                  SectionUnavailable)

    started = time.perf_counter()
    try:
        run(ctx, section)
        section.status = PARTIAL if section.skipped else OK
        if section.skipped:
            section.reason = f"{len(section.skipped)} item(s) not run, listed below"
    except SectionSkipped as exc:
        section.status, section.reason = SKIPPED, str(exc)
    except SectionUnavailable as exc:
        section.status, section.reason = UNAVAILABLE, str(exc)
    except Exception as exc:  # noqa: BLE001 - record it, go on with the next section
        section.record_error(exc)
    section.wall_s = time.perf_counter() - started


def finish(writer, say) -> None:
    """The goals summary and the PNG, each of which may fail without losing the rest."""
    from evidence import goals, plot

    try:
        writer.document["summary"] = goals.summarize(writer.snapshot())
        for goal in writer.document["summary"]["goals"]:
            say(f"goal: {goal['goal']}: {goal['measured_text']} ({goal['target_text']}) "
                f"{goal['status']}")
    except Exception as exc:  # noqa: BLE001 - the sections' results stand without it
        writer.document["summary_error"] = f"{type(exc).__name__}: {exc}"
        say(f"no goals summary: {writer.document['summary_error']}")
    writer.flush()
    try:
        png = plot.write_png(writer.snapshot(), writer.paths["png"])
    except Exception as exc:  # noqa: BLE001 - the JSON and markdown stand without it
        png = None
        say(f"no PNG: {type(exc).__name__}: {exc}")
    if png is None:
        writer.document["files"].pop("png", None)
        writer.flush()
    say("wrote " + ", ".join(path for kind, path in writer.paths.items()
                             if kind != "png" or png))


if __name__ == "__main__":
    sys.exit(main())
