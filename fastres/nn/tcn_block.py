"""pytorch-tcn's block layout, fused where the op computes it: TCNBlock and its plain twin.

pytorch-tcn (the `TCN` of the pytorch-tcn package, 1.2.x) builds each level as

    x -> conv1 -> norm1 -> [+ conditioning] -> activation1 -> dropout1
      -> conv2 -> norm2 -> activation2 -> dropout2 = out
    output = activation_final(out + res),  res = x or downsample(x) (a 1x1 conv)

with the activation before the residual add (fastres's TemporalBlock(norm="batch") adds
before its only ReLU), optional gating (conv1 gives 2n channels, activation1 is
nn.GLU(dim=1)), conditioning embeddings projected by 1x1 convs and added or concatenated
after norm1, norm1/norm2 batch norm, layer norm over channels, or none (weight norm lives
on the convs), and "same" padding when not causal. `out` is what its skip connections sum.

TCNBlock keeps pytorch-tcn's submodule names (conv1, conv2, norm1, norm2, activation1,
activation2, activation_final, dropout1, dropout2, downsample, embedding_projection_1/2),
so a pytorch-tcn block's state_dict loads into it once its streaming buffers
(`conv*.padder.buffer`, which fastres keeps in fastres.stream instead) are dropped: see
fastres/nn/pytorch_tcn.py. Its modules are created in pytorch-tcn's order and initialised
as pytorch-tcn does, so one seed gives one model in both.

What runs fused: a stage whose activation the op's epilogue computes (op_activation: ReLU,
GELU in both forms, SiLU, Tanh, LeakyReLU, ELU) and whose norm is batch norm, weight norm,
layer norm over channels or none runs through conv_bn_relu_stage; the second stage also
takes the residual add and the final activation when dropout2 is inactive and the skip
output is not needed. Everything else (another activation, gating, conditioning) runs as
plain PyTorch inside the block, each such stage recorded with its reason for
fastres.explain.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .. import dispatch
from ..backends._activation import canonical_activation
from ._stage import FusedModule, check_block_args, conv_bn_relu_stage, padded_conv1d

__all__ = ["TCNBlock", "PlainTCNBlock", "ACTIVATIONS", "KERNEL_INITIALIZERS", "TCN_NORMS",
           "activation_module", "check_activation"]

# pytorch-tcn's activation names (and silu), each an nn.Module class built without arguments.
ACTIVATIONS = dict(relu=nn.ReLU, tanh=nn.Tanh, leaky_relu=nn.LeakyReLU, sigmoid=nn.Sigmoid,
                   elu=nn.ELU, gelu=nn.GELU, selu=nn.SELU, silu=nn.SiLU, softmax=nn.Softmax,
                   log_softmax=nn.LogSoftmax)
KERNEL_INITIALIZERS = dict(xavier_uniform=nn.init.xavier_uniform_,
                           xavier_normal=nn.init.xavier_normal_,
                           kaiming_uniform=nn.init.kaiming_uniform_,
                           kaiming_normal=nn.init.kaiming_normal_,
                           normal=nn.init.normal_, uniform=nn.init.uniform_)
TCN_NORMS = ("batch", "weight", "layer", None)
EMBEDDING_MODES = ("add", "concat")
# Activations without a gain of their own in nn.init.calculate_gain: pytorch-tcn uses ReLU's.
_NO_GAIN = ("gelu", "elu", "silu", "softmax", "log_softmax")

ActivationArg = Union[str, type]


def check_activation(activation: ActivationArg, option: str) -> None:
    """ValueError naming `option` unless `activation` is a known name or an nn.Module class."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{option} must be one of {sorted(ACTIVATIONS)} or an nn.Module "
                             f"class, got {activation!r}")
    elif not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ValueError(f"{option} must be one of {sorted(ACTIVATIONS)} or an nn.Module "
                         f"class, got {activation!r}")


def activation_module(activation: ActivationArg) -> nn.Module:
    return ACTIVATIONS[activation]() if isinstance(activation, str) else activation()


