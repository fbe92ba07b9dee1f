"""The functional core: step(plan, x, state, position) -> y, and its reference twin step_ref.

As causal-conv1d's causal_conv1d_update, the step holds nothing: the caller owns the state
(a flat tensor of plan.state_size(B) values in the compute dtype, layout.py's ring layout)
and the position (a one-element int64 tensor: the steps taken since the zero state), and
the step advances both in place:

    state = torch.zeros(plan.state_size(B), dtype=plan.compute_dtype)
    position = torch.zeros(1, dtype=torch.int64)
    y_t = step(plan, x_t, state, position)      # x_t (B, C_in)      -> (B, C_out)
    y = step(plan, chunk, state, position)      # chunk (B, C_in, n) -> (B, C_out, n)

step runs a kernel: "cpp" (csrc/cpu/stream_cpu.cpp, CPU) or "triton"
(fastres/backends/triton/stream_step.py, CUDA; CPU under TRITON_INTERPRET=1). step_ref is
the same step in plain PyTorch (per conv, F.conv1d over [its ring's history, the chunk]),
written independently of the kernels: it is what the tests judge them by, and the "torch"
backend where no kernel runs. x may have any strides (a slice x[:, :, t] of a longer
sequence is read in place by the cpp kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _alloc, _ext, backends
from ..conventions import triton_interpreting
from .errors import StreamError
from .layout import POINTWISE, RELU
from .plan import Plan

BACKENDS = ("cpp", "triton", "torch")


# ----------------------------------------------------------------------------- availability


def cpp_unavailable() -> Optional[str]:
    reason = _ext.load_error()
    if reason is None and (not hasattr(torch.ops.fastres_ext, "stream_forward")
                           or not hasattr(_cpp_module(), "stream_step")
                           or not hasattr(_cpp_module(), "StreamStep")
                           or not hasattr(_cpp_module(), "stream_chunk_kernels")):
        reason = "fastres._C was built without the streaming kernel (csrc/cpu/stream_cpu.cpp) " \
                 "or with an older one; rebuild it"
    return reason


def _cpp_module():
    import fastres._C as extension   # loaded: _ext.load_error() is None
    return extension


def cpp_step_function():
    """fastres._C.stream_step(weights, meta, state, position, workspace, weights16, x, out)
    -> out: the C++ kernel called without the dispatcher (cpp_unavailable() must be None)."""
    return _cpp_module().stream_step


def cpp_bound_step(plan: Plan, meta: Tensor, state: Tensor, position: Tensor,
                   workspace: Tensor):
    """fastres._C.StreamStep: the C++ step bound to a stream's tensors, checked once;
    calling it, bound(x, out=None) -> out, checks only x and out (cpp_unavailable() must be
    None). `workspace`: at least 4 * B * max_c values (one step's activations)."""
    return _cpp_module().StreamStep(plan.weights, meta, state, position, workspace,
                                    plan.weights16)


def bf16_unavailable() -> Optional[str]:
    """None if the cpp kernel's bf16 weights run here (on any CPU: the bf16 dot product
    where the CPU has one, else the weights widened to float32), else why."""
    reason = cpp_unavailable()
    if reason is None and not hasattr(_cpp_module(), "stream_bf16_kernel"):
        reason = "fastres._C was built with an older streaming kernel; rebuild it"
    return reason


def unavailable_reason(backend: str, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None if stream backend `backend` runs models of `dtype` on `device` here, else why."""
    if backend not in BACKENDS:
        raise StreamError(f"fastres.stream: unknown backend {backend!r}; choose from "
                          f"{', '.join(BACKENDS)}")
    if backend == "cpp":
        return "runs on CPU only" if device.type != "cpu" else cpp_unavailable()
    if backend == "triton":
        if dtype == torch.float64:
            return "the Triton kernel computes in float32; float64 models stream on 'torch'"
        reason = backends.get("triton").unavailable_reason()
        if reason is None and device.type == "cpu" and not triton_interpreting():
            reason = "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return reason
    return None


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs here: cpp on CPU, triton on CUDA, else torch."""
    preferred = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(b for b in preferred if unavailable_reason(b, device, dtype) is None)


# ----------------------------------------------------------------------------- the step


def step(plan: Plan, x: Tensor, state: Tensor, position: Tensor, *,
         out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Advance `state` and `position` by x (B, C_in) -> (B, C_out), or by a chunk
    x (B, C_in, n) -> (B, C_out, n); the outputs the full causal forward gives at these steps.

    x has the model's dtype (16-bit inputs compute in float32) and any strides; `out`
    (optional) receives the outputs. `backend`: "cpp", "triton" or "torch" (step_ref);
    default: the fastest that runs on the plan's device.
    """
    if backend is None:
        backend = default_backend(plan.device, plan.dtype)
    reason = unavailable_reason(backend, plan.device, plan.dtype)
    if reason is None and plan.weights16 is not None:
        reason = "bf16 weights run on the cpp backend only" if backend != "cpp" \
            else bf16_unavailable()
    if reason is not None:
        raise StreamError(f"fastres.stream: backend {backend!r} does not run here: {reason}")
    check_input(plan, x)
    batch = x.shape[0]
    size = plan.state_size(batch)
    if not isinstance(state, Tensor) or state.shape != (size,) \
            or state.dtype != plan.compute_dtype or not state.is_contiguous() \
            or state.device != plan.device:
        raise StreamError(f"fastres.stream: state must be a contiguous {size}-value "
                          f"{plan.compute_dtype} tensor on {plan.device} for batch size {batch}")
    if not isinstance(position, Tensor) or position.shape != (1,) \
            or position.dtype != torch.int64:
        raise StreamError("fastres.stream: position must be a one-element int64 tensor")
    if out is not None:
        check_out(plan, x, out)
    if backend == "torch":
        return step_ref(plan, x, state, position, out=out)
    if backend == "cpp":
        run = lambda xc, o: step_cpp(plan, xc, state, position, o, plan.meta(batch))  # noqa: E731
        direct = (torch.float32, torch.float64)
    else:
        scratch = torch.empty(batch * plan.c_out, dtype=torch.float32, device=plan.device)
        run = lambda xc, o: step_triton(plan, xc, state, position, o,  # noqa: E731
                                        plan.meta(batch), scratch)
        direct = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in direct:   # 16-bit on the CPU kernel: compute in float32
        y = new_output(plan, x, plan.compute_dtype)
        run(x.to(plan.compute_dtype), y)
        return y.to(plan.dtype) if out is None else out.copy_(y)
    if out is None:
        out = new_output(plan, x, x.dtype)
    run(x, out)
    return out


def step_cpp(plan: Plan, x: Tensor, state: Tensor, position: Tensor, out: Tensor,
             meta: Tensor, workspace: Optional[Tensor] = None) -> None:
    """The C++ kernel (its own checks only): x and out float32/float64 with any strides;
    `workspace` at least 4 * B * n * max_c values (else the kernel allocates one)."""
    if workspace is None:
        workspace = plan.weights[:0]
    cpp_step_function()(plan.weights, meta, state, position, workspace, plan.weights16, x,
                        out)


def step_triton(plan: Plan, x: Tensor, state: Tensor, position: Tensor, out: Tensor,
                meta: Tensor, scratch: Tensor) -> None:
    """The Triton kernel, unchecked: `scratch` B * C_out float32 values on the device."""
    backends.get("triton").stream_forward(x, out, plan.weights, meta, state, position,
                                          scratch, plan.max_c)
    position += x.shape[-1] if x.dim() == 3 else 1


@torch.no_grad()
def step_ref(plan: Plan, x: Tensor, state: Tensor, position: Tensor, *,
             out: Optional[Tensor] = None) -> Tensor:
    """step in plain PyTorch, in the plan's compute dtype: per conv, F.conv1d over [its
    ring's last (K-1)*d inputs, the chunk]; then the chunk's last inputs into the ring."""
    chunk = (x if x.dim() == 3 else x.unsqueeze(-1)).to(plan.compute_dtype)
    pos = int(position)
    h = chunk
    convs = plan.cast_convs()
    for layer, (conv1, conv2, down), (ring_in, ring_mid) in zip(
            plan.layers, convs, plan.rings(state, x.shape[0])):
        if layer.kind == RELU:
            _with_history(ring_in, h, pos, layer.slots)
            h = torch.relu(h)
        elif layer.kind == POINTWISE:
            _with_history(ring_in, h, pos, layer.slots)
            h = F.conv1d(h, conv1.weight, conv1.bias)
        else:
            a = torch.relu(F.conv1d(_with_history(ring_in, h, pos, layer.slots),
                                    conv1.weight, conv1.bias, dilation=conv1.dilation))
            z = F.conv1d(_with_history(ring_mid, a, pos, layer.slots), conv2.weight,
                         conv2.bias, dilation=conv2.dilation)
            res = h if down is None else F.conv1d(h, down.weight, down.bias)
            if layer.relu_before_add:
                z = torch.relu(z)
            h = torch.relu(z + res)
    y = h if x.dim() == 3 else h.squeeze(-1)
    position += chunk.shape[-1]
    if out is None:
        return y.to(plan.dtype)
    return out.copy_(y)


def _with_history(ring: Tensor, chunk: Tensor, pos: int, slots: int) -> Tensor:
    """[the ring's last slots-1 inputs, chunk] along time, (B, C, slots - 1 + n); then the
    last `slots` inputs of that go into the ring (slot = time mod slots)."""
    past = slots - 1
    times = torch.arange(pos - past, pos + chunk.shape[-1], device=chunk.device)
    history = ring[times[:past] % slots].permute(1, 2, 0)
    full = torch.cat([history, chunk], dim=-1)
    ring[times[-slots:] % slots] = full[..., -slots:].permute(2, 0, 1)
    return full


# ----------------------------------------------------------------------------- checks


def new_output(plan: Plan, x: Tensor, dtype: torch.dtype) -> Tensor:
    return _alloc.empty((x.shape[0], plan.c_out) + tuple(x.shape[2:]), dtype=dtype,
                        device=x.device)


def check_input(plan: Plan, x) -> None:
    """StreamError unless x is a (B, C_in) or (B, C_in, n >= 1) tensor of the plan's dtype
    and device."""
    if not isinstance(x, Tensor):
        raise StreamError(f"fastres.stream: step takes a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise StreamError(f"fastres.stream: step takes x of shape (B, C_in) or (B, C_in, "
                          f"n), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise StreamError("fastres.stream: the batch size must be at least 1")
    if x.shape[1] != plan.c_in:
        raise StreamError(f"fastres.stream: x has {x.shape[1]} channels, the model takes "
                          f"{plan.c_in} (x must be (B, C_in) or (B, C_in, n))")
    if x.dim() == 3 and x.shape[2] == 0:
        raise StreamError("fastres.stream: a chunk must hold at least one step")
    if x.dtype != plan.dtype:
        raise StreamError(f"fastres.stream: x is {x.dtype}, the model is {plan.dtype}")
    if x.device != plan.device:
        raise StreamError(f"fastres.stream: x is on {x.device}, the model on {plan.device}")


def check_out(plan: Plan, x: Tensor, out) -> None:
    """StreamError unless out is a (B, C_out[, n]) tensor of the plan's dtype and device
    whose elements do not overlap (any strides: a slice of a longer output is written in
    place)."""
    shape = (x.shape[0], plan.c_out) + tuple(x.shape[2:])
    if not isinstance(out, Tensor) or out.shape != shape or out.dtype != plan.dtype \
            or out.device != plan.device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" \
            if isinstance(out, Tensor) else type(out).__name__
        raise StreamError(f"fastres.stream: out must be a {shape} {plan.dtype} tensor on "
                          f"{plan.device}, got {got}")
    if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        raise StreamError("fastres.stream: out must not overlap itself (an expanded tensor "
                          "cannot take distinct outputs)")
