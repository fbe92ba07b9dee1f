"""Every GPU claim of fastres, measured in one command of at most 10 minutes.

    bash benchmarks/gpu_evidence.sh OUT_DIR              # on a GPU: build, then this script
    bash benchmarks/gpu_evidence.sh --smoke OUT_DIR      # the same on the CPU, tiny shapes
    PYTHONPATH=$PWD python benchmarks/gpu_evidence.py --out OUT_DIR [--deadline EPOCH]

Sections (benchmarks/evidence/ holds one module per theme):
     1 environment      GPU, clocks (read-only nvidia-smi), versions, TF32 settings, backends
     2 ceilings         device copy GB/s and bf16 matmul TFLOP/s, measured
     3 check            `fastres check` (fastres.parity.run_check) on the device, every backend
     4 parity           realistic shapes, default tiles, 4 precisions, bitwise repeat
     5 timings          op, TemporalBlock and TemporalConvNet vs eager and torch.compile
     6 profile          per-kernel device time of a TemporalBlock train step
     7 triton           registers, spills, shared memory, SASS mix of fastres's Triton kernels
     8 launch           CUDA-graph replay against plain launches at small shapes
     9 memory           peak memory of a TemporalConvNet train step
    10 streaming        fastres.stream step latency, with and without a CUDA graph
then the goals table and the PNG. Files: <device>-<date>-evidence.json/.md/.png in OUT_DIR,
rewritten every few seconds, so that a run cut short keeps what it measured; sections/
holds each process's own record and log.

Isolation: every section runs in processes of its own (this script with --child), each with
a hard timeout (its budget plus a grace for start-up and the item in flight, never past the
deadline), killed with its process group when it passes it. A hang, a CUDA fault (which
poisons the CUDA context of the process it happens in) or a crash costs that section only:
it is recorded as an error with what its process wrote before (records are flushed as items
finish), the tail of its log, and the next section starts in a fresh process.

Compiles: on a GPU, Triton compiles its kernels per configuration (about 1.5 s each, most of
the first call). Sections 3 and 4 only judge correctness, so they run as --jobs shards in
parallel (16 on the 16-core GPU machine), which compiles in parallel too; section 5 first
calls each candidate once in --jobs parallel shards (nothing timed), which leaves the
compiled kernels in Triton's and inductor's on-disk caches, then times alone on the device.

Time: the run ends by --deadline (epoch seconds; the wrapper passes its start + 9 minutes).
Each section gets its nominal budget, or a proportional share of what is left when the run
is late; anything that does not fit is recorded as skipped, with why.

Honesty: a section's status is ok, partial (items left out), skipped, unavailable, failed
(it ran and something it checks failed: a parity row over its bound, a timing that raised)
or error (the section broke). The console prints each with its first note; the exit status
is 1 if any section failed or ended in an error, else 0.

--smoke runs every section on the CPU with tiny shapes, CUDA hidden (CUDA_VISIBLE_DEVICES=""
even on a GPU machine), Triton in its interpreter, CPU clocks instead of CUDA events, and
records what only a GPU has (CUDA graphs, allocator counters, nvidia-smi) as "skipped: no
GPU"; tests/bench/test_gpu_evidence.py runs it. FASTRES_EVIDENCE_INJECT="KEY:MODE,..." (MODE
raise, abort or hang) makes a section's process fail on purpose: the test of isolation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

# (key, title, nominal seconds on a GPU, in the smoke run). Sum on a GPU: 395 s, which with
# the build (about 1-1.5 min), the processes' start-up and the reserve fits the 9 minutes.
SECTIONS = [
    ("environment", "1. Environment", 15, 5),
    ("ceilings", "2. Measured ceilings", 10, 5),
    ("check", "3. fastres check on every CUDA backend", 45, 10),
    ("parity", "4. Parity at realistic shapes with the default tiles", 90, 15),
    ("timings", "5. Timings against eager PyTorch and torch.compile", 150, 20),
    ("profile", "6. Where the time goes (per-kernel device time)", 15, 5),
    ("triton", "7. Triton metadata from the device's own compile", 20, 60),
    ("launch", "8. Launch overhead: CUDA-graph replay against plain launches", 20, 5),
    ("memory", "9. Peak memory of a TemporalConvNet train step", 15, 5),
    ("streaming", "10. Streaming step latency", 15, 5),
]
TITLES = {key: (title, gpu_s, smoke_s) for key, title, gpu_s, smoke_s in SECTIONS}
RUN_SECONDS = {"gpu": 540, "smoke": 480}   # default deadline from the start of the script
RESERVE_S = 10                              # kept back for the summary and the PNG
GRACE_S = {"gpu": 45, "smoke": 120}        # start-up and the item in flight, past a budget
SHARDED = ("check", "parity")              # correctness only: shards run side by side
WARMED = ("timings",)                      # compiles paid by parallel shards first
WARM_SHARE = 0.4                           # of the timings budget, at most, for that
FLUSH_EVERY_S = 5.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    keys = [key for key, *_ in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--smoke", action="store_true",
                        help="every section on the CPU, tiny shapes, Triton interpreted")
    parser.add_argument("--deadline", type=float, metavar="EPOCH",
                        help="epoch seconds by which everything is written (default: start + "
                        "540 s on a GPU, + 480 s for --smoke)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help="comma-separated sections to run: " + ",".join(keys))
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="parallel processes for the check and parity shards and the "
                        "timing warm-up (default: the CPU count up to 16; 2 with --smoke)")
    parser.add_argument("--section-timeout", type=float, metavar="S",
                        help="hard timeout of every section process (default: its budget "
                        "+ 45 s, + 120 s with --smoke)")
    parser.add_argument("--commit", help="the tree's commit where it has no .git "
                        "(default: $FASTRES_COMMIT, else git rev-parse HEAD)")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time torch.compile(mode='max-autotune') (minutes per workload)")
    parser.add_argument("--build-log", metavar="PATH", help="the extension build's log (wrapper)")
    parser.add_argument("--build-status", type=int, help="the build's exit status (wrapper)")
    parser.add_argument("--build-seconds", type=float, help="the build's duration (wrapper)")
    # One section's process (started by this script itself).
    parser.add_argument("--child", choices=keys, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else keys
    unknown = [k for k in args.only if k not in keys]
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(keys)})")
    if args.commit:
        os.environ["FASTRES_COMMIT"] = args.commit
    return args


def _hide_gpu_for_smoke(smoke: bool) -> None:
    """The smoke run is the CPU run wherever it runs (set before torch is imported)."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # read when fastres's kernels are decorated
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


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


