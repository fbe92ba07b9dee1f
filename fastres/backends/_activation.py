"""The epilogue's activation (docs/spec.md, "Activation"), for the backends written in
PyTorch ops (eager, composite): its name parsed once, applied, and differentiated.

`activation` is a string: "relu" (the default), "gelu" (the exact, erf form), "silu",
"tanh", "leaky_relu" with its slope a >= 0 ("leaky_relu" is a = 0.01, "leaky_relu:0.2"),
or "elu" with its alpha > 0 ("elu" is alpha = 1, "elu:0.5"). Every ReLU of the stage (the
final one, and the inner one of relu_before_add) becomes this activation.

The derivative of relu, leaky_relu, elu and tanh is a function of the activation's output;
gelu's and silu's need its input, so their backward recomputes it (from x-hat and, after
a residual add, the residual).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATION_NAMES", "Activation", "parse_activation"]

ACTIVATION_NAMES = ("relu", "gelu", "silu", "tanh", "leaky_relu", "elu")
_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0}


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    param: Optional[float] = None   # leaky_relu's slope, elu's alpha

    @property
    def is_relu(self) -> bool:
        return self.name == "relu"

    @property
    def needs_input(self) -> bool:
        """Whether the derivative needs the activation's input (not only its output)."""
        return self.name in ("gelu", "silu")

    def __call__(self, t: Tensor) -> Tensor:
        if self.name == "relu":
            return torch.relu(t)   # keeps NaN, as the kernels must
        if self.name == "gelu":
            return F.gelu(t)
        if self.name == "silu":
            return F.silu(t)
        if self.name == "tanh":
            return torch.tanh(t)
        if self.name == "leaky_relu":
            return F.leaky_relu(t, self.param)
        return F.elu(t, self.param)

    def grad_from_output(self, out: Tensor) -> Tensor:
        """d act / d input, from the output (relu, leaky_relu, elu, tanh)."""
        if self.name == "relu":
            return torch.where(out <= 0, 0.0, 1.0).to(out.dtype)
        if self.name == "tanh":
            return 1 - out * out
        if self.name == "leaky_relu":
            return torch.where(out > 0, 1.0, self.param).to(out.dtype)
        if self.name == "elu":
            return torch.where(out > 0, 1.0, out + self.param)
        raise ValueError(f"the derivative of {self.name} needs its input")

    def grad_from_input(self, z: Tensor) -> Tensor:
        """d act / d input at z."""
        if self.name == "gelu":
            cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
            pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
            return cdf + z * pdf
        if self.name == "silu":
            s = torch.sigmoid(z)
            return s * (1 + z * (1 - s))
        return self.grad_from_output(self(z))


@functools.lru_cache(maxsize=None)
def parse_activation(text: str) -> Activation:
    """Activation of "name" or "name:param" (ValueError naming the argument otherwise)."""
    if not isinstance(text, str):
        raise ValueError(f"activation must be a string, got {text!r}")
    name, _, param_text = text.partition(":")
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES} (leaky_relu and elu "
                         f"optionally as 'name:param'), got {text!r}")
    if name not in _DEFAULT_PARAM:
        if param_text:
            raise ValueError(f"activation {name!r} takes no parameter, got {text!r}")
        return Activation(name)
    try:
        param = float(param_text) if param_text else _DEFAULT_PARAM[name]
    except ValueError:
        raise ValueError(f"activation {text!r}: the parameter is not a number") from None
    if not math.isfinite(param) or (name == "leaky_relu" and param < 0) \
            or (name == "elu" and param <= 0):
        raise ValueError(f"activation {text!r}: leaky_relu's slope must be >= 0 and elu's "
                         "alpha > 0")
    return Activation(name, param)
