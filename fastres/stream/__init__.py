"""Streaming inference: run a causal TCN one time step, or one chunk, at a time.

    s = fastres.stream(model.eval())   # TemporalConvNet, TemporalBlocks, nn.Sequential of them
    y_t = s.step(x_t)                  # x_t (B, C_in) -> (B, C_out); any strides, e.g. x[:, :, t]
    y = s.step(chunk)                  # chunk (B, C_in, n) -> (B, C_out, n)
    saved = s.state()                  # a copy; s.load_state(saved) restores it
    s.reset()                          # back to the zero state

Feeding x[..., 0], x[..., 1], ... gives at every step the output the full causal forward
(eval mode) gives at that step: a causal conv only needs its last (K-1)*d inputs, kept in a
ring buffer per conv, zero at the start as the causal padding is. A step then costs one
small matrix-vector product per conv tap instead of a re-run of the receptive field.

What streams: fastres.TemporalConvNet; TemporalBlock (norm="batch" with its batch norms in
eval mode, or norm="weight"), also the plain twins fastres.unfuse makes and the blocks
fastres.convert makes of seed and locuslab/TCN blocks; causal BasicBlocks at stride 1;
nn.Sequential stacks of these, with 1x1 nn.Conv1d (pointwise heads), nn.ReLU, nn.Identity
and nn.Dropout (eval mode, or p=0) between them. Anything else raises StreamError naming
the module and why: "same" padding (BasicBlock, ResNet1d) looks at future steps, stride > 1
changes the step rate, batch norm in training mode and active dropout depend on the whole
batch or on chance, an unknown module's per-step behaviour cannot be derived.

The stream is a snapshot. Building it folds batch norm into the conv weights (and takes
weight norm's normalized weight) once; changing the model afterwards (an optimizer step,
load_state_dict) does not reach the stream: call `refold()` (keeps the state) or build a new
stream. `stale()` says whether the model changed since the last fold (values, modes, and
attributes such as a batch norm's eps).

Batch size is fixed by the constructor's `batch_size`, else by the first step; a step with
another batch size raises. `reset(batch_size=...)` changes it.

Backends (`backend=`, default: the fastest available for the model's device):
    "cpp"     CPU: the C++ kernel csrc/cpu/stream_cpu.cpp, one call per step or chunk for
              the whole stack (fastres._C.StreamStep: the stream's tensors bound and checked
              once, a step checks only x and out; no dispatcher), x read in place with its
              strides, weights packed in one buffer, no tensor allocated per step beyond the
              output (none with step(x, out=...)). Optional bf16 weights for single steps:
              stream(..., weight_dtype=torch.bfloat16).
    "triton"  CUDA: one Triton launch per step or chunk for the whole stack
              (fastres/backends/triton/stream_step.py); single steps replay a CUDA graph.
              On CPU only under TRITON_INTERPRET=1, for tests.
    "torch"   anywhere: the same semantics in plain PyTorch (F.conv1d over [ring, chunk]);
              what runs when the extension is not built.
Every backend keeps the same state layout, so a state moves between them.

Computation is float32 (float64 for float64 models); 16-bit inputs and outputs are
converted once per call on the CPU backends. A stream is for inference: no gradient flows
through it (its outputs never require grad).

Deployment: s.export_onnx(path, chunk=1) writes an ONNX model of one step (or chunk) with
the state as explicit inputs and outputs (export.py states the layout).

The package, one idea a file:
    layout.py          the packed weights / meta / state layout both kernels read
    fold.py            model -> streamable layers, batch norm folded; refusals; staleness
    plan.py            packing the folded layers into the kernels' buffers
    core.py            step(plan, x, state, position) -> y, stateless, and step_ref, its
                       pure-PyTorch twin (the tests' oracle and the "torch" backend)
    runners.py         what a Stream keeps per backend around the core
    api.py             Stream and stream()
    export.py          the streaming ONNX export
    whole_sequence.py  TemporalConvNet.forward's fast path through the same kernel
"""
from .api import Stream, stream
from .core import BACKENDS, step, step_ref, unavailable_reason
from .errors import StreamError
from .plan import Plan
from .whole_sequence import whole_sequence

__all__ = ["BACKENDS", "Plan", "Stream", "StreamError", "step", "step_ref", "stream",
           "unavailable_reason", "whole_sequence"]
