"""How a fused module's stages run, chosen by timing the whole module.

Each stage's backend is measured on its own (fastres/backends/autotune.py). Inside a module
the stages run next to each other, and on a CPU switching between PyTorch's oneDNN convs and
the BLAS the C++ kernels call costs both sides tens of microseconds each time: measured on a
2-core CPU, an 8-block TemporalConvNet training step at batch 1 ran 1.22x plain PyTorch with
every stage on the C++ kernels but 1.04x with the stages' separate choices mixed, and a
ResNet1d forward whose early stages each measured faster on the C++ kernels ran 0.89x plain.
So the outermost fused module of a call (a ResNet1d, or a block on its own: the blocks of a
TemporalConvNet each time themselves) times, on the first call of each input signature,
its whole forward (and backward, when training) under each policy:

    plain       the plain twin's forward, run on the module itself: exactly what
                fastres.unfuse(module) runs, PyTorch's kernels and nothing else. For 16-bit
                inputs that need gradients "eager" instead: every stage on PyTorch's kernels
                computing in float32, because plain 16-bit PyTorch rounds the conv output
                before batch norm and its gradients miss the 1e-2 bound (2-3.5e-2 measured);
                its 16-bit outputs stay within it (a TemporalBlock, a ResNet1d and a
                TemporalConvNet in eval, 20 draws each: at most 5.9e-3), so forward-only
                16-bit calls keep the plain twin as their baseline.
    auto        every stage its own measured choice
    <backend>   every stage on that fused backend (cpp on CPU; triton, cuda on CUDA)

and keeps the fastest; anything but the plain policy must beat it by the stages' margin
(backends/autotune.py), so the module is never slower than its plain twin. Measuring
restores the module's buffers (running statistics, num_batches_tracked) and the random
number generators, and takes gradients with torch.autograd.grad, so nothing the user sees
changes. A backend forced with fastres.use_backend, torch.compile tracing and autocast skip
all this (the stages decide per call as usual), and so do modules with hooks (measuring
would call them) or synchronized batch norm (its stages run their own synchronized path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import threading
import time
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

from .. import backends
from ..backends import autotune
from ..conventions import HALF_DTYPES

ROUNDS = 3
_state = threading.local()  # .policy: the policy of the outermost module being run


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a module's stages run for one input signature, and why."""

    backend: str                # "plain", "auto", or a backend forced on every stage
    reason: str
    times_s: Dict[str, float] = dataclasses.field(default_factory=dict)


def _candidates(x: Tensor, needs_grad: bool) -> List[str]:
    fused = [b.name for b in backends.all_backends()
             if b.fused and b.name != "composite" and b.unavailable_reason() is None
             and x.device.type in b.devices and x.dtype in b.dtypes
             and not (b.name == "triton" and x.device.type != "cuda")]
    baseline = "eager" if x.dtype in HALF_DTYPES and needs_grad else "plain"
    return [baseline, "auto"] + fused


def forward_with_policy(module: nn.Module, x: Tensor) -> Tensor:
    """module's forward(x) under the policy measured for this input signature."""
    inner = getattr(_state, "policy", None)
    if inner is not None:  # inside an outer fused module: follow its policy
        return module.plain_forward(x) if inner == "plain" else module.fused_forward(x)
    if not isinstance(x, Tensor) or x.device.type not in ("cpu", "cuda") \
            or torch.compiler.is_compiling() or torch.jit.is_tracing() \
            or torch.is_autocast_enabled(x.device.type) \
            or backends.forced_backend() is not None:
        return module.fused_forward(x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in module.parameters()))
    key = (x.shape, x.dtype, x.device, module.training, needs_grad)
    policies = module.__dict__.setdefault("_fastres_policies", {})
    policy = policies.get(key)
    if policy is None:
        policy = policies[key] = _measure(module, x, needs_grad)
    if backends.is_recording():
        backends.record(module, None, backends.Decision(f"policy: {policy.backend}",
                                                        policy.reason))
    if policy.backend == "plain":  # the common CPU answer: no backend to force
        _state.policy = "plain"
        try:
            return module.plain_forward(x)
        finally:
            _state.policy = None
    with _running(policy.backend):
        return _forward(module, policy.backend, x)


def _forward(module: nn.Module, policy: str, x: Tensor) -> Tensor:
    return module.plain_forward(x) if policy == "plain" else module.fused_forward(x)


@contextlib.contextmanager
def _running(policy: str):
    """Nested fused modules follow `policy`; its stages run on it when it is a backend."""
    _state.policy = policy
    try:
        if policy in ("plain", "auto"):
            yield
        else:
            with backends.use_backend(
                    policy, reason=f"the enclosing module measured fastest with {policy}"):
                yield
    finally:
        _state.policy = None


def _not_measured(module: nn.Module):
    """Why `module` keeps its stages' own choices without being timed, or None."""
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            # Timing runs the module several times, and would call the hooks each time.
            return "not measured: submodules have hooks, which the measurement would call"
        if isinstance(m, nn.SyncBatchNorm):
            return "not measured: synchronized batch norm runs its own stage"
    return None


def _measure(module: nn.Module, x: Tensor, needs_grad: bool) -> Policy:
    why_not = _not_measured(module)
    if why_not is not None:
        return Policy("auto", why_not + "; every stage keeps its own choice")
    params = [p for p in module.parameters() if p.requires_grad] if needs_grad else []
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    devices = [x.device.index or 0] if x.is_cuda else []

    def runner(policy: str) -> Callable[[], None]:
        x_copy = x.detach().clone().requires_grad_(x.requires_grad)
        leaves = params + ([x_copy] if x.requires_grad and needs_grad else [])

        def run():
            with _running(policy), torch.set_grad_enabled(needs_grad):
                out = _forward(module, policy, x_copy)
            if leaves:
                torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        return run

    def synchronize():
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    candidates = _candidates(x, needs_grad)
    runs: Dict[str, Callable[[], None]] = {}
    with torch.random.fork_rng(devices=devices), backends.not_recording():
        try:
            for name in candidates:
                try:
                    run = runner(name)
                    run()  # warm-up: the stages' own measurements, compilation, caches
                    runs[name] = run
                except Exception as exc:  # noqa: BLE001 - a policy that cannot run loses
                    if name == candidates[0]:
                        raise
                    autotune.logger.warning("fastres: policy %r cannot run %s: %s", name,
                                            type(module).__name__, exc)
            samples: Dict[str, List[float]] = {name: [] for name in runs}
            names = list(runs)
            for round_index in range(ROUNDS):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    synchronize()
                    start = time.perf_counter()
                    runs[name]()
                    synchronize()
                    samples[name].append(time.perf_counter() - start)
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
    times = {name: statistics.median(s) for name, s in samples.items()}
    baseline = candidates[0]
    best = min(times, key=times.get)
    margin = autotune.MARGIN_BACKWARD if needs_grad else autotune.MARGIN_FORWARD
    if best != baseline and times[best] > (1 - margin) * times[baseline]:
        best = baseline
    text = ", ".join(f"{name} {t * 1e3:.3g} ms" for name, t in
                     sorted(times.items(), key=lambda kv: kv[1]))
    return Policy(best, f"whole module measured: {text}", times)


def policies(module: nn.Module) -> Dict[tuple, Policy]:
    """The policies measured for `module` so far, by input signature."""
    return dict(module.__dict__.get("_fastres_policies", {}))


def forget_policies(module: nn.Module) -> None:
    """Drop the measured policies of `module` and its submodules: the next call of each
    input signature measures again."""
    for m in module.modules():
        m.__dict__.pop("_fastres_policies", None)
