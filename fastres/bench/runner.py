"""The suites' common shape, and the loop that runs them.

A suite is a module with

    NAME, TITLE: str
    unavailable_reason(settings) -> str | None
    tasks(settings) -> list[Task]         # what to time, cheap to build (inputs come later)
    summarize(rows, settings) -> dict     # suite-level findings (optional)
    table(rows, summary) -> (headers, list of row cells)   # what the console / markdown show
    plot(figure_panels, rows, summary)    # optional, see report.py

A Task is one group of candidate implementations of the same work (one shape, dtype
and mode); `run` times its candidates together with timing.measure and turns the
statistics into rows with throughput, speedup and memory next to the time.
"""
from __future__ import annotations

import collections
import time
from typing import Dict, List, Optional

import torch

from .. import dispatch, machine
from . import anchors, block, first_call, model, op, pytorch_tcn, tcn_vs_rnn, timing
from . import environment as environment_info
from .task import Settings, Task, compile_fn  # noqa: F401 (the suites' shapes)

SUITES = {"op": op, "block": block, "model": model, "tcn-vs-rnn": tcn_vs_rnn,
          "pytorch-tcn": pytorch_tcn, "first-call": first_call, "anchors": anchors}

# Suites run only when named (--only): the anchors compile every model twice and export it
# to ONNX, minutes on a CPU, past the default run's one to two.
OPT_IN = ("anchors",)

SIZES = ("quick", "default", "full")

# Version of the results document run() returns (keys: run(); rows: ROW_KEYS).
SCHEMA_VERSION = 2  # 2: rows say what the dispatcher ran (runs, choices)

# Every row has exactly these keys (None where a number does not apply): the JSON schema.
ROW_KEYS = (
    "suite", "task", "case", "impl", "status", "error",
    "median_s", "p25_s", "p75_s", "min_s", "spread", "rounds", "number", "first_call_s",
    "times_s", "compile_s", "speedup", "gbps", "tflops", "copy_fraction", "items_per_s",
    "peak_mem_bytes", "peak_above_start_bytes", "runs", "choices",
)


DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtypes(text: str) -> List[torch.dtype]:
    """"float32,bf16" -> [torch.float32, torch.bfloat16]; ValueError names a bad word."""
    dtypes = []
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        if word not in DTYPE_ALIASES:
            raise ValueError(f"invalid dtype {word!r} (choose from float32, bfloat16, float16; "
                             "aliases fp32, bf16, fp16, half)")
        if DTYPE_ALIASES[word] not in dtypes:
            dtypes.append(DTYPE_ALIASES[word])
    if not dtypes:
        raise ValueError("no dtype given")
    return dtypes


def make_settings(size: str, device: torch.device, dtypes: Optional[List[torch.dtype]],
                  compile_arg: str = "auto", only: Optional[List[str]] = None) -> "Settings":
    """The bench settings for command-line choices (fastres bench, benchmarks/conftest.py)."""
    if not dtypes:
        if device.type == "cpu":
            dtypes = [torch.float32]
        elif size == "full":
            dtypes = [torch.float32, torch.bfloat16, torch.float16]
        else:
            dtypes = [torch.float32, torch.bfloat16]
    if compile_arg == "auto":
        # The op suite's stage compiles with max-autotune on GPU (the fused kernel's real
        # competitor). Whole blocks and models compile in the default mode (max-autotune
        # of a ResNet takes many minutes), and not at all at the default CPU size, where
        # compiling a model costs tens of seconds.
        compile_mode = None if size == "quick" else (
            "max-autotune" if device.type == "cuda" else "default")
        model_compile_mode = "default" if size == "full" or (
            device.type == "cuda" and size != "quick") else None
    else:
        compile_mode = model_compile_mode = None if compile_arg == "none" else compile_arg
    return Settings(size=size, device=device, dtypes=list(dtypes),
                    only=only or [s for s in SUITES if s not in OPT_IN],
                    compile_mode=compile_mode,
                    model_compile_mode=model_compile_mode)


