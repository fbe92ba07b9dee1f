"""Where fastres runs, in words: the device, the software, how busy the machine is, when.

What a stored choice (fastres/dispatch/choice.py) and a benchmark result
(fastres/bench/environment.py) both say about where they were measured, written once.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from typing import Dict, List, Optional

import torch


def cpu_name() -> str:
    """The CPU's model name (what /proc/cpuinfo says), for reports and cache keys."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def versions() -> Dict[str, Optional[str]]:
    """fastres's, torch's and Triton's versions (Triton None where it does not import)."""
    from ._version import __version__
    try:
        import triton
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
        triton = None
    return {"fastres": __version__, "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None)}


def load_average() -> Optional[List[float]]:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_per_core() -> Optional[float]:
    """Runnable threads a core: the larger of the one-minute load average and the threads
    runnable right now (/proc/loadavg's fourth field, less this process's own torch threads),
    since the average lags a load that has just started by a minute."""
    average = (load_average() or [None])[0]
    if average is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/loadavg") as f:
        average = max(average, int(f.read().split()[3].split("/")[0])
                      - torch.get_num_threads() + 1)
    return average / (os.cpu_count() or 1)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
