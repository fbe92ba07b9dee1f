"""What a bench run leaves behind: console tables, JSON, a markdown report and PNG plots.

Files, for an output folder and a prefix such as "cpu-2026-11-23":
    <prefix>.json   every raw sample and derived number (schema: SCHEMA_VERSION, runner.ROW_KEYS)
    <prefix>.md     the tables, the environment, and how to read them
    <prefix>.png    one figure, a panel per suite that ran
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

from ..conventions import cpu_name, cudnn_conv_tf32

SCHEMA_VERSION = 1


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- environment


def _git_commit() -> Optional[str]:
    """The commit of the checkout fastres runs from (with -dirty for local edits), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: "cpu", "cuda-h100", ..."""
    if device.type != "cuda":
        return "cpu"
    words = [w for w in torch.cuda.get_device_name(device).lower().replace("-", " ").split()
             if w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
    return "cuda-" + ("-".join(words[:2]) if words else "gpu")


def environment(device: torch.device) -> Dict[str, object]:
    import fastres
    from fastres import backends

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
        triton_version = None
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastres": fastres.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_conv_tf32": cudnn_conv_tf32(),
        "backends_available": backends.available_backends(),
        "backend_unavailable": {name: backends.unavailable_reason(name)
                                for name in backends.names()
                                if backends.unavailable_reason(name) is not None},
        "default_backend": {},
        # Other jobs on the machine skew CPU timings: say how busy it was.
        "load_average_start": _load_average(),
    }
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            env["default_backend"][str(dtype).replace("torch.", "")] = \
                backends.describe_default(device, dtype)
        except RuntimeError:
            pass
    return env


# --------------------------------------------------------------------------- formatting


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(str(r[i])) for r in cells]) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in cells]
    return "\n".join(lines)


def _suite_table(name: str, suite: Dict[str, object]):
    from .runner import load_suite
    return load_suite(name).table(suite["rows"], suite["summary"])


def _summary_lines(name: str, suite: Dict[str, object]) -> List[str]:
    from .runner import load_suite
    describe = getattr(load_suite(name), "summary_lines", None)
    return describe(suite["summary"]) if describe else []


def busy_warning(env: Dict[str, object]) -> Optional[str]:
    """A warning when other jobs competed for the CPU cores this CPU run used."""
    if env.get("device") != "cpu" or not env.get("cpu_count"):
        return None
    loads = [v[0] for v in (env.get("load_average_start"), env.get("load_average_end")) if v]
    if not loads:
        return None
    # The end reading includes this run's own threads; more runnable work than cores
    # (plus some slack for short spikes) means someone else was competing.
    if max(loads) <= env["cpu_count"] + 0.5:
        return None
    return (f"warning: the machine was busy (1-min load average up to {max(loads):.1f} on "
            f"{env['cpu_count']} cores with {env.get('torch_threads')} torch threads): CPU "
            "timings are unreliable, threads spin-wait for cores other jobs hold. Re-run on a "
            "quiet machine, or with --threads 1 to stay out of their way.")


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
GB/s counts the stage's minimum memory traffic (SPEC.md performance model), so it is a lower
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
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def bar_chart(ax, rows, value: str, title: str, reference_line: Optional[float] = None,
              log: bool = False) -> None:
    """Horizontal bars of row[value], grouped by task, one colour per impl."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    height = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, task in enumerate(tasks):
            for r in rows:
                if r["task"] == task and r["impl"] == impl and r.get(value) is not None:
                    ys.append(i + (j - (len(impls) - 1) / 2) * height)
                    xs.append(r[value])
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=7)
    ax.invert_yaxis()
    if reference_line is not None:
        ax.axvline(reference_line, color="black", linewidth=0.8, linestyle="--")
    if log:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")


def write_plot(results: Dict[str, object], path: str) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runner import load_suite

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
    png = write_plot(results, os.path.join(out_dir, prefix + ".png"))
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
