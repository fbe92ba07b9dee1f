"""The public streaming API: Stream, a thin stateful wrapper around the functional core
(core.py) that owns one state and position, and stream(model) that builds one. The package
docstring (fastres/stream/__init__.py) states the semantics.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import _alloc
from . import export
from .core import (bf16_unavailable, check_input, check_out, default_backend, new_output,
                   unavailable_reason)
from .errors import StreamError
from .fold import Snapshot
from .plan import Plan
from .runners import RUNNERS, Runner


class Stream:
    """A causal stack run one step, or one chunk, at a time, carrying its state.

    Build with fastres.stream(model). Not thread-safe: one stream per thread.
    """

    def __init__(self, model: nn.Module, *, batch_size: Optional[int] = None,
                 backend: Optional[str] = None, weight_dtype: Optional[torch.dtype] = None):
        if not isinstance(model, nn.Module):
            raise StreamError(f"fastres.stream: expected an nn.Module, got "
                              f"{type(model).__name__}")
        self._model = model
        self._plan = Plan(model, weight_dtype)
        self._snapshot = Snapshot(model)
        device, dtype = self._plan.device, self._plan.dtype
        if backend is None:
            backend = default_backend(device, dtype)
        reason = unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise StreamError(f"fastres.stream: backend {backend!r} cannot run a "
                              f"{str(dtype).replace('torch.', '')} model on {device.type}: "
                              f"{reason}")
        if self._plan.weights16 is not None:
            reason = "they run on the cpp backend only" if backend != "cpp" \
                else bf16_unavailable()
            if reason is not None:
                raise StreamError(f"fastres.stream: bf16 weights on backend {backend!r}: "
                                  f"{reason}")
        self.backend = backend
        self._batch: Optional[int] = None
        self._batch_origin = ""   # what fixed the batch size, for the mismatch error
        self._runner: Optional[Runner] = None
        self._fast = None   # the runner's fast path, where it has one
        if batch_size is not None:
            self.reset(batch_size)
            self._batch_origin = "the constructor"

    # --- what the stream is

    @property
    def in_channels(self) -> int:
        return self._plan.c_in

    @property
    def out_channels(self) -> int:
        return self._plan.c_out

    @property
    def dtype(self) -> torch.dtype:
        return self._plan.dtype

    @property
    def device(self) -> torch.device:
        return self._plan.device

    @property
    def receptive_field(self) -> int:
        """Input steps one output depends on (the stream's memory, plus the current step)."""
        return self._plan.receptive_field

    @property
    def batch_size(self) -> Optional[int]:
        """Streams advanced together; None until the first step (or reset) fixes it."""
        return self._batch

    @property
    def position(self) -> int:
        """Steps taken since the zero state."""
        return 0 if self._runner is None else int(self._runner.position)

    # --- stepping

    def step(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Advance every stream: x (B, C_in) -> (B, C_out), or a chunk x (B, C_in, n) ->
        (B, C_out, n), the causal forward's outputs at these steps. x may have any strides
        (a slice x[:, :, t] of a longer sequence, a transpose, an expanded tensor): it is
        read in place.

        `out`: a tensor of the output's shape, dtype and device to write into (any strides
        that do not overlap; then nothing is allocated per step).
        """
        fast = self._fast
        if fast is not None and not _alloc._poison:
            # The C++ kernel checks x and out itself, before it changes anything; where they
            # do not fit, the checks below say why (or convert a 16-bit x).
            try:
                return fast(x, out)
            except (RuntimeError, TypeError):
                pass
        return self._step(x, out)

    def _step(self, x: Tensor, out: Optional[Tensor]) -> Tensor:
        # The checks are ordered so that a well-formed step pays only for comparisons.
        if self._runner is None or not isinstance(x, Tensor) or x.dim() not in (2, 3) \
                or x.shape[0] != self._batch:
            self._check_first(x)
        plan, runner = self._plan, self._runner
        if x.shape[1] != plan.c_in or x.dtype != plan.dtype or x.device != plan.device \
                or (x.dim() == 3 and x.shape[2] == 0):
            check_input(plan, x)
        if x.dtype not in runner.direct_dtypes:
            # 16-bit on the CPU kernels: convert once, compute in float32.
            result = new_output(plan, x, plan.compute_dtype)
            runner.run(x.to(plan.compute_dtype), result)
            if out is None:
                return result.to(plan.dtype)
            check_out(plan, x, out)
            return out.copy_(result)
        if out is None:
            out = new_output(plan, x, x.dtype)
        else:
            check_out(plan, x, out)
        runner.run(x, out)
        return out

    def _check_first(self, x) -> None:
        check_input(self._plan, x)
        if self._batch is None:
            self.reset(x.shape[0])
            self._batch_origin = "the first step"
        elif x.shape[0] != self._batch:
            raise StreamError(
                f"fastres.stream: this stream advances {self._batch} streams (batch size set "
                f"by {self._batch_origin}), got x with batch size {x.shape[0]}; call "
                f"reset(batch_size={x.shape[0]}) to start over with that many, or use "
                "another stream")

    # --- state

    def reset(self, batch_size: Optional[int] = None) -> None:
        """Back to the zero state (the causal padding's zeros); `batch_size` changes how many
        streams advance together."""
        if batch_size is None:
            batch_size = self._batch
        if batch_size is None:
            return   # nothing allocated yet: the first step starts from zeros
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StreamError(f"fastres.stream: batch_size must be an int >= 1, got "
                              f"{batch_size!r}")
        if batch_size != self._batch:
            self._allocate(batch_size)
            self._batch_origin = "reset(batch_size=...)"
        self._runner.state.zero_()
        self._runner.position.zero_()

    def _allocate(self, batch: int) -> None:
        plan = self._plan
        state = torch.zeros(plan.state_size(batch), dtype=plan.compute_dtype,
                            device=plan.device)
        position_device = plan.device if self.backend == "triton" else torch.device("cpu")
        position = torch.zeros(1, dtype=torch.int64, device=position_device)
        self._runner = RUNNERS[self.backend](plan, batch, state, position)
        self._fast = self._runner.fast if plan.dtype in self._runner.direct_dtypes else None
        self._batch = batch

    def state(self) -> dict:
        """A copy of the state: {"rings", "position", "batch_size", "layout"}. Save it with
        torch.save; load_state restores it into any stream of the same model."""
        if self._runner is None:
            raise StreamError("fastres.stream: no state yet (take a step or reset(batch_size) "
                              "first)")
        return {"rings": self._runner.state.clone(), "position": self.position,
                "batch_size": self._batch, "layout": self._plan.layout}

    def load_state(self, state: dict) -> None:
        """Continue from a state that state() returned (its batch size too)."""
        if not isinstance(state, dict) or set(state) != {"rings", "position", "batch_size",
                                                         "layout"}:
            raise StreamError("fastres.stream: load_state takes the dict state() returns")
        if tuple(map(tuple, state["layout"])) != self._plan.layout:
            raise StreamError("fastres.stream: the state comes from a model with other layers "
                              f"(layout {state['layout']}, this model {self._plan.layout})")
        rings = state["rings"]
        batch = state["batch_size"]
        size = self._plan.state_size(batch)
        if not isinstance(rings, Tensor) or rings.shape != (size,) \
                or rings.dtype != self._plan.compute_dtype:
            raise StreamError(f"fastres.stream: state['rings'] must be a {size}-value "
                              f"{self._plan.compute_dtype} tensor for batch size {batch}")
        if batch != self._batch:
            self._allocate(batch)
            self._batch_origin = "load_state"
        self._runner.state.copy_(rings)
        self._runner.position.fill_(int(state["position"]))

    def onnx_state(self) -> List[Tensor]:
        """The current state in export_onnx's layout (fastres/stream/export.py): what to feed
        the exported step to continue from here (zeros at the zero state)."""
        batch = self._batch if self._batch is not None else 1
        if self._runner is None:
            return [torch.zeros(shape, dtype=self._plan.compute_dtype, device=self.device)
                    for shape in export.history_shapes(self._plan, batch)]
        return export.history_state(self._plan, self._runner.state, self.position, batch)

    # --- deployment

    def export_onnx(self, path, chunk: int = 1) -> None:
        """Write an ONNX model of one step (chunk=1: x (B, C_in) -> y (B, C_out)) or of a
        chunk of `chunk` steps (x (B, C_in, chunk)), with the state as explicit inputs and
        outputs: inputs (x, state_0, state_1, ...), outputs (y, new_state_0, ...); feed each
        new_state_i back as state_i. The state, in the model's order: for every block whose
        convs look back ((K-1)*d > 0), its input's last (K-1)*d steps (B, C_in, (K-1)*d),
        then its h = relu(conv1)'s (B, C_out, (K-1)*d), oldest first; all zeros is the zero
        state, onnx_state() the stream's current one. B is dynamic. The weights are the
        stream's fold (refold() first if the model changed)."""
        export.export_onnx(self._plan, path, chunk)

    # --- the model behind it

    def stale(self) -> bool:
        """Whether the model changed (parameter or buffer values, train/eval modes) since
        the stream folded it."""
        return not self._snapshot.matches(self._model)

    def refold(self) -> None:
        """Fold the model's current parameters again, keeping the state."""
        snapshot, plan = Snapshot(self._model), Plan(self._model, self._plan.weight_dtype)
        if plan.layout != self._plan.layout or plan.dtype != self._plan.dtype \
                or plan.device != self._plan.device:
            raise StreamError("fastres.stream: the model's layers, dtype or device changed; "
                              "build a new stream")
        runner = self._runner
        self._snapshot, self._plan = snapshot, plan
        if runner is not None:
            self._runner = RUNNERS[self.backend](plan, self._batch, runner.state,
                                                  runner.position)
            self._fast = self._runner.fast if plan.dtype in self._runner.direct_dtypes \
                else None

    def __repr__(self) -> str:
        return (f"fastres.Stream({self.in_channels} -> {self.out_channels} channels, "
                f"{len(self._plan.layers)} layers, receptive field {self.receptive_field}, "
                f"batch {self._batch}, position {self.position}, backend {self.backend!r})")


def stream(model: nn.Module, *, batch_size: Optional[int] = None,
           backend: Optional[str] = None,
           weight_dtype: Optional[torch.dtype] = None) -> Stream:
    """A Stream running `model` one step (or chunk) at a time; see this module's docstring.

    Args:
        model: a causal stack in eval mode (what streams: see fastres.stream's docstring).
        batch_size: how many streams advance together; default: the first step's batch.
        backend: "cpp", "triton" or "torch"; default: the fastest available for the model's
            device (cpp on CPU when the extension is built, triton on CUDA).
        weight_dtype: torch.bfloat16: single steps of fewer than 16 streams (per thread) on
            the cpp backend read bfloat16 weights (half the bytes a step reads) and sum in
            float32: with the bf16 dot product on CPUs that have one (AVX512_BF16, inputs
            rounded to bf16), else widening the weights to float32 in registers (any CPU).
            Accuracy: the spec's bf16 bound (1e-2), not float32's. Chunks and larger
            batches compute with the float32 weights. Default None: float32 weights.
    """
    return Stream(model, batch_size=batch_size, backend=backend, weight_dtype=weight_dtype)

