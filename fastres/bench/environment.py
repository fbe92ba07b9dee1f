"""What a benchmark run records about where it ran: device, versions, commit, machine load.

Kept apart from the runner (which builds the results document) and the report (which writes
it), so neither imports the other.
"""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, Optional

import torch

from ..conventions import cudnn_conv_tf32
from ..machine import cpu_name, device_name, load_average, versions


def git_commit() -> Optional[str]:
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


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: "cpu-intel-xeon", "cpu-amd-epyc", "cuda-h100"..."""
    if device.type != "cuda":
        words = [w for w in cpu_name().lower().replace("(r)", "").replace("(tm)", "")
                 .replace("-", " ").split() if w.isalpha() and w not in ("processor", "cpu")]
        return "-".join(["cpu"] + words[:2])
    words = [w for w in torch.cuda.get_device_name(device).lower().replace("-", " ").split()
             if w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
    return "cuda-" + ("-".join(words[:2]) if words else "gpu")


def environment(device: torch.device) -> Dict[str, object]:
    from fastres import backends, dispatch

    env = {
        "device": device.type,
        "device_name": device_name(device),
        **versions(),
        "git_commit": git_commit(),
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
        "load_average_start": load_average(),
    }
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            env["default_backend"][str(dtype).replace("torch.", "")] = \
                dispatch.describe_default(device, dtype)
        except RuntimeError:
            pass
    return env


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
