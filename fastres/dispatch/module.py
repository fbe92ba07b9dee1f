"""The module level: how the outermost fused module of a call runs its stages.

Each stage's backend is chosen per call (op.py). Inside a module the stages run next to
each other, and on a CPU switching between PyTorch's oneDNN convs and the BLAS the C++
kernels call costs both sides tens of microseconds each time: measured on a 2-core CPU, an
8-block TemporalConvNet training step at batch 1 ran 1.22x plain PyTorch with every stage
on the C++ kernels but 1.04x with the stages' separate choices mixed. So the outermost
fused module of a call (a block on its own, a ResNet1d, a TemporalConvNet) times, on the
first call of each input signature, its whole forward (and backward, when training) under
each policy, and keeps the fastest:

    plain       the plain twin's forward on the module itself: exactly what
                fastres.unfuse(module) runs. For 16-bit inputs that need gradients
                "eager" instead: every stage on PyTorch's kernels computing in float32,
                because plain 16-bit PyTorch rounds the conv output before batch norm and
                its gradients miss the 1e-2 bound; its 16-bit outputs stay within it, so
                forward-only 16-bit calls keep the plain twin as their baseline.
    stages      every stage its own op-level choice
    <backend>   every stage on that fused backend (cpp on CPU; triton, cuda on CUDA)
    <program>   a whole-module program offered for the module in this mode (what exists:
                backends.module_programs()): "onednn", in eval on a CPU, the whole
                module channels-last on oneDNN with prepacked weights and fused post-ops;
                "onednn-train", in training on a CPU, oneDNN's convs with batch norm,
                residual and ReLU in C++; "stack", TemporalConvNet's whole stack in one
                C++ call at small batch in eval (fastres/stream registers it)

Anything but the baseline must beat it by a margin (measure.py: the forward one, since a
training step is timed whole here), so a module is never slower than its plain twin where
it measured. Measuring restores the module's
buffers and the random number generators, times a bounded slice of a long input, and
takes gradients with torch.autograd.grad, so nothing the user sees changes.

Where a policy would change what the user sees, it is not taken:
- a module or any submodule with hooks is never measured (the runs would call the hooks)
  and runs its stages one by one, stages whose conv or norm has hooks as modules, so every
  hook fires once per call; a path that skips modules ("stack") never runs then;
- torch.jit tracing (and the legacy ONNX exporter) and torch.func transforms run the plain
  twin, whose ops they can trace or transform;
- a forced backend, torch.compile and autocast run the stages, each choosing per call;
- where measuring is unsafe (measure.py: activation checkpointing, a backward pass), the
  stored choice runs, or else the stages.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from .. import _ext, backends
from ..conventions import HALF_DTYPES
from .cache import cache
from .choice import RULE, Choice, record, recording
from .op import forced_backend, fused_backends, use_backend
from .measure import MODULE_CONFIG, bounded_extent, functorch_active, measure, why_not_measure

_state = threading.local()  # .policy: the policy of the outermost module being run
_MEMO = "_fastres_choices"  # module.__dict__ key: input signature -> Choice


def hooked(*modules: Optional[nn.Module]) -> bool:
    """Whether any of `modules`, or any module below one, has forward, pre-forward or
    backward hooks, or any global module hook is registered."""
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks \
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks:
        return True
    walk = None if torch.compiler.is_compiling() else _ext.direct("modules_hooked")
    if walk is not None:  # (in C++, a tenth of the Python walk's time; dynamo traces Python)
        return walk(modules)
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for top in modules if top is not None
               for m in top.modules())


def run(module: nn.Module, x: Tensor) -> Tensor:
    """module's forward(x) under the policy chosen for this input signature."""
    inner = getattr(_state, "policy", None)
    if inner is not None:  # inside an outer fused module: follow its policy
        return module.plain_forward(x) if inner == "plain" else module.fused_forward(x)
    if torch.jit.is_tracing() or torch.jit.is_scripting() or functorch_active():
        return _forward_outermost(module, "plain", x)
    if not isinstance(x, Tensor) or x.device.type not in ("cpu", "cuda") \
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) \
            or forced_backend() is not None:  # (unmeasured: the stages choose per call)
        return module.fused_forward(x)
    choice = _choice(module, x)
    record(module, None, choice)
    return _forward_outermost(module, choice.name, x)


