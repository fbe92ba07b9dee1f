"""Section 7: Triton metadata and SASS instruction mix of the kernels fastres launches.

1. A representative workload (a TemporalBlock train step in bf16; on a GPU also its eval
   forward and a float32 train step) runs on the Triton backend with a pre-run hook on
   every @triton.jit kernel of fastres.backends.triton, recording each launch's argument
   types and constexprs (one row per kernel and constexpr set).
2. Each recorded launch is turned into a compiled kernel:
   - on a GPU, `kernel.warmup(...)` with the recorded arguments returns the kernel this
     device compiled for them (from the JIT cache: the device's own compile);
   - in the smoke run (CPU, interpreter), a subprocess without TRITON_INTERPRET compiles
     the same launches with triton.compile(..., target=GPUTarget("cuda", 90, 32)).
3. `kernel_report` (one function for both) reads the cubin: registers, spills, shared
   memory and num_warps/num_stages from Triton's metadata (and the driver on a GPU), local
   memory from `cuobjdump -res-usage`, and the instruction mix from `cuobjdump -sass`:
   HGMMA (wgmma), HMMA (mma.sync), LDG by width, LDGSTS (cp.async), UTMALDG (TMA), LDL/STL.
   Without a cuobjdump it records "no sass".
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from fastres import backends

from .context import Context, forced
from .results import Section, SectionSkipped, error_text
from .speed import SIZES, Workload, build_module, module_call, module_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# --------------------------------------------------------------------------- SASS


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def load_width(opcode: str) -> int:
    """Bits per thread of a load/store opcode such as LDG.E.128 or LDG.E.U16 (32 if plain)."""
    for token in opcode.split(".")[1:]:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 32


def sass_counts(sass: str) -> Dict[str, object]:
    """The instruction mix of `cuobjdump -sass` text: the counts this section reports."""
    opcodes = [m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    base = collections.Counter(op.split(".")[0] for op in opcodes)
    ldg = collections.Counter(load_width(op) for op in opcodes if op.split(".")[0] == "LDG")
    stg = collections.Counter(load_width(op) for op in opcodes if op.split(".")[0] == "STG")
    return {
        "instructions": len(opcodes),
        "HGMMA": base["HGMMA"], "HMMA": base["HMMA"],
        "LDG_by_bits": {str(w): ldg[w] for w in sorted(ldg)},
        "STG_by_bits": {str(w): stg[w] for w in sorted(stg)},
        "LDGSTS": base["LDGSTS"], "UTMALDG": base["UTMALDG"],
        "LDL": base["LDL"], "STL": base["STL"],
        "FFMA": base["FFMA"],
    }


def resource_usage(text: str) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (first) function in `cuobjdump -res-usage` output."""
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text.split("Function", 1)[-1])
        if match:
            found[key] = int(match.group(1))
    return found


def find_cuobjdump() -> Optional[str]:
    """Triton's own cuobjdump (it ships one, matching its ptxas), else the CUDA toolkit's."""
    candidates = []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates.append(shutil.which("cuobjdump") or "")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def kernel_report(cubin: bytes, metadata: Dict[str, object], cuobjdump: Optional[str],
                  n_regs: Optional[int] = None, n_spills: Optional[int] = None
                  ) -> Dict[str, object]:
    """What one compiled kernel uses: Triton's metadata, the driver's register/spill counts
    where given (a GPU), and the cubin's resource usage and SASS instruction mix."""
    report: Dict[str, object] = {
        "num_warps": metadata.get("num_warps"), "num_stages": metadata.get("num_stages"),
        "shared_bytes": metadata.get("shared"), "arch": str(metadata.get("target", "")),
        "registers": n_regs, "spills": n_spills,
    }
    if cuobjdump is None:
        report["sass"] = "no sass (no cuobjdump found)"
        return report
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                               timeout=60)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                              timeout=60)
    if sass.returncode != 0:
        report["sass"] = "no sass (cuobjdump failed: " + (sass.stderr or sass.stdout)[:200] + ")"
        return report
    resources = resource_usage(usage.stdout)
    report["resource_usage"] = resources
    if report["registers"] is None:
        report["registers"] = resources.get("REG")
    report["local_bytes"] = resources.get("LOCAL")
    report["sass"] = sass_counts(sass.stdout)
    return report