def kernel_initializer_call(name: str, activation: ActivationArg):
    """(init function, keyword arguments) as pytorch-tcn's get_kernel_init_fn picks them:
    the gain (xavier) or nonlinearity (kaiming) of the block's activation."""
    if name not in KERNEL_INITIALIZERS:
        raise ValueError(f"kernel_initializer must be None or one of "
                         f"{sorted(KERNEL_INITIALIZERS)}, got {name!r}")
    if not isinstance(activation, str):  # a module class: no gain, as pytorch-tcn
        return KERNEL_INITIALIZERS[name], {}
    if name.startswith("xavier"):
        if activation in _NO_GAIN:
            warnings.warn(f"kernel_initializer={name!r} has no gain for activation "
                          f"{activation!r}; ReLU's gain sqrt(2) is used")
            return KERNEL_INITIALIZERS[name], dict(gain=math.sqrt(2))
        return KERNEL_INITIALIZERS[name], dict(gain=nn.init.calculate_gain(activation))
    if name.startswith("kaiming"):
        if activation in _NO_GAIN:
            raise ValueError(f"kernel_initializer={name!r} does not support activation="
                             f"{activation!r} (no nonlinearity gain); use 'relu' or "
                             f"'leaky_relu', or another initializer")
        return KERNEL_INITIALIZERS[name], dict(nonlinearity=activation)
    return KERNEL_INITIALIZERS[name], {}


def op_activation(module: nn.Module) -> Optional[str]:
    """The fused op's `activation` that computes `module` exactly, or None: nn.ReLU, nn.GELU
    (either form), nn.SiLU, nn.Tanh, nn.LeakyReLU with its slope (>= 0), nn.ELU with its
    alpha (> 0), by exact type (a subclass may compute something else)."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.Tanh:
        return "tanh"
    if kind is nn.LeakyReLU and module.negative_slope >= 0:
        return canonical_activation(f"leaky_relu:{float(module.negative_slope)!r}")
    if kind is nn.ELU and module.alpha > 0:
        return canonical_activation(f"elu:{float(module.alpha)!r}")
    return None


def _activation_kw(name: str) -> dict:
    """conv_bn_relu_stage's keyword for activation `name` (none for ReLU, its default)."""
    return {} if name == "relu" else {"activation": name}