# --------------------------------------------------------------------------- one process


def _runners(warm: bool):
    from evidence import (correctness, environment, memory_stream, profiling, speed,
                          triton_meta)
    if warm:
        return {"timings": speed.warm_timings}
    return {
        "environment": environment.run_environment, "ceilings": environment.run_ceilings,
        "check": correctness.run_check, "parity": correctness.run_parity,
        "timings": speed.run_timings, "profile": profiling.run_profile,
        "triton": triton_meta.run_triton_meta, "launch": speed.run_launch_overhead,
        "memory": memory_stream.run_memory, "streaming": memory_stream.run_streaming,
    }


def _write_json(path: str, record: dict) -> None:
    from evidence.results import _default, _finite
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(record), f, default=_default)
    os.replace(tmp, path)


def _injected(run, key: str):
    """The section's runner, or one that fails as FASTRES_EVIDENCE_INJECT says (tests)."""
    modes = dict(item.split(":", 1) for item in
                 os.environ.get("FASTRES_EVIDENCE_INJECT", "").split(",") if ":" in item)
    mode = modes.get(key)
    if mode is None:
        return run

    def fail(ctx, section):
        section.data["before_the_fault"] = True   # written first: partial results survive
        ctx.flush(force=True)
        if mode == "raise":
            raise RuntimeError(f"injected failure in {key} (FASTRES_EVIDENCE_INJECT)")
        if mode == "abort":
            os.abort()                             # as a CUDA fault or a crash kills a process
        if mode == "hang":
            while True:
                time.sleep(60)
        raise ValueError(f"FASTRES_EVIDENCE_INJECT: unknown mode {mode!r}")
    return fail


def child_main(args: argparse.Namespace) -> int:
    """Run one section (or one shard, or its warm-up) and write its record to --state."""
    _hide_gpu_for_smoke(args.smoke)
    import torch
    if args.smoke:
        # One thread: tiny shapes gain nothing from more, and a busy CI machine's cores are
        # not spun on by idle OpenMP workers.
        torch.set_num_threads(1)
    from evidence import context
    from evidence.results import RUNNING, Section

    key = args.child
    title, gpu_s, smoke_s = TITLES[key]
    section = Section(key, title, smoke_s if args.smoke else gpu_s, status=RUNNING,
                      budget_s=args.budget)
    last = [0.0]

    def flush(force: bool = False) -> None:
        if force or time.time() - last[0] >= FLUSH_EVERY_S:
            _write_json(args.state, section.to_json())
            last[0] = time.time()

    index, count = (int(n) for n in args.shard.split("/"))
    ctx = context.Context(
        device=torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"),
        smoke=args.smoke, timing=context.SMOKE_TIMING if args.smoke else context.GPU_TIMING,
        host_calls=2 if args.smoke else 15, max_autotune=args.max_autotune, flush=flush,
        shard=(index, count), budget=context.Budget(args.budget, args.deadline))
    flush(force=True)
    run_section(_injected(_runners(args.warm)[key], key), ctx, section)
    flush(force=True)
    return 0


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


