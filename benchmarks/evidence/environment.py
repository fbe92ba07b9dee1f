"""Sections 1 (environment) and 2 (measured ceilings).

Everything here only reads: nvidia-smi is queried, never asked to change clocks or modes.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Dict, List, Optional

import torch

import fastres
from fastres import _ext, backends, dispatch, machine
from fastres.bench import environment as environment_info
from fastres.bench import timing
from fastres.bench.formatting import fmt_bytes

from .context import Context, clock_name
from .results import Section, error_text

# Read-only nvidia-smi fields. Drivers differ in what they know; a field this driver
# rejects is asked for alone and recorded as unknown.
NVIDIA_SMI_FIELDS = [
    "name", "driver_version", "pci.bus_id", "memory.total", "compute_cap",
    "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "clocks.applications.graphics",
    "clocks.applications.memory", "power.draw", "power.limit", "temperature.gpu",
    "persistence_mode", "compute_mode", "mig.mode.current", "clocks_event_reasons.active",
]


def torch_at_least(major: int, minor: int) -> bool:
    version = torch.__version__.split("+")[0].split(".")
    try:
        return (int(version[0]), int(version[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def tf32_settings() -> Dict[str, object]:
    """The float32 precision switches, read the way that cannot raise on this torch.

    torch >= 2.9 has per-backend fp32_precision settings; reading the legacy allow_tf32
    there raises once anyone has set the new API, so it is not read at all.
    """
    if torch_at_least(2, 9):
        return {"api": "fp32_precision (torch >= 2.9)",
                "cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                "cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
                "note": "'none' defers to the parent setting; 'tf32' = TF32 tensor cores, "
                        "'ieee' = strict float32"}
    return {"api": "allow_tf32 (torch < 2.9)",
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def commit() -> str:
    """$FASTRES_COMMIT (the commit passed in, for a tree copied without .git), else git
    rev-parse HEAD where the tree is a checkout, else unknown."""
    return os.environ.get("FASTRES_COMMIT") or environment_info.git_commit() or "unknown"


def versions() -> Dict[str, Optional[str]]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as such
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
            else None,
            "python": platform.python_version(), "fastres": fastres.__version__}


def _smi(fields: List[str]) -> List[str]:
    result = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                             "--format=csv,noheader,nounits", "-i", "0"],
                            capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError((result.stdout + result.stderr).strip()[:300])
    return [v.strip() for v in result.stdout.strip().splitlines()[0].split(",")]


def nvidia_smi() -> Dict[str, str]:
    """Read-only nvidia-smi query of GPU 0 (in the process's CUDA_VISIBLE_DEVICES order)."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        return dict(zip(NVIDIA_SMI_FIELDS, _smi(NVIDIA_SMI_FIELDS)))
    except (RuntimeError, OSError, subprocess.SubprocessError):
        out = {}
        for field in NVIDIA_SMI_FIELDS:
            try:
                out[field] = _smi([field])[0]
            except (RuntimeError, OSError, subprocess.SubprocessError, IndexError) as exc:
                out[field] = f"unknown ({error_text(exc, 80)})"
        return out


def gpu_properties(device: torch.device) -> Dict[str, object]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "l2_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
            "memory_bytes": props.total_memory}