class _TCNBlockLayout(nn.Module):
    """Constructor and submodules shared by TCNBlock and PlainTCNBlock (pytorch-tcn's order)."""

    def __init__(self, n_inputs: int, n_outputs: int, kernel_size: int, dilation: int = 1, *,
                 dropout: float = 0.0, causal: bool = True, norm: Optional[str] = "batch",
                 activation: ActivationArg = "relu", kernel_initializer: Optional[str] = None,
                 embedding_shapes: Optional[Sequence[Sequence[int]]] = None,
                 embedding_mode: str = "add", gate: bool = False):
        super().__init__()
        check_block_args(kernel_size, dilation, dropout)
        if norm not in TCN_NORMS:
            raise ValueError(f"norm must be one of {TCN_NORMS}, got {norm!r}")
        check_activation(activation, "activation")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        if embedding_mode not in EMBEDDING_MODES:
            raise ValueError(f"embedding_mode must be one of {EMBEDDING_MODES}, got "
                             f"{embedding_mode!r}")
        if not isinstance(gate, bool):
            raise ValueError(f"gate must be True or False, got {gate!r}")
        self.norm = norm
        self.causal = bool(causal)
        self.gate = bool(gate)
        self.embedding_mode = embedding_mode
        self.embedding_shapes = None if embedding_shapes is None else \
            [tuple(int(v) for v in shape) for shape in embedding_shapes]
        self.activation_name = activation if isinstance(activation, str) else \
            activation.__name__
        width1 = 2 * n_outputs if gate else n_outputs
        # pytorch-tcn's convs pad themselves; these pad in forward, so their own is 0.
        self.conv1 = nn.Conv1d(n_inputs, width1, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(n_outputs, n_outputs, kernel_size, dilation=dilation)
        if norm == "batch":
            self.norm1, self.norm2 = nn.BatchNorm1d(width1), nn.BatchNorm1d(n_outputs)
        elif norm == "layer":
            self.norm1, self.norm2 = nn.LayerNorm(width1), nn.LayerNorm(n_outputs)
        else:
            self.norm1 = self.norm2 = None
            if norm == "weight":
                self.conv1 = weight_norm(self.conv1)
                self.conv2 = weight_norm(self.conv2)
        self.activation1 = nn.GLU(dim=1) if gate else activation_module(activation)
        if gate:  # pytorch-tcn builds the activation first, then replaces it
            activation_module(activation)
        self.activation2 = activation_module(activation)
        self.activation_final = activation_module(activation)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(n_inputs, n_outputs, 1) if n_inputs != n_outputs else None
        if self.embedding_shapes is not None:
            for shape in self.embedding_shapes:
                if len(shape) not in (1, 2):
                    raise ValueError("embedding_shapes: each shape is (channels,) or "
                                     f"(channels, steps), got {shape}")
            self.embedding_projection_1 = nn.Conv1d(
                sum(shape[0] for shape in self.embedding_shapes), width1, 1)
            self.embedding_projection_2 = nn.Conv1d(2 * width1, width1, 1)
        if kernel_initializer is not None:
            init, kwargs = kernel_initializer_call(kernel_initializer, activation)
            # On weight-normed convs `weight` is recomputed from g and v at every use, so
            # this writes a temporary, exactly as in pytorch-tcn (only downsample changes).
            for conv in (self.conv1, self.conv2, self.downsample):
                if conv is not None:
                    init(conv.weight, **kwargs)

    @property
    def padding_mode(self) -> str:
        return "causal" if self.causal else "same"

    def extra_repr(self) -> str:
        conv = self.conv2
        return (f"{self.conv1.in_channels}, {conv.out_channels}, kernel_size="
                f"{conv.kernel_size[0]}, dilation={conv.dilation[0]}, norm={self.norm!r}, "
                f"causal={self.causal}, gate={self.gate}")

    # ------------------------------------------------------------------ the computation

    def _conv(self, x: Tensor, conv: nn.Conv1d) -> Tensor:
        return padded_conv1d(x, conv.weight, conv.bias, conv.kernel_size[0], 1,
                             conv.dilation[0], self.causal)

    def _norm(self, norm: Optional[nn.Module], z: Tensor) -> Tensor:
        if norm is None:
            return z
        if self.norm == "layer":  # over channels at each step, as pytorch-tcn applies it
            return norm(z.transpose(1, 2)).transpose(1, 2)
        return norm(z)

    def _embed(self, z: Tensor, embeddings) -> Tensor:
        """pytorch-tcn's apply_embeddings: project the side inputs, then add or concat."""
        if self.embedding_shapes is None:
            raise ValueError("embeddings were passed to a TemporalConvNet built without "
                             "embedding_shapes")
        if isinstance(embeddings, Tensor):
            embeddings = [embeddings]
        if len(embeddings) != len(self.embedding_shapes):
            raise ValueError(f"embeddings: expected {len(self.embedding_shapes)} tensors "
                             f"(embedding_shapes), got {len(embeddings)}")
        parts = []
        for e, shape in zip(embeddings, self.embedding_shapes):
            if e.dim() not in (2, 3) or e.shape[1] != shape[0]:
                raise ValueError(f"embeddings: a tensor of shape {tuple(e.shape)} does not "
                                 f"match embedding_shapes entry {shape} (B, {shape[0]}[, L])")
            if e.dim() == 2:
                parts.append(e.unsqueeze(2).expand(-1, -1, z.shape[2]))
            else:
                if e.shape[2] != z.shape[2]:
                    raise ValueError(f"embeddings: {e.shape[2]} steps, the input has "
                                     f"{z.shape[2]}")
                parts.append(e)
        e = self.embedding_projection_1(torch.cat(parts, dim=1))
        if self.embedding_mode == "concat":
            return self.embedding_projection_2(torch.cat([z, e], dim=1))
        return z + e

    def _plain_reason(self, stage: int, embeddings) -> Optional[str]:
        """Why stage 1 or 2 runs as plain PyTorch, or None where it runs fused."""
        reasons = []
        if stage == 1 and self.gate:
            reasons.append("gating (GLU over conv1's 2n channels) is not in the fused op")
        if stage == 1 and embeddings is not None:
            reasons.append("conditioning embeddings join between the norm and the "
                           "activation, inside the fused op's epilogue")
        activation = self.activation1 if stage == 1 else self.activation2
        name = op_activation(activation)
        if stage == 1 and self.gate:
            pass
        elif name is None:
            reasons.append(f"activation {type(activation).__name__}: not one the fused op's "
                           "epilogue computes (relu, gelu, silu, tanh, leaky_relu, elu)")
        return "; ".join(reasons) or None

    def _stage1(self, x: Tensor, embeddings, fused: bool) -> Tensor:
        """conv1 -> norm1 -> [conditioning] -> activation1 -> dropout1."""
        why = self._plain_reason(1, embeddings) if fused else "plain"
        if why is None:
            h = conv_bn_relu_stage(x, self.conv1, self.norm1, self.padding_mode,
                                   **_activation_kw(op_activation(self.activation1)))
        else:
            if fused and dispatch.choice.recording_active():
                dispatch.choice.record(self.conv1, None, dispatch.Choice("op", "plain", why))
            z = self._norm(self.norm1, self._conv(x, self.conv1))
            if embeddings is not None:
                z = self._embed(z, embeddings)
            h = self.activation1(z)
        return self.dropout1(h)

    def _stage2(self, h: Tensor, fused: bool) -> Tensor:
        """conv2 -> norm2 -> activation2 -> dropout2: `out`, what skip connections sum."""
        why = self._plain_reason(2, None) if fused else "plain"
        if why is None:
            out = conv_bn_relu_stage(h, self.conv2, self.norm2, self.padding_mode,
                                     **_activation_kw(op_activation(self.activation2)))
        else:
            if fused and dispatch.choice.recording_active():
                dispatch.choice.record(self.conv2, None, dispatch.Choice("op", "plain", why))
            out = self.activation2(self._norm(self.norm2, self._conv(h, self.conv2)))
        return self.dropout2(out)

    def compute(self, x: Tensor, embeddings=None, fused: bool = True) -> Tensor:
        """The block's output; fused False runs all of it as plain PyTorch (the twin)."""
        h = self._stage1(x, embeddings, fused)
        res = x if self.downsample is None else self.downsample(x)
        name = op_activation(self.activation2)
        if fused and self._plain_reason(2, None) is None \
                and op_activation(self.activation_final) == name \
                and not (self.training and self.dropout2.p > 0):
            # act(act(norm2(conv2(h))) + res) in one stage: dropout2 is the identity.
            return conv_bn_relu_stage(h, self.conv2, self.norm2, self.padding_mode,
                                      residual=res, relu_before_add=True,
                                      **_activation_kw(name))
        return self.activation_final(self._stage2(h, fused) + res)

    def compute_with_skip(self, x: Tensor, embeddings=None, fused: bool = True
                          ) -> Tuple[Tensor, Tensor]:
        """(output, out before the residual add): the add cannot fold into stage 2 here."""
        out = self._stage2(self._stage1(x, embeddings, fused), fused)
        res = x if self.downsample is None else self.downsample(x)
        return self.activation_final(out + res), out


class PlainTCNBlock(_TCNBlockLayout):
    """TCNBlock in plain PyTorch: pytorch-tcn's block forward (what fastres.unfuse returns)."""

    def forward(self, x: Tensor, embeddings=None) -> Tensor:
        return self.compute(x, embeddings, fused=False)

    def forward_with_skip(self, x: Tensor, embeddings=None) -> Tuple[Tensor, Tensor]:
        return self.compute_with_skip(x, embeddings, fused=False)


class TCNBlock(FusedModule, _TCNBlockLayout):
    """pytorch-tcn's residual block (see the module docstring), fused where the op runs it.

    Args:
        n_inputs, n_outputs: channels in and out.
        kernel_size, dilation: of both convs.
        dropout: after each stage's activation.
        causal: True pads (kernel_size - 1) * dilation on the left; False pads "same".
        norm: "batch", "weight" (weight-normed convs), "layer" (LayerNorm over channels at
            each step) or None.
        activation: a name in ACTIVATIONS or an nn.Module class (built without arguments).
        kernel_initializer: None (PyTorch's init) or a name in KERNEL_INITIALIZERS, with
            pytorch-tcn's gain for the activation.
        embedding_shapes, embedding_mode: conditioning inputs, (channels,) or
            (channels, steps) each, projected by a 1x1 conv and added to ("add") or
            concatenated with and projected back into ("concat") the first stage's
            normalized output.
        gate: conv1 gives 2 * n_outputs channels and activation1 is nn.GLU(dim=1).

    forward(x, embeddings=None): (B, n_inputs, L) -> (B, n_outputs, L).
    """

    PLAIN_TWINS = (PlainTCNBlock,)

    def forward(self, x: Tensor, embeddings=None) -> Tensor:
        if embeddings is None:
            return FusedModule.forward(self, x)  # the module level's choice, as every fused block
        return self.compute(x, embeddings)

    def forward_with_skip(self, x: Tensor, embeddings=None) -> Tuple[Tensor, Tensor]:
        return self.compute_with_skip(x, embeddings)

    def fused_forward(self, x: Tensor) -> Tensor:
        return self.compute(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        return self.compute(x, fused=False)