# --------------------------------------------------------------------------- the processes


class Worker:
    """One section process: started in its own process group, killed with it on timeout."""

    def __init__(self, args, key: str, budget: float, deadline: float, timeout: float,
                 shard=(0, 1), warm: bool = False):
        self.key, self.budget, self.timeout = key, budget, timeout
        name = key + ("-warm" if warm else "") + (f"-{shard[0]}of{shard[1]}"
                                                   if shard[1] > 1 else "")
        folder = os.path.join(args.out, "sections")
        os.makedirs(folder, exist_ok=True)
        self.state, self.log = (os.path.join(folder, name + ".json"),
                                os.path.join(folder, name + ".log"))
        for path in (self.state, self.log):
            if os.path.exists(path):
                os.remove(path)
        command = [sys.executable, os.path.abspath(__file__), "--child", key, "--out", args.out,
                   "--state", self.state, "--budget", f"{budget:.1f}",
                   "--deadline", f"{deadline:.1f}", "--shard", f"{shard[0]}/{shard[1]}"]
        command += ["--smoke"] * args.smoke + ["--max-autotune"] * args.max_autotune
        command += ["--warm"] * warm
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.abspath(__file__))]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if warm or shard[1] > 1:
            # Processes side by side: choices the default dispatch measures while others
            # load the device are kept in memory only (never stored for the timed run), and
            # inductor compiles on one thread each (its default pool is one per core).
            env.update(FASTRES_DISPATCH_CACHE="0", TORCHINDUCTOR_COMPILE_THREADS="1")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        self.started = time.time()
        self.timed_out = False

    def poll(self) -> bool:
        """True once the process has ended (killing it first if it passed its timeout)."""
        if self.process.poll() is not None:
            return True
        if time.time() - self.started > self.timeout:
            self.timed_out = True
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            return True
        return False

    def record(self):
        """The section as its process left it, and, where the process did not end cleanly,
        an error saying how it ended."""
        from evidence.results import ERROR, FINAL_STATUSES, Section

        title, gpu_s, _ = TITLES[self.key]
        try:
            with open(self.state) as f:
                section = Section.from_json(json.load(f))
        except (OSError, ValueError, TypeError):
            section = Section(self.key, title, gpu_s, budget_s=self.budget)
        code, elapsed = self.process.returncode, time.time() - self.started
        if code is None and not self.timed_out:
            return section   # still running: what it has flushed so far
        if self.timed_out:
            kind, message = "Timeout", (
                f"killed after {elapsed:.0f} s, its hard timeout (budget {self.budget:.0f} s "
                "plus the start-up grace, or the run's deadline): a hang or an item far over "
                "its budget")
        elif code is not None and code < 0:
            kind, message = "ProcessDied", (
                f"its process died of {signal.Signals(-code).name} after {elapsed:.0f} s (a "
                "CUDA fault or a crash)")
        elif code != 0:
            kind, message = "ProcessFailed", f"its process exited with status {code}"
        elif section.status not in FINAL_STATUSES:
            kind, message = "ProcessFailed", "its process ended without a final record"
        else:
            return section
        section.status, section.reason = ERROR, message + "; what it wrote before is kept"
        section.error = {"type": kind, "message": message, "traceback_tail": self.log_tail()}
        return section

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def run_workers(workers: List[Worker], on_tick) -> None:
    """Wait for every worker, calling on_tick every few seconds (partial results)."""
    last = time.time()
    while not all([w.poll() for w in workers]):
        time.sleep(0.2)
        if time.time() - last >= FLUSH_EVERY_S:
            on_tick()
            last = time.time()