def run_environment(ctx: Context, section: Section) -> None:
    data = section.data
    data["versions"] = versions()
    data["commit"] = commit()
    data["tf32"] = tf32_settings()
    data["host"] = {"cpu": machine.cpu_name(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    data["env"] = {k: os.environ.get(k) for k in (
        "TRITON_INTERPRET", "FASTRES_BACKEND", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST",
        "FASTRES_COMMIT")}
    data["extension"] = {"load_error": _ext.load_error(),
                         "compiled_with_cuda": _ext.compiled_with_cuda()}
    data["backends"] = {
        "available": backends.available_backends(),
        "unavailable": {n: backends.unavailable_reason(n) for n in backends.names()
                        if backends.unavailable_reason(n) is not None},
        "default": {str(dt).replace("torch.", ""): dispatch.describe_default(ctx.device, dt)
                    for dt in (torch.float32, torch.bfloat16, torch.float16)},
    }
    if ctx.cuda:
        data["gpu"] = gpu_properties(ctx.device)
        data["nvidia_smi"] = nvidia_smi()
    else:
        section.skip("GPU properties and nvidia-smi clocks", "skipped: no GPU")

    table = section.table("", ["what", "value"])
    if ctx.cuda:
        gpu, smi = data["gpu"], data["nvidia_smi"]
        table.add("GPU", f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                  f"{gpu['sm_count']} SMs, L2 {fmt_bytes(gpu['l2_bytes'])}, "
                  f"{fmt_bytes(gpu['memory_bytes'])})")
        table.add("clocks (MHz)", f"SM {smi.get('clocks.sm')} of max {smi.get('clocks.max.sm')}, "
                  f"memory {smi.get('clocks.mem')} of max {smi.get('clocks.max.mem')}, "
                  f"application {smi.get('clocks.applications.graphics')}")
        table.add("driver, power, temperature",
                  f"{smi.get('driver_version')}, {smi.get('power.draw')} W of "
                  f"{smi.get('power.limit')} W, {smi.get('temperature.gpu')} C, "
                  f"clock event reasons {smi.get('clocks_event_reasons.active')}")
    else:
        table.add("device", machine.device_name(ctx.device))
    for name, version in data["versions"].items():
        table.add(name, version)
    table.add("commit", data["commit"])
    table.add("TF32", ", ".join(f"{k}={v}" for k, v in data["tf32"].items() if k != "note"))
    table.add("backends available", ", ".join(data["backends"]["available"]))
    for name, reason in data["backends"]["unavailable"].items():
        table.add(f"backend {name} unavailable", reason)
    table.add("default dispatch", ", ".join(f"{k} -> {v}"
                                            for k, v in data["backends"]["default"].items()))
    table.add("host CPU", f"{data['host']['cpu']} ({data['host']['cpu_count']} cores)")


# --------------------------------------------------------------------------- ceilings


def matmul_tflops(ctx: Context, n: int) -> Dict[str, object]:
    """bf16 (n x n) @ (n x n) on random data, median of interleaved rounds after warm-up."""
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=g)
    out = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    stats = timing.measure({"matmul": lambda: torch.matmul(a, b, out=out)}, ctx.device,
                           timing.TimingConfig(min_rounds=7, max_rounds=10, max_time_s=0.5,
                                               min_block_s=0.01, warmup_s=0.05))["matmul"]
    if isinstance(stats, Exception):
        raise stats
    return {"n": n, "median_s": stats.median_s, "spread": stats.spread,
            "tflops": 2 * n ** 3 / stats.median_s / 1e12}


def run_ceilings(ctx: Context, section: Section) -> None:
    cache = timing.cache_bytes(ctx.device)
    nbytes = max(64 * 2**20, 4 * cache) if ctx.cuda else 16 * 2**20
    copy = timing.copy_bandwidth(ctx.device, nbytes)
    section.data["clock"] = clock_name(ctx.device)
    section.data["copy"] = {"buffer_bytes": nbytes, "last_level_cache_bytes": cache,
                            "gbs": copy / 1e9, "counted": "bytes read + bytes written"}
    section.data["matmul_bf16"] = matmul_tflops(ctx, 8192 if ctx.cuda else 256)
    mm = section.data["matmul_bf16"]
    table = section.table("", ["ceiling", "measured", "how"])
    table.add("device-to-device copy", f"{copy / 1e9:.1f} GB/s",
              f"{fmt_bytes(nbytes)} buffer ({nbytes / cache:.1f}x the "
              f"{fmt_bytes(cache)} last-level cache), read + write counted, "
              f"{clock_name(ctx.device)}, median")
    table.add("bf16 matmul", f"{mm['tflops']:.1f} TFLOP/s",
              f"{mm['n']}^3, random data, {clock_name(ctx.device)}, median of "
              f"interleaved rounds (spread {mm['spread']:.1%})")