def load_suite(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return SUITES[name]


def _empty_row(task: Task, impl: str) -> Dict[str, object]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(suite=task.suite, task=task.name, case=task.case, impl=impl)
    return row


class _FirstCallChoices:
    """A candidate whose first call, the one that makes the dispatcher's choices, records
    them (each as level, call, runs, why): a row then says what it ran, where a measured
    choice can differ from one run to the next."""

    def __init__(self, fn):
        self.fn, self.choices = fn, None

    def __call__(self):
        if self.choices is not None:
            return self.fn()
        with dispatch.recording() as log:
            out = self.fn()
        self.choices = [{"level": choice.level, "call": call and call.describe(),
                         "runs": choice.name, "why": choice.why()} for _, call, choice in log]
        return out


def runs_summary(choices: List[Dict[str, object]]) -> str:
    """What ran, in one line: each module policy, then each op backend, counted ("stages,
    cpp x4"; "cpp, cpp x4" where the policy is a backend's)."""
    counts = collections.Counter((c["level"], c["runs"]) for c in choices)
    return ", ".join(runs if n == 1 else f"{runs} x{n}" for (_, runs), n in counts.items())


def run_task(task: Task, settings: Settings,
             copy_bytes_per_s: Optional[float] = None) -> List[Dict[str, object]]:
    """Build the task's candidates, time them together, return one row per impl."""
    config = task.timing or timing.TIMING[settings.size]
    if task.compiled:
        # Dynamo keys its cache on code objects: without a reset, the same function
        # compiled for task after task runs into the recompile limit and silently falls
        # back to eager.
        torch._dynamo.reset()
    rows = {impl: _empty_row(task, impl) for impl in task.impls}
    candidates = {}
    for impl in task.impls:
        try:
            candidates[impl] = task.make(impl)
        except Exception as exc:  # noqa: BLE001 - report it in the row, keep going
            rows[impl].update(status="error", error=f"{type(exc).__name__}: {exc}")
    # (every candidate is wrapped, fastres or not, so each pays the same call)
    candidates = {impl: _FirstCallChoices(fn) for impl, fn in candidates.items()}
    measured = timing.measure(candidates, settings.device, config)
    for impl, result in measured.items():
        row = rows[impl]
        if candidates[impl].choices:
            row["choices"] = candidates[impl].choices
            row["runs"] = runs_summary(row["choices"])
        if isinstance(result, Exception):
            row.update(status="error", error=f"{type(result).__name__}: {result}".strip())
            continue
        row.update(result.to_json(), status="ok")
        median = result.median_s
        if impl in task.compiled:
            row["compile_s"] = max(0.0, result.first_call_s - median)
        if task.flops:
            row["tflops"] = task.flops / median / 1e12
        if task.bytes:
            row["gbps"] = task.bytes / median / 1e9
            if copy_bytes_per_s:
                row["copy_fraction"] = task.bytes / median / copy_bytes_per_s
        if task.items:
            row["items_per_s"] = task.items / median
        if task.memory:
            try:
                memory = timing.peak_memory_bytes(candidates[impl], settings.device)
            except Exception:  # noqa: BLE001 - memory is a side number; keep the timing
                memory = None
            if memory:
                row["peak_mem_bytes"] = memory["peak_bytes"]
                row["peak_above_start_bytes"] = memory["peak_above_start_bytes"]
    base = rows.get(task.baseline) if task.baseline else None
    if base is not None and base["status"] == "ok":
        for row in rows.values():
            if row["status"] == "ok":
                row["speedup"] = base["median_s"] / row["median_s"]
    return [rows[impl] for impl in task.impls]


def run(settings: Settings, progress: Optional[bool] = None) -> Dict[str, object]:
    """Run the selected suites; return the results document (see report.write_outputs)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    environment = environment_info.environment(settings.device)
    environment["allocator"] = timing.settle_allocator()
    copy_bytes_per_s = None
    try:
        # The quick size is a smoke test: a small buffer is enough to exercise the path.
        copy_bytes_per_s = timing.copy_bandwidth(
            settings.device, 16 * 2**20 if settings.size == "quick" else None)
        environment["copy_bandwidth_gbs"] = copy_bytes_per_s / 1e9
    except Exception as exc:  # noqa: BLE001 - GB/s fractions are then left out
        environment["copy_bandwidth_gbs"] = None
        environment["copy_bandwidth_error"] = str(exc)

    suites: Dict[str, Dict[str, object]] = {}
    planned = []
    for name in settings.only:
        module = load_suite(name)
        reason = module.unavailable_reason(settings)
        suites[name] = {"title": module.TITLE, "status": "skipped" if reason else "ok",
                        "reason": reason, "rows": [], "summary": {}, "wall_time_s": 0.0}
        if not reason:
            planned.append((name, module, module.tasks(settings)))

    total = sum(len(tasks) for _, _, tasks in planned)
    # disable=None: a bar on a terminal, silence in logs and tests.
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="fastres bench", unit="case", disable=disable) as bar:
        for name, module, tasks in planned:
            suite_started = time.perf_counter()
            rows = []
            for task in tasks:
                bar.set_postfix_str(f"{name} {task.name}", refresh=True)
                rows.extend(run_task(task, settings, copy_bytes_per_s))
                bar.update(1)
            suites[name]["rows"] = rows
            summarize = getattr(module, "summarize", None)
            suites[name]["summary"] = summarize(rows, settings) if summarize else {}
            suites[name]["wall_time_s"] = time.perf_counter() - suite_started

    environment["load_average_end"] = machine.load_average()
    return {
        "schema_version": SCHEMA_VERSION,
        "created_utc": machine.utc_now(),
        "settings": settings.to_json(),
        "environment": environment,
        "suites": suites,
        "wall_time_s": time.perf_counter() - started,
        "command": None,   # the CLI fills in the command line
    }
