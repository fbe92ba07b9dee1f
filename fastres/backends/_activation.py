"""The epilogue's activation (docs/spec.md, "Activation"), for the backends written in
PyTorch ops (eager, composite): its name parsed once, applied, and differentiated.

`activation` is a string: "relu" (the default), "gelu" (the exact, erf form), "gelu_tanh"
(its tanh approximation, F.gelu(approximate="tanh")), "silu", "tanh", "leaky_relu" with its
slope a >= 0 ("leaky_relu" is a = 0.01, "leaky_relu:0.2"), or "elu" with its alpha > 0
("elu" is alpha = 1, "elu:0.5"). Every ReLU of the stage (the final one, and the inner one
of relu_before_add) becomes this activation. Every kernel backend runs them too.

The derivative of relu, leaky_relu, elu and tanh is a function of the activation's output;
gelu's and silu's need its input, so their backward recomputes it (from x-hat and, after
a residual add, the residual).

The kernels receive an activation as (code, param): `Activation.code` is one of the ACT_*
constants below (csrc/conv_bn_relu.h's ActivationCode and the Triton kernels' constexpr
constants have the same values), param its slope or alpha (0 where it has none).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATION_NAMES", "Activation", "activation_function", "canonical_activation",
           "parse_activation"]

ACTIVATION_NAMES = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "leaky_relu", "elu")
_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0}

# The kernels' codes of the activations (csrc/conv_bn_relu.h: ActivationCode).
ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_TANH, ACT_LEAKY_RELU, ACT_ELU = range(7)
ACTIVATION_CODES = dict(zip(ACTIVATION_NAMES, range(7)))


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    param: Optional[float] = None   # leaky_relu's slope, elu's alpha

    @property
    def code(self) -> int:
        """The kernels' code of this activation (ACT_*)."""
        return ACTIVATION_CODES[self.name]

    @property
    def kernel_param(self) -> float:
        """The kernels' parameter: leaky_relu's slope, elu's alpha, else 0."""
        return 0.0 if self.param is None else float(self.param)

    @property
    def text(self) -> str:
        """The canonical spelling: the name, with ":param" only where it is not the default
        (so "leaky_relu" and "leaky_relu:0.01" are one dispatch signature)."""
        if self.param is None or self.param == _DEFAULT_PARAM[self.name]:
            return self.name
        return f"{self.name}:{self.param!r}"

    @property
    def is_relu(self) -> bool:
        return self.name == "relu"

    @property
    def needs_input(self) -> bool:
        """Whether the derivative needs the activation's input (not only its output)."""
        return self.name in ("gelu", "gelu_tanh", "silu")

    def __call__(self, t: Tensor) -> Tensor:
        if self.name == "relu":
            return torch.relu(t)   # keeps NaN, as the kernels must
        if self.name == "gelu":
            return F.gelu(t)
        if self.name == "gelu_tanh":
            return F.gelu(t, approximate="tanh")
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
        if self.name == "gelu_tanh":
            # d/dz of 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3)
            beta, kappa = math.sqrt(2 / math.pi), 0.044715
            t = torch.tanh(beta * (z + kappa * z * z * z))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * beta * (1 + 3 * kappa * z * z)
        if self.name == "silu":
            s = torch.sigmoid(z)
            return s * (1 + z * (1 - s))
        return self.grad_from_output(self(z))


# The op's public path (validation, the eager backend) runs under torch.compile, whose
# dynamo in torch 2.11 cannot trace the cached parser's frozen dataclass: these two are plain
# functions of the text.


def canonical_activation(text: str) -> str:
    """`text` validated and in its canonical spelling (Activation.text)."""
    if text == "relu":
        return text
    name, param = _split(text)
    if param is None or param == _DEFAULT_PARAM[name]:
        return name
    return f"{name}:{param!r}"


def activation_function(text: str):
    """The activation `text` names, as a function of a tensor (torch.relu, F.gelu, ...)."""
    name, param = _split(text)
    if name == "relu":
        return torch.relu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    if name == "silu":
        return F.silu
    if name == "tanh":
        return torch.tanh
    if name == "leaky_relu":
        return functools.partial(F.leaky_relu, negative_slope=param)
    return functools.partial(F.elu, alpha=param)


@functools.lru_cache(maxsize=None)
def parse_activation(text: str) -> Activation:
    """Activation of "name" or "name:param" (ValueError naming the argument otherwise)."""
    return Activation(*_split(text))


def _split(text: str):
    """(name, param) of "name" or "name:param", param None for activations without one
    (ValueError naming the argument for anything else)."""
    if not isinstance(text, str):
        raise ValueError(f"activation must be a string, got {text!r}")
    name, _, param_text = text.partition(":")
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES} (leaky_relu and elu "
                         f"optionally as 'name:param'), got {text!r}")
    if name not in _DEFAULT_PARAM:
        if param_text:
            raise ValueError(f"activation {name!r} takes no parameter, got {text!r}")
        return name, None
    try:
        param = float(param_text) if param_text else _DEFAULT_PARAM[name]
    except ValueError:
        raise ValueError(f"activation {text!r}: the parameter is not a number") from None
    if not math.isfinite(param) or (name == "leaky_relu" and param < 0) \
            or (name == "elu" and param <= 0):
        raise ValueError(f"activation {text!r}: leaky_relu's slope must be >= 0 and elu's "
                         "alpha > 0")
    return name, param