# --------------------------------------------------------------------------- launches


def triton_kernels() -> Dict[str, object]:
    """'module.name' -> kernel object, for every @triton.jit function of the Triton backend
    (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)."""
    import fastres.backends.triton as package
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            # Defined here (not a helper imported from a sibling module).
            if hasattr(obj, "add_pre_run_hook") and hasattr(obj, "pre_run_hooks") \
                    and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def _constexpr_names(kernel) -> List[str]:
    params = inspect.signature(kernel.fn).parameters.values()
    return [p.name for p in params if "constexpr" in str(p.annotation)]


def _describe_arg(value):
    """A launch argument as recorded: tensors by dtype, everything else by value."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", "")}
    return value


@contextlib.contextmanager
def recorded_launches(kernels: Dict[str, object]) -> Iterator[List[Dict[str, object]]]:
    """Record every launch of `kernels` inside the block: one entry per kernel and set of
    constexprs and argument dtypes (integer values are those of the first such launch)."""
    launches: List[Dict[str, object]] = []
    seen = set()
    hooks: List[Tuple[object, Callable]] = []
    for qualname, kernel in kernels.items():
        arg_names, constexprs = list(kernel.arg_names), set(_constexpr_names(kernel))

        def hook(*args, qualname=qualname, arg_names=arg_names, constexprs=constexprs, **kwargs):
            bound = dict(zip(arg_names, args))
            bound.update({k: v for k, v in kwargs.items() if k in arg_names})
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            args_desc = {k: _describe_arg(v) for k, v in bound.items()}
            consts = {k: v for k, v in args_desc.items() if k in constexprs}
            dtypes = {k: v["tensor"] for k, v in args_desc.items() if isinstance(v, dict)}
            key = (qualname, json.dumps(consts, sort_keys=True, default=str),
                   json.dumps(dtypes, sort_keys=True))
            if key not in seen:
                seen.add(key)
                launches.append({"kernel": qualname, "args": args_desc, "constexprs": consts,
                                 "options": options})
        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    try:
        yield launches
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)


def _workloads(ctx: Context) -> List[Workload]:
    channels, _, block_d, B, L, _ = SIZES["smoke" if ctx.smoke else "gpu"]
    C = channels[1] if len(channels) > 1 else channels[0]
    work = [Workload("block", C, block_d, "bfloat16", "train", B, L)]
    if ctx.cuda:
        work += [Workload("block", C, block_d, "bfloat16", "eval", B, L),
                 Workload("block", C, block_d, "float32", "train", B, L)]
    return work


def record_workload_launches(ctx: Context, kernels: Dict[str, object]) -> List[Dict[str, object]]:
    with recorded_launches(kernels) as launches:
        for work in _workloads(ctx):
            dtype = getattr(torch, work.dtype)
            torch.manual_seed(0)
            model = build_module(work).to(ctx.device, dtype).train(work.mode == "train")
            inputs = module_inputs(ctx, (work.B, work.C, work.L), (work.B, work.C, work.L), dtype)
            module_call(model, forced(model, "triton"), work.mode, inputs)()
        ctx.synchronize()
    return launches


# --------------------------------------------------------------------------- compiling


def _metadata_dict(compiled) -> Dict[str, object]:
    meta = compiled.metadata
    return dict(meta._asdict()) if hasattr(meta, "_asdict") else dict(vars(meta))


def device_compiled(kernel, launch: Dict[str, object]):
    """The kernel this GPU compiled for `launch` (Triton's JIT cache; compiled if absent)."""
    args = []
    for name in kernel.arg_names:
        value = launch["args"].get(name)
        args.append(getattr(torch, value["tensor"]) if isinstance(value, dict) else value)
    compiled = kernel.warmup(*args, grid=(1,), **launch["options"])
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    with contextlib.suppress(Exception):   # loads the module: the driver's register count
        compiled._init_handles()
    return compiled


def compile_for_sm90(spec_path: str, out_dir: str) -> None:
    """Subprocess entry (no TRITON_INTERPRET): compile each launch of the spec for sm_90,
    writing <i>.cubin and <i>.json (Triton's metadata, or the error) into out_dir.

    The launches are captured again here from the backend's real launchers
    (fastres.backends.triton.codegen: a compile-only driver records what the JIT would
    compile, specialization and tensor descriptors included) for the spec's workload, and
    matched to the spec by kernel name."""
    import torch
    from fastres.backends.triton import codegen

    with open(spec_path) as f:
        spec = json.load(f)
    captured = {}
    for work in spec["workloads"]:
        for launch in codegen.training_step_launches(
                work["C"], getattr(torch, work["dtype"]), B=work["B"], L=work["L"],
                dilation=work["dilation"]):
            name = f"{launch.fn.fn.__module__.rsplit('.', 1)[1]}.{launch.name}"
            captured.setdefault(name, launch)
    for i, launch in enumerate(spec["launches"]):
        result: Dict[str, object] = {}
        try:
            if launch["kernel"] not in captured:
                raise LookupError(f"{launch['kernel']}: not launched by the captured step")
            compiled = codegen.compile_launch(captured[launch["kernel"]])
            with open(os.path.join(out_dir, f"{i}.cubin"), "wb") as f:
                f.write(compiled.asm["cubin"])
            result["metadata"] = {k: v for k, v in _metadata_dict(compiled).items()
                                  if isinstance(v, (int, float, str, bool)) or v is None}
            result["metadata"]["target"] = "cuda:90"
        except Exception as exc:  # noqa: BLE001 - one kernel's failure is its own row
            result["error"] = error_text(exc)
        with open(os.path.join(out_dir, f"{i}.json"), "w") as f:
            json.dump(result, f)


def sm90_compiled(launches: List[Dict[str, object]], workloads: List[Workload],
                  timeout_s: float) -> List[Tuple[Optional[bytes], Dict[str, object]]]:
    """(cubin, {"metadata"} or {"error"}) per launch, compiled for sm_90 in a subprocess;
    what it had not compiled when the time ran out is an error entry."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "launches.json")
        with open(spec, "w") as f:
            json.dump({"launches": launches, "workloads": [
                dict(C=w.C, B=w.B, L=w.L, dtype=w.dtype, dilation=w.dilation)
                for w in workloads if w.mode == "train"]}, f, default=str)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), REPO,
                                             env.get("PYTHONPATH", "")])
        code = (f"from evidence.triton_meta import compile_for_sm90; "
                f"compile_for_sm90({spec!r}, {tmp!r})")
        try:
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=max(timeout_s, 1.0))
            if done.returncode != 0:
                raise RuntimeError("the sm_90 compile subprocess failed: " + done.stderr[-1500:])
        except subprocess.TimeoutExpired:
            pass  # keep what was compiled in time
        results = []
        for i in range(len(launches)):
            meta_path = os.path.join(tmp, f"{i}.json")
            if not os.path.exists(meta_path):
                results.append((None, {"error": "not compiled: section time budget spent"}))
                continue
            with open(meta_path) as f:
                result = json.load(f)
            cubin = None
            if "error" not in result:
                with open(os.path.join(tmp, f"{i}.cubin"), "rb") as f:
                    cubin = f.read()
            results.append((cubin, result))
    return results


# --------------------------------------------------------------------------- section 7


def _constexpr_text(consts: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in consts.items())


def _dtypes_text(args: Dict[str, object]) -> str:
    dtypes = sorted({v["tensor"] for v in args.values() if isinstance(v, dict)})
    return "/".join(dtypes)


SMOKE_KERNELS = 4


def _smoke_selection(section: Section, launches: List[Dict[str, object]]):
    """The smoke run compiles the first launch of SMOKE_KERNELS kernels: enough to keep the
    path working, in seconds."""
    picked, names = [], set()
    for launch in launches:
        if launch["kernel"] not in names and len(picked) < SMOKE_KERNELS:
            picked.append(launch)
            names.add(launch["kernel"])
        else:
            section.skip(f"{launch['kernel']} {_constexpr_text(launch['constexprs'])}",
                         f"smoke run: compiles one launch of {SMOKE_KERNELS} kernels")
    return picked


def run_triton_meta(ctx: Context, section: Section) -> None:
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        raise SectionSkipped(f"the Triton backend is unavailable here: {reason}")
    kernels = triton_kernels()
    launches = record_workload_launches(ctx, kernels)
    cuobjdump = find_cuobjdump()
    section.data.update(workloads=[w.label for w in _workloads(ctx)], cuobjdump=cuobjdump,
                        source="the device's own JIT compile" if ctx.cuda else
                        "triton.compile(..., target=GPUTarget('cuda', 90, 32)) on the CPU",
                        kernels=[])
    section.notes.append(f"compiled by: {section.data['source']}; workloads: "
                         + "; ".join(section.data["workloads"]))
    if ctx.cuda:
        compiled = []
        for launch in launches:
            try:
                kernel = device_compiled(kernels[launch["kernel"]], launch)
                compiled.append((kernel.asm["cubin"], {"metadata": _metadata_dict(kernel)},
                                 getattr(kernel, "n_regs", None),
                                 getattr(kernel, "n_spills", None)))
            except Exception as exc:  # noqa: BLE001 - one kernel's failure is its own row
                compiled.append((None, {"error": error_text(exc)}, None, None))
    else:
        launches = _smoke_selection(section, launches)
        compiled = [(cubin, result, None, None)
                    for cubin, result in sm90_compiled(launches, _workloads(ctx),
                                                       ctx.budget.left())]
    table = section.table("", ["kernel", "dtypes", "constexprs", "regs", "spills", "shared",
                               "warps", "stages", "HGMMA", "HMMA", "LDG bits:count",
                               "LDGSTS", "UTMALDG", "LDL/STL"])
    for launch, (cubin, result, n_regs, n_spills) in zip(launches, compiled):
        row = {"kernel": launch["kernel"], "constexprs": launch["constexprs"],
               "dtypes": _dtypes_text(launch["args"])}
        if cubin is None:
            row["error"] = result["error"]
            table.add(launch["kernel"], row["dtypes"], _constexpr_text(launch["constexprs"]),
                      "error: " + result["error"][:100], *[""] * 10)
            section.data["kernels"].append(row)
            continue
        row.update(kernel_report(cubin, result["metadata"], cuobjdump, n_regs, n_spills))
        section.data["kernels"].append(row)
        sass = row["sass"]
        counts = (["-"] * 6 if isinstance(sass, str) else
                  [sass["HGMMA"], sass["HMMA"],
                   " ".join(f"{w}:{n}" for w, n in sass["LDG_by_bits"].items()) or "0",
                   sass["LDGSTS"], sass["UTMALDG"], f"{sass['LDL']}/{sass['STL']}"])
        table.add(launch["kernel"], row["dtypes"], _constexpr_text(launch["constexprs"]),
                  row["registers"], row["spills"] if row["spills"] is not None else
                  f"local {row.get('local_bytes', '-')} B", row["shared_bytes"],
                  row["num_warps"], row["num_stages"], *counts)
        if isinstance(sass, str):
            section.skip(f"SASS of {launch['kernel']}", sass)
