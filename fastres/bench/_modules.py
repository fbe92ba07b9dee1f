"""What the block and model suites share: candidates built from one fused module.

For a fused fastres module (TemporalBlock, BasicBlock, TemporalConvNet, ResNet1d):
    fastres            the module as fastres builds it (fused stages, default backend)
    plain              fastres.unfuse(module): the same weights in plain PyTorch
    compiled           torch.compile(plain, fullgraph=True) (max-autotune on GPU)
    fastres+compiled   torch.compile(fastres module) (full matrix only; the fused op is a
                       custom op, so the graph around it is compiled and the op is kept)
    fastres[NAME]      inference only: every stage forced onto fused backend NAME, so a
                       row shows whether the default reaches the best fused backend
Modes: "train" = one optimizer step (forward, loss, backward, SGD with momentum);
"infer" = eval-mode forward under no_grad.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres

from . import timing
from .task import Settings, Task, compile_fn

MODULES = ("TemporalBlock", "TemporalConvNet", "BasicBlock", "ResNet1d", "unfuse")


def modules_unavailable() -> Optional[str]:
    missing = [name for name in MODULES if not hasattr(fastres, name)]
    if missing:
        return ("modules not available: this fastres has no " + ", ".join(missing)
                + " (the drop-in modules land with the nn branch)")
    return None


def impls_for(settings: Settings) -> List[str]:
    compiled = settings.model_compile_mode is not None
    impls = ["plain"]
    if compiled:
        impls.append("compiled")
    impls.append("fastres")
    if compiled and settings.size == "full":
        impls.append("fastres+compiled")
    return impls


def forced_impls(settings: Settings) -> List[str]:
    """fastres[NAME] for every fused backend that runs here (never Triton's interpreter)."""
    return [f"fastres[{b.name}]" for b in fastres.backends.all_backends()
            if b.fused and b.name != "composite" and b.unavailable_reason() is None
            and settings.device.type in b.devices
            and not (b.name == "triton" and settings.device.type != "cuda")]


def _inputs(shape: Sequence[int], target_shape: Sequence[int], classes: Optional[int],
            dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(1)
    one = 2 * int(torch.tensor(shape).prod()) * dtype.itemsize
    sets = []
    for _ in range(timing.rotation_count(one, device)):
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        if classes:
            target = torch.randint(0, classes, tuple(target_shape), generator=g).to(device)
        else:
            target = torch.randn(*target_shape, generator=g).to(device=device, dtype=dtype)
        sets.append((x, target))
    return timing.Rotating(sets)


def _loss(out, target):
    if target.dtype == torch.long:
        return F.cross_entropy(out.float(), target)
    return F.mse_loss(out, target)


def make_call(build: Callable[[], nn.Module], impl: str, mode: str, shape, target_shape,
              classes: Optional[int], dtype: torch.dtype, settings: Settings):
    """The no-argument call for one impl: a train step or an inference forward."""
    device = settings.device
    torch.manual_seed(0)
    fused = build().to(device=device, dtype=dtype)
    model = fused if impl.startswith("fastres") else fastres.unfuse(copy.deepcopy(fused))
    model.train(mode == "train")
    forward = compile_fn(model, settings.model_compile_mode) if impl.endswith("compiled") \
        else model
    if impl.startswith("fastres["):
        backend = impl[len("fastres["):-1]

        def forward(x, model=model):
            with fastres.use_backend(backend):
                return model(x)
    inputs = _inputs(shape, target_shape, classes, dtype, device)
    return step_call(model, forward, mode == "train", inputs)


def step_call(model: nn.Module, forward: Callable, train: bool,
              inputs: timing.Rotating) -> Callable[[], object]:
    """One train step of `model` through `forward` (forward, loss, backward, SGD with
    momentum), or an inference forward under no_grad; `inputs()` gives (x, target)."""
    if not train:
        def infer():
            x, _ = inputs()
            with torch.no_grad():
                return forward(x)
        return infer
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        x, target = inputs()
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(forward(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return train_step


def model_tasks(suite: str, specs, settings: Settings) -> List[Task]:
    """specs: (name, build, input shape, target shape, classes or None). One task per
    spec, dtype and mode, with peak memory measured."""
    impls = impls_for(settings)
    result = []
    for dtype in settings.dtypes:
        dname = str(dtype).replace("torch.", "")
        for name, build, shape, target_shape, classes in specs:
            for mode in ("train", "infer"):
                def make(impl, build=build, mode=mode, shape=shape, target_shape=target_shape,
                         classes=classes, dtype=dtype):
                    return make_call(build, impl, mode, shape, target_shape, classes, dtype,
                                     settings)
                mode_impls = impls + (forced_impls(settings) if mode == "infer" else [])
                result.append(Task(
                    suite=suite, name=f"{name}-{dname}-{mode}",
                    case={"model": name, "input": list(shape), "dtype": dname, "mode": mode},
                    impls=mode_impls, make=make,
                    compiled=[i for i in mode_impls if i.endswith("compiled")],
                    baseline="plain", items=shape[0], memory=True))
    return result


def summarize(rows, settings: Settings):
    return {"compiled": settings.model_compile_mode is not None}


def summary_lines(summary) -> List[str]:
    if summary.get("compiled", True):
        return []
    return ["torch.compile'd models were left out at this size (compiling a whole model "
            "costs tens of seconds on a CPU); add them with --compile default"]


def table(rows, summary):
    from .formatting import fmt_bytes, fmt_num, fmt_pct, fmt_seconds, fmt_x
    headers = ["case", "impl", "median", "spread", "vs plain", "samples/s", "peak mem",
               "compile"]
    cells = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["task"], row["impl"], "error: " + (row["error"] or "")[:60]]
                         + [""] * 5)
            continue
        cells.append([row["task"], row["impl"], fmt_seconds(row["median_s"]),
                      fmt_pct(row["spread"]), fmt_x(row["speedup"]),
                      fmt_num(row["items_per_s"], 4), fmt_bytes(row["peak_mem_bytes"]),
                      fmt_seconds(row["compile_s"])])
    return headers, cells


def plot(ax, rows, title):
    from .formatting import bar_chart
    bar_chart(ax, rows, value="speedup", title=title, reference_line=1.0)
