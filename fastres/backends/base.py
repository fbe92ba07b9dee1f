"""What a backend is: an object that says whether it runs a call, and runs it.

Two kinds exist:

- a kernel backend (fused=True) runs the whole stage in its own kernels, with the contract
  docs/spec.md states ("Backend contract"); the op wraps its forward/backward in one
  torch.library custom op, so autograd, torch.compile and the saved tensors are wired once
  for all of them. Each kernel backend is a subclass of KernelBackend whose class
  attributes state what it can do (devices, dtypes, and the optional parts of the contract:
  counts_batches, adds_grad_x, saves_mask_bits, own_saved_dtype, streams), and whose
  `load()` imports its kernel module with a plain import, on first use: a missing compiler
  or Triton costs nothing until that backend is asked for.
- the eager backend (fused=False) is PyTorch's own kernels composed under autograd; the op
  calls its `run` directly and no custom op is involved.

Which backend runs a call is not decided here: fastres/dispatch/ does that.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .. import conventions
from ..conventions import output_length


@dataclasses.dataclass(frozen=True)
class Call:
    """Everything about one call of the op that decides which backend should run it.

    It is the dispatcher's cache key, so it holds plain values only (no tensors).
    """

    device: str                 # "cpu", "cuda:0", ...
    dtype: torch.dtype
    batch: int
    c_in: int
    c_out: int
    length: int
    kernel_size: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    norm: str                   # conventions.NORM_NONE / NORM_EVAL / NORM_TRAIN
    has_bias: bool
    has_residual: bool
    relu_before_add: bool
    needs_grad: bool
    activation: str = "relu"    # canonical (_activation.Activation.text)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def length_out(self) -> int:
        return output_length(self.length, self.kernel_size, self.dilation, self.stride,
                             self.pad_left, self.pad_right)

    def describe(self) -> str:
        """In words, as `fastres.explain` prints it: 'float32 B8 64->64 L1024 K3 d4 s1 eval'."""
        return (f"{str(self.dtype).replace('torch.', '')} B{self.batch} {self.c_in}->"
                f"{self.c_out} L{self.length} K{self.kernel_size} d{self.dilation} "
                f"s{self.stride} {self.norm}" + "+res" * self.has_residual
                + " grad" * self.needs_grad)

    def key(self) -> str:
        """A stable text form, for the persistent dispatch cache."""
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.device_type}|{dtype}|B{self.batch}|Cin{self.c_in}|Cout{self.c_out}|"
                f"L{self.length}|K{self.kernel_size}|s{self.stride}|d{self.dilation}|"
                f"p{self.pad_left},{self.pad_right}|{self.norm}|bias{int(self.has_bias)}|"
                f"res{int(self.has_residual)}|rba{int(self.relu_before_add)}|"
                f"grad{int(self.needs_grad)}"
                # (ReLU adds nothing: keys stored before activations existed stay valid)
                + ("" if self.activation == "relu" else f"|act={self.activation}"))


class Backend:
    """The interface the dispatcher sees. Subclasses set the class attributes."""

    name: str = ""
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = ()
    fused: bool = True
    description: str = ""
    # The epilogue activations it runs (docs/spec.md, "Activation"; names as
    # _activation.ACTIVATION_NAMES); "all" for every one.
    activations = ("relu",)
    # Whether it runs layer norm over channels (conventions.NORM_LAYER): a kernel whose
    # tile holds every channel of a position can fuse it.
    layer_norm = False
    why_no_layer_norm = "its tiles do not hold every channel of a position"

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this machine, else why not."""
        return None

    def supports(self, call: Call) -> Optional[str]:
        """None when the backend can run `call` here, else why not."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if call.device_type not in self.devices:
            return f"runs on {', '.join(self.devices)} tensors, not {call.device_type}"
        if call.dtype not in self.dtypes:
            return f"does not take {str(call.dtype).replace('torch.', '')}"
        if call.norm == conventions.NORM_LAYER and not self.layer_norm:
            return f"has no layer-norm mode ({self.why_no_layer_norm})"
        name = call.activation.partition(":")[0]
        if self.activations != "all" and name not in self.activations:
            return (f"its epilogue has no {name} activation (it runs "
                    f"{', '.join(self.activations)})")
        return None

    def __repr__(self) -> str:
        return f"<fastres backend {self.name!r}>"


class KernelBackend(Backend):
    """A fused backend whose kernels live in a module, imported on first use by `load`.

    The optional parts of the backend contract (docs/spec.md), stated per backend:
      counts_batches   its forward increments num_batches_tracked itself (else done here)
      adds_grad_x      its data-gradient kernel adds a block's shortcut gradient
      saves_mask_bits  forward returns the final ReLU's mask as bits where the module's
                       saves_mask_bits(has_residual, save_for_backward, norm) says so, and
                       backward reads them (and can defer the residual gradient)
      own_saved_dtype  the module's saved_dtype(...) says what forward saves for backward
      streams          the module has fastres.stream's kernel (stream_forward)
    """

    fused = True
    counts_batches = False
    adds_grad_x = False
    saves_mask_bits = False
    own_saved_dtype = False
    streams = False

    def __init__(self):
        self._module, self._import_error = None, None

    def load(self):
        """Import and return the kernel module (a plain import inside the subclass)."""
        raise NotImplementedError

    @property
    def module(self):
        if self._module is None and self._import_error is None:
            try:
                self._module = self.load()
            except ImportError as exc:  # a backend whose dependency is missing
                self._import_error = f"cannot import {type(self).__name__}'s kernels: {exc}"
        return self._module

    def unavailable_reason(self) -> Optional[str]:
        if self.module is None:
            return self._import_error
        return self.module.unavailable_reason()

    def forward(self, *args, num_batches_tracked=None, activation="relu", **kwargs):
        """The module's forward, as (out, saved, mask_bits, batch_mean, batch_var).

        A batch counter, when given, is incremented once: by the kernels where
        counts_batches, else here. mask_bits is empty unless saves_mask_bits. An
        activation other than ReLU reaches the module as the keyword `activation` (ReLU
        calls stay as they were: a module that runs ReLU only never sees the keyword)."""
        if activation != "relu":
            kwargs["activation"] = activation
        if self.counts_batches:
            result = self.module.forward(*args, num_batches_tracked=num_batches_tracked,
                                         **kwargs)
        else:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            result = self.module.forward(*args, **kwargs)
        if self.saves_mask_bits:
            return result
        out, saved, batch_mean, batch_var = result
        return out, saved, out.new_empty(0, dtype=torch.uint8), batch_mean, batch_var

    def backward(self, *args, grad_x_addend=None, grad_x_addend_bits=None,
                 defer_grad_residual=False, mask_bits=None, activation="relu", residual=None,
                 **kwargs):
        """The module's backward. grad_x_addend, when given, is added to grad_x, zeroed
        where grad_x_addend_bits (mask bits, when given) are clear: by the data-gradient
        kernel where adds_grad_x, else here. mask_bits (what forward saved) and
        defer_grad_residual go to backends that save mask bits: grad_residual is then not
        computed (None), its caller adding grad_out under those bits elsewhere
        (docs/spec.md, backend contract). An activation other than ReLU reaches the module
        as `activation`, with the forward's residual (None without one), from which and
        the saved tensor backward recomputes the activation's input."""
        if activation != "relu":
            kwargs["activation"], kwargs["residual"] = activation, residual
        if self.saves_mask_bits:
            kwargs["mask_bits"] = mask_bits
            kwargs["defer_grad_residual"] = defer_grad_residual
        elif defer_grad_residual:
            raise ValueError(f"backend {self.name!r} saves no mask bits, so it cannot defer "
                             "the residual gradient")
        if self.adds_grad_x:
            return self.module.backward(*args, grad_x_addend=grad_x_addend,
                                        grad_x_addend_bits=grad_x_addend_bits, **kwargs)
        grads = self.module.backward(*args, **kwargs)
        if grad_x_addend is not None and grads[0] is not None:
            if grad_x_addend_bits is not None:
                keep = conventions.unpack_mask_bits(grad_x_addend_bits, grad_x_addend.shape[-1])
                grad_x_addend = torch.where(keep, grad_x_addend, 0)
            grads[0].add_(grad_x_addend)  # grad_x is the backend's own, freshly allocated
        return grads

    def saved_dtype(self, dtype: torch.dtype, norm: str, relu_before_add: bool,
                    weights_per_channel: int, activation: str = "relu") -> torch.dtype:
        """dtype of the tensor forward saves for backward: the module's own where
        own_saved_dtype (Triton: a float16 x-hat in 16-bit training, which also depends
        on the weights per output channel, C_in * K), else the convention's."""
        if self.own_saved_dtype:
            if activation != "relu":
                return self.module.saved_dtype(dtype, norm, relu_before_add,
                                               weights_per_channel, activation)
            return self.module.saved_dtype(dtype, norm, relu_before_add, weights_per_channel)
        return conventions.saved_dtype(dtype, norm, relu_before_add, activation)

    def mask_bits_shape(self, shape, has_residual: bool, save_for_backward: bool,
                        norm: str, activation: str = "relu") -> tuple:
        """Shape of the mask bits forward returns for an output of `shape` ((0,): none)."""
        if self.saves_mask_bits and self.module.saves_mask_bits(
                has_residual, save_for_backward, norm,
                **({} if activation == "relu" else {"activation": activation})):
            return conventions.mask_bits_shape(*shape)
        return (0,)

    def stream_forward(self, *args, **kwargs) -> None:
        """The backend's streaming kernel (fastres.stream), where it streams."""
        if not self.streams:
            raise NotImplementedError(f"backend {self.name} has no streaming kernel")
        self.module.stream_forward(*args, **kwargs)
