"""What a bench run leaves behind: console tables, JSON, a markdown report and PNG plots.

Files, for an output folder and a prefix such as "cpu-2026-11-23":
    <prefix>.json   every raw sample and derived number (schema: SCHEMA_VERSION, runner.ROW_KEYS)
    <prefix>.md     the tables, the environment, and how to read them
    <prefix>.png    one figure, a panel per suite that ran
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
from typing import Dict, List, Optional

import torch

from .environment import busy_warning
from .formatting import markdown_table, text_table
from .runner import load_suite

def _suite_table(name: str, suite: Dict[str, object]):
    """The suite's table, with a last column saying what the dispatcher ran for each row
    that made choices (matched on the first two cells, every table's case and impl)."""
    headers, cells = load_suite(name).table(suite["rows"], suite["summary"])
    runs = {(r["task"], r["impl"]): r["runs"] for r in suite["rows"] if r.get("runs")}
    if not runs:
        return headers, cells
    return (list(headers) + ["runs"],
            [list(c) + [runs.get((c[0], c[1]), "")] for c in cells])


def _choice_lines(suite: Dict[str, object]) -> List[str]:
    """Why each row runs what it runs (the dispatcher's reasons, times included; choices
    with the same reason, such as the stages following their module, counted once)."""
    lines = []
    for r in suite["rows"]:
        if r.get("choices"):
            same = collections.Counter((c["level"], c["runs"], c["why"]) for c in r["choices"])
            lines.append(f"{r['task']} {r['impl']}: " + "; ".join(
                f"{level} {runs}{f' x{n}' if n > 1 else ''} ({why})"
                for (level, runs, why), n in same.items()))
    return lines


def _summary_lines(name: str, suite: Dict[str, object]) -> List[str]:
    describe = getattr(load_suite(name), "summary_lines", None)
    return describe(suite["summary"]) if describe else []


def console_report(results: Dict[str, object]) -> str:
    env = results["environment"]
    out = [f"fastres bench on {env['device_name']} | torch {env['torch']} | "
           f"triton {env['triton']} | fastres {env['fastres']} ({env['git_commit'] or 'no git'})"]
    if env.get("copy_bandwidth_gbs"):
        out.append(f"measured copy bandwidth: {env['copy_bandwidth_gbs']:.1f} GB/s")
    if busy_warning(env):
        out.append(busy_warning(env))
    for name, suite in results["suites"].items():
        out.append("")
        out.append(f"== {name}: {suite['title']}")
        if suite["status"] != "ok":
            out.append(f"   skipped: {suite['reason']}")
            continue
        out.append(text_table(*_suite_table(name, suite)))
        out.extend(_summary_lines(name, suite))
    out.append("")
    out.append(f"total wall time {results['wall_time_s']:.1f} s")
    return "\n".join(out)


HOW_TO_READ = """\
How to read this: every time is the median over interleaved rounds (candidates of one case
alternate, so machine noise hits them alike); "spread" is the interquartile range over the
median. "vs eager" > 1 means faster than plain PyTorch (cuDNN on GPU, oneDNN on CPU).
GB/s counts the stage's minimum memory traffic (docs/spec.md performance model), so it is a lower
bound on what the kernel moved; "copy %" sets it against a measured device copy. Compile
time is excluded from every median and shown on its own. Peak memory is CUDA max allocated
for one step; CPU runs say n/a (there is no exact allocator counter on CPU)."""


def markdown_report(results: Dict[str, object]) -> str:
    env, settings = results["environment"], results["settings"]
    out = [f"# fastres bench: {env['device_name']}", ""]
    out.append(f"- created: {results['created_utc']}, wall time {results['wall_time_s']:.1f} s")
    out.append(f"- size: {settings['size']}, dtypes: {', '.join(settings['dtypes'])}, "
               f"torch.compile mode: op {settings['compile_mode'] or 'not run'}, blocks/models "
               f"{settings['model_compile_mode'] or 'not run'}")
    out.append(f"- torch {env['torch']}, triton {env['triton']}, fastres {env['fastres']}, "
               f"commit {env['git_commit']}, python {env['python']}")
    out.append(f"- backends available: {', '.join(env['backends_available'])}; default: "
               + ", ".join(f"{k} -> {v}" for k, v in env["default_backend"].items()))
    if env.get("copy_bandwidth_gbs"):
        out.append(f"- measured copy bandwidth: {env['copy_bandwidth_gbs']:.1f} GB/s")
    if env.get("load_average_start") is not None:
        out.append(f"- load average (1, 5, 15 min) at start {env['load_average_start']}, at end "
                   f"{env.get('load_average_end')}, on {env.get('cpu_count')} cores")
    if busy_warning(env):
        out += ["", "**" + busy_warning(env) + "**"]
    out += ["", HOW_TO_READ]
    for name, suite in results["suites"].items():
        out += ["", f"## {name}: {suite['title']}", ""]
        if suite["status"] != "ok":
            out.append(f"Skipped: {suite['reason']}")
            continue
        out.append(markdown_table(*_suite_table(name, suite)))
        lines = _summary_lines(name, suite)
        if lines:
            out += [""] + [f"- {line.strip()}" for line in lines]
        choices = _choice_lines(suite)
        if choices:
            out += ["", "What the dispatcher chose, and why:", ""] + [f"- {c}" for c in choices]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def write_plot(results: Dict[str, object], path: str) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    panels = []   # (suite name, module, number of axes it wants)
    for name, suite in results["suites"].items():
        module = load_suite(name)
        if suite["status"] == "ok" and suite["rows"] and hasattr(module, "plot"):
            panels.append((name, module, getattr(module, "PLOT_PANELS", 1)))
    if not panels:
        return None
    n_rows = sum(n for _, _, n in panels)
    heights = []
    for name, module, n in panels:
        tasks = len({r["task"] for r in results["suites"][name]["rows"]})
        heights += [max(3.0, 0.35 * tasks + 1.0) if n == 1 else 4.0] * n
    fig, axes = plt.subplots(n_rows, 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = list(axes[:, 0])
    for name, module, n in panels:
        suite = results["suites"][name]
        taken, axes = axes[:n], axes[n:]
        module.plot(taken[0] if n == 1 else taken, suite["rows"], suite["summary"])
    env = results["environment"]
    busy = " - BUSY MACHINE, timings unreliable" if busy_warning(env) else ""
    fig.suptitle(f"fastres bench, {env['device_name']}, torch {env['torch']}{busy}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: Dict[str, object], out_dir: str, prefix: str) -> Dict[str, str]:
    """Write <prefix>.json, .md and .png into out_dir; return their paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, prefix + ".json"),
             "markdown": os.path.join(out_dir, prefix + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(_finite(results), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(results))
    try:
        png = write_plot(results, os.path.join(out_dir, prefix + ".png"))
    except ImportError:  # plotting is the [bench] extra
        print("no PNG written: matplotlib is not installed (pip install 'fastres[bench]')",
              file=sys.stderr)
        png = None
    if png:
        paths["png"] = png
    return paths


def _finite(value):
    """The document with inf / NaN replaced by null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
