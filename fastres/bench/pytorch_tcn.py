"""pytorch-tcn suite: pytorch-tcn's own TCN against fastres.convert of the same model.

    pytorch-tcn   pytorch_tcn.TCN as its users build it (the baseline)
    fastres       fastres.convert(that model): a TemporalConvNet(block="pytorch-tcn") with
                  the same weights (checked on a probe by convert)

Configurations, each at pytorch-tcn's defaults otherwise (kernel_size 4, dropout 0.1, ReLU,
causal, xavier_uniform init):
    weight_norm   its default TCN (use_norm='weight_norm')
    batch_norm    use_norm='batch_norm'
    skips         its default TCN with use_skip_connections=True

Modes as in the model suite (_modules.step_call): "train" = one optimizer step (forward,
per-step MSE loss, backward, SGD with momentum); "infer" = eval-mode forward under no_grad.
Batch 1 and 16 at each size, both candidates timed interleaved (fastres/bench/timing.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

import fastres

from . import _modules
from .task import Settings, Task

try:
    import pytorch_tcn
except ImportError:  # an optional dependency (the bench and test extras)
    pytorch_tcn = None

NAME = "pytorch-tcn"
TITLE = "pytorch-tcn's TCN vs the same model converted by fastres"
IMPLS = ["pytorch-tcn", "fastres"]

CONFIGS: Dict[str, dict] = {
    "weight_norm": {},
    "batch_norm": dict(use_norm="batch_norm"),
    "skips": dict(use_skip_connections=True),
}
# Per size and device type: (inputs, channels, length); batches 1 and 16.
_SIZES = {
    "quick": (4, [16] * 3, 128),
    "default": (16, [32] * 6, 512),
    "full": (16, [64] * 8, 1024),
}
_CUDA_SIZES = {"quick": (16, [64] * 4, 1024), "default": (32, [128] * 8, 4096),
               "full": (32, [128] * 8, 4096)}
BATCHES = (1, 16)


def unavailable_reason(settings: Settings) -> Optional[str]:
    if pytorch_tcn is None:
        return "pytorch-tcn is not installed (pip install pytorch-tcn, or fastres[bench])"
    return _modules.modules_unavailable()


def _make(config: dict, impl: str, train: bool, inputs_count: int, channels: List[int],
          shape, dtype: torch.dtype, settings: Settings):
    torch.manual_seed(0)
    plain = pytorch_tcn.TCN(inputs_count, channels, **config)
    model = plain if impl == "pytorch-tcn" else fastres.convert(plain)
    if impl == "fastres" and not isinstance(model, fastres.TemporalConvNet):
        raise RuntimeError("fastres.convert left the pytorch-tcn model untouched")
    model = model.to(device=settings.device, dtype=dtype).train(train)
    inputs = _modules._inputs(shape, (shape[0], channels[-1], shape[2]), None, dtype,
                              settings.device)
    return _modules.step_call(model, model, train, inputs)


def tasks(settings: Settings) -> List[Task]:
    sizes = _CUDA_SIZES if settings.device.type == "cuda" else _SIZES
    inputs_count, channels, length = sizes.get(settings.size, sizes["default"])
    result = []
    for dtype in settings.dtypes:
        dname = str(dtype).replace("torch.", "")
        for config_name, config in CONFIGS.items():
            for batch in BATCHES:
                shape = (batch, inputs_count, length)
                for mode in ("train", "infer"):
                    def make(impl, config=config, shape=shape, mode=mode, dtype=dtype):
                        return _make(config, impl, mode == "train", inputs_count, channels,
                                     shape, dtype, settings)
                    name = (f"TCN({inputs_count},{channels[0]}x{len(channels)},"
                            f"{config_name},B{batch},L{length})-{dname}-{mode}")
                    result.append(Task(
                        suite=NAME, name=name,
                        case={"config": config_name, "options": config, "inputs": inputs_count,
                              "channels": channels, "batch": batch, "length": length,
                              "dtype": dname, "mode": mode},
                        impls=IMPLS, make=make, baseline="pytorch-tcn", items=batch))
    return result


def summarize(rows, settings: Settings):
    fused = [r for r in rows if r["impl"] == "fastres" and r["status"] == "ok"]
    slower = sorted(r["task"] for r in fused if r["speedup"] is not None and r["speedup"] < 1)
    speedups = [r["speedup"] for r in fused if r["speedup"] is not None]
    return {"min_speedup": min(speedups) if speedups else None,
            "max_speedup": max(speedups) if speedups else None, "slower": slower}


def summary_lines(summary) -> List[str]:
    if summary.get("min_speedup") is None:
        return []
    lines = [f"fastres vs pytorch-tcn: {summary['min_speedup']:.2f}x to "
             f"{summary['max_speedup']:.2f}x"]
    if summary["slower"]:
        lines.append("slower than pytorch-tcn on: " + ", ".join(summary["slower"]))
    return lines


def table(rows, summary):
    from .formatting import fmt_num, fmt_pct, fmt_seconds, fmt_x
    headers = ["case", "impl", "median", "spread", "vs pytorch-tcn", "samples/s"]
    cells = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["task"], row["impl"], "error: " + (row["error"] or "")[:60]]
                         + [""] * 3)
            continue
        cells.append([row["task"], row["impl"], fmt_seconds(row["median_s"]),
                      fmt_pct(row["spread"]), fmt_x(row["speedup"]),
                      fmt_num(row["items_per_s"], 4)])
    return headers, cells


def plot(ax, rows, summary):
    _modules.plot(ax, rows, "pytorch-tcn suite: speedup over pytorch-tcn (higher is better)")