def run_isolated(args, section, budget: float, deadline: float, jobs: int, writer) -> None:
    """Run a section in its own process(es); fill `section` with the merged record."""
    from evidence import correctness
    from evidence.results import merge_sections

    def timeout(seconds: float) -> float:
        limit = args.section_timeout or seconds + GRACE_S["smoke" if args.smoke else "gpu"]
        return max(1.0, min(limit, deadline + RESERVE_S - 5 - time.time()))

    def adopt(parts) -> None:
        merged = merge_sections(parts) if len(parts) > 1 else parts[0]
        for field in ("status", "reason", "error", "data", "tables", "notes", "skipped"):
            setattr(section, field, getattr(merged, field))

    started = time.time()
    if section.key in WARMED and jobs > 1:
        warm_budget = budget * WARM_SHARE
        workers = [Worker(args, section.key, warm_budget, deadline, timeout(warm_budget),
                          (i, jobs), warm=True) for i in range(jobs)]
        run_workers(workers, lambda: None)
        warm = merge_sections([w.record() for w in workers])
        warmed = warm.data.get("warmed", [])
        warm_record = {"processes": jobs, "wall_s": time.time() - started,
                       "status": warm.status, "calls": len(warmed),
                       "errors": [w for w in warmed if w.get("error")],
                       "error": warm.error, "skipped": warm.skipped}
        # The timed run keeps at least the rest of its share, even where the warm-up's
        # processes were slow to start (later sections then share what is left).
        budget = max(budget * (1 - WARM_SHARE), budget - (time.time() - started))
    else:
        warm_record = None
    shards = jobs if section.key in SHARDED and jobs > 1 else 1
    workers = [Worker(args, section.key, budget, deadline, timeout(budget), (i, shards))
               for i in range(shards)]
    run_workers(workers, lambda: (adopt([w.record() for w in workers]), writer.flush()))
    adopt([w.record() for w in workers])
    if shards > 1 and section.key in correctness.SUMMARIZE:
        section.notes = [n for n in section.notes if not n.startswith(("FAIL", "NOT "))]
        correctness.SUMMARIZE[section.key](section)
    if warm_record is not None:
        section.data["warm_up"] = warm_record
        section.notes.insert(0, f"compiles paid first by {jobs} parallel processes in "
                             f"{warm_record['wall_s']:.0f} s ({warm_record['calls']} calls, "
                             f"{len(warm_record['errors'])} errors, {warm_record['status']})")
    judge(section)
    section.wall_s = time.time() - started


def judge(section) -> None:
    """A section that ran but whose checks failed is "failed", never "ok"."""
    from evidence import correctness
    from evidence.results import FAILED, OK, PARTIAL

    if section.status not in (OK, PARTIAL):
        return
    failed = 0
    if section.key in correctness.SUMMARIZE:
        failed = correctness.failures(section)
    elif section.key == "timings":
        failed = sum(r.get("status") != "ok" for r in section.data.get("rows", []))
    if failed:
        section.status = FAILED
        section.reason = f"{failed} checked row(s) failed" + (
            f"; {section.reason}" if section.reason else "")


# --------------------------------------------------------------------------- the run


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    mode = "smoke" if args.smoke else "gpu"
    _hide_gpu_for_smoke(args.smoke)
    args.out = os.path.abspath(args.out)
    deadline = (args.deadline or started + RUN_SECONDS[mode]) - RESERVE_S

    import torch
    from evidence import context, environment
    from evidence.results import ERROR, FAILED, OK, RUNNING, SKIPPED, EvidenceWriter, Section
    from fastres.bench.environment import device_slug
    from fastres.machine import device_name

    have_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if have_gpu else "cpu")
    jobs = args.jobs or (2 if args.smoke else max(1, min(16, os.cpu_count() or 1)))
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
        "build": build_record(args), "jobs": jobs,
        "deadline": {"epoch": deadline + RESERVE_S,
                     "utc": datetime.datetime.fromtimestamp(
                         deadline + RESERVE_S, datetime.timezone.utc).isoformat(),
                     "nominal_s": {s.key: s.nominal_s for s in sections}},
    }, sections)
    writer.flush()

    def say(text: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {text}", flush=True)

    say(f"fastres GPU evidence ({mode}) on {device_name(device)}, commit "
        f"{writer.document['commit']}, {jobs} parallel processes -> {writer.paths['json']}")
    say(f"extension: {writer.document['build']['summary']}")
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
        writer.flush()
        run_isolated(args, section, budget, deadline, jobs, writer)
        writer.flush()
        shown = section.status.upper() if section.status in (ERROR, FAILED) else section.status
        detail = "; ".join(([section.reason] if section.reason else [])
                           + section.notes[:1])
        say(f"{section.title}: {shown}" + (f" ({detail})" if detail else ""))
    finish(writer, say)
    bad = [s for s in sections if s.status in (ERROR, FAILED)]
    if bad:
        say("NOT ALL WELL: " + ", ".join(f"{s.key} {s.status}" for s in bad)
            + f" (details in {writer.paths['markdown']})")
    else:
        say("every section that ran is " + ", ".join(sorted({s.status for s in sections
                                                              if s.status != OK} | {OK})))
    return 1 if bad else 0


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