def _choice(module: nn.Module, x: Tensor) -> Choice:
    # Hooks are looked for on every call, whatever was chosen before: they come and go, and
    # the plain twin calls its convs functionally (their hooks fire only in stages run as
    # modules), as the whole-module paths skip every submodule.
    if hooked(module):
        return _HOOKED
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in module.parameters()))
    key = (tuple(x.shape), x.dtype, x.device, module.training, needs_grad)
    memo = module.__dict__.setdefault(_MEMO, {})
    if key in memo:
        return memo[key]
    structure = hashlib.sha1(repr(module).encode()).hexdigest()[:12]
    text_key = (f"module|{type(module).__name__}|{structure}|{x.device.type}|"
                f"{str(x.dtype).replace('torch.', '')}|{'x'.join(map(str, x.shape))}|"
                f"{'train' if module.training else 'eval'}|grad{int(needs_grad)}")
    choice = cache().stored(text_key, str(x.device))
    if choice is None:
        why = why_not_measure() or next(("synchronized batch norm runs its own stage"
                                         for m in module.modules()
                                         if isinstance(m, nn.SyncBatchNorm)), None)
        if why is not None:
            return Choice("module", "stages", f"not measured: {why}; every stage keeps its "
                          "own choice", RULE)
        choice = _measure(module, x, needs_grad)
        cache().store(text_key, str(x.device), choice)
    memo[key] = cache().memory[text_key] = choice
    return choice


_HOOKED = Choice("module", "stages", "not measured: it has hooks, which measuring (or a path "
                 "that skips modules) would call; every stage keeps its own choice, hooked "
                 "ones as modules", RULE)


def _measure(module: nn.Module, x: Tensor, needs_grad: bool) -> Choice:
    batch, length = bounded_extent(x.shape[0], x.shape[-1])
    sample = x.detach()[:batch, ..., :length].clone()
    params = [p for p in module.parameters() if p.requires_grad] if needs_grad else []
    names = (["eager" if x.dtype in HALF_DTYPES and needs_grad else "plain", "stages"]
             + fused_backends(x.device.type, x.dtype)
             + [name for name, program in backends.module_programs().items()
                if program.offered(module, x, needs_grad)])

    def runner(policy: str) -> Callable[[], None]:
        x_copy = sample.clone().requires_grad_(x.requires_grad and needs_grad)
        leaves = params + ([x_copy] if x_copy.requires_grad else [])

        def one_run():
            with torch.set_grad_enabled(needs_grad):
                out = _forward_outermost(module, policy, x_copy, strict=True)
            if leaves:
                torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        return one_run

    with state_restored(module), recording(keep=False, measuring=True):
        return measure("module", {name: runner(name) for name in names}, names[0],
                       str(x.device), needs_grad, config=MODULE_CONFIG)


@contextlib.contextmanager
def state_restored(module: nn.Module) -> Iterator[None]:
    """Run the block and put back what running `module` changes: its buffers (running
    statistics, batch counters), its parameters' gradients, the random number generators."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    devices = sorted({t.device.index or 0 for t in [*buffers.values(), *grads] if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
            for p, g in grads.items():
                p.grad = g


def _forward_outermost(module: nn.Module, policy: str, x: Tensor, strict: bool = False
                       ) -> Tensor:
    """module(x) under `policy`: a whole-module path, or the stages with nested fused
    modules following it (and every stage on it, when it names a backend)."""
    program = backends.module_programs().get(policy)
    if program is not None:
        out = program.run(module, x)
        if out is not None:
            return out
        if strict:
            raise RuntimeError(f"{policy} does not run this input")
        policy = "stages"  # the module changed since (a hook, a mode): run the stages
    forcing = use_backend(policy, f"the enclosing module measured fastest with {policy}") \
        if policy in backends.names() else contextlib.nullcontext()
    _state.policy = policy
    try:
        with forcing:
            return module.plain_forward(x) if policy == "plain" else module.fused_forward(x)
    finally:
        _state.policy = None


def choices(module: nn.Module) -> Dict[tuple, Choice]:
    """The choices measured for `module` so far, by input signature."""
    return dict(module.__dict__.get(_MEMO, {}))
