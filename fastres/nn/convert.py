"""convert(model): swap the blocks of a live model for fused ones; unfuse(model): undo it.

Recognition is by structure (submodule names and types), never by class name alone:

- a BatchNorm two-stage block: conv1/bn1/conv2/bn2 (nn.Conv1d, nn.BatchNorm1d) with the
  residual branch in `downsample` (or `shortcut`): absent/None/empty nn.Sequential
  (identity), a 1x1 nn.Conv1d (the seed TemporalBlock), or any module (a projection,
  torchvision's BasicBlock). It becomes a causal TemporalBlock (carrying its single
  nn.Dropout, if any, between the stages) or a BasicBlock with "same" or causal padding,
  whichever reproduces it;
- locuslab/TCN's TemporalBlock: weight-normed conv1/conv2 (old weight_norm hooks or
  parametrizations), chomps, dropouts, `net`, optional 1x1 `downsample`, no BN. It becomes
  TemporalBlock(norm="weight") loaded from its state_dict;
- an nn.Sequential holding Conv1d -> BatchNorm1d -> ReLU runs ("same"-padded conv, or a
  causal zero pad before an unpadded conv) becomes a ConvBNReLUSequential with the same
  children;
- pytorch-tcn's TCN (read by structure: fastres/nn/pytorch_tcn.py) becomes a
  TemporalConvNet(block="pytorch-tcn") with its options, loaded from its state_dict less
  its streaming buffers, and probed with its input layout and its embeddings; one whose
  options fastres cannot rebuild is left untouched with the option named in the report;
- the plain twins that fastres.unfuse produces go back to their fused classes.

Every candidate swap is checked before it is made: the original and the fused module
run a probe input in eval mode (TF32 off), and the swap happens only if the outputs
agree to 1e-5 relative (1e-2 for half-precision models). A block whose train-mode
behaviour the probe cannot see (dropout placement) is only swapped for a fused block with
the same single dropout between its stages. Swapped modules carry the original
nn.Conv1d / nn.BatchNorm1d objects (the same parameters and buffers, so state_dict keys
do not change), except locuslab blocks, which are rebuilt and loaded from the original's
state_dict (same keys, values copied).

A block or run whose batch norms are nn.SyncBatchNorm is swapped like one with
nn.BatchNorm1d and keeps those modules: its fused stages then normalize with statistics
synchronized over the module's process group (fastres/nn/sync_batchnorm.py), never
per-process ones, and the report notes "synchronized batch norm".
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..conventions import conv_padding, cudnn_conv_tf32_set, rel_err
from ._stage import FusedModule, retyped
from .resnet import BasicBlock
from .sequential import ConvBNReLUSequential
from .sync_batchnorm import BATCH_NORMS
from . import pytorch_tcn
from .temporal import TemporalBlock, TemporalConvNet

__all__ = ["ConversionReport", "Swap", "convert", "unfuse"]

logger = logging.getLogger("fastres")

_RESIDUAL_NAMES = ("downsample", "shortcut")
_SYNC_NOTE = "synchronized batch norm"
_PYTORCH_TCN_NOTE = ("state_dict keys kept but its streaming buffers *.padder.buffer "
                     "(fastres.nn.pytorch_tcn maps both ways); its inference=True buffered "
                     "streaming is not carried over")


@dataclasses.dataclass
class Swap:
    """One module convert replaced: where, what it was, what it is now, and the probe error."""
    name: str
    original: str
    fused: str
    rel_err: float
    note: str = ""


@dataclasses.dataclass
class ConversionReport:
    """What convert swapped, and what it recognised but left untouched (with why)."""
    swapped: List[Swap] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        swapped = ", ".join(f"{s.name or '<root>'}: {s.original} -> {s.fused}"
                            + (f" [{s.note}]" if s.note else "") for s in self.swapped)
        line = f"fastres.convert: swapped {len(self.swapped)} module(s)"
        line += f" ({swapped})" if swapped else ""
        if self.skipped:
            left = "; ".join(f"{name or '<root>'}: {why}" for name, why in self.skipped)
            line += f"; left {len(self.skipped)} untouched ({left})"
        return line

    __str__ = summary


# --------------------------------------------------------------------------- verification


def _first_tensor(module: nn.Module) -> Optional[Tensor]:
    for t in module.parameters():
        return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


class _EvalNoTF32:
    """Eval mode for the given modules, grad and TF32 off; restores everything on exit."""

    def __init__(self, *modules: nn.Module):
        self.modules = {id(m): m for root in modules for m in root.modules()}

    def __enter__(self):
        self.training = {key: m.training for key, m in self.modules.items()}
        for m in self.modules.values():
            m.training = False
        self.strict = cudnn_conv_tf32_set(False)
        self.strict.__enter__()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.strict.__exit__(*exc)
        for key, m in self.modules.items():
            m.training = self.training[key]


def _verify(original: nn.Module, fused: nn.Module, in_channels: int,
            length: int, probe_inputs: Optional[Callable] = None
            ) -> Tuple[Optional[float], str]:
    """(relative error, "") if `fused` reproduces `original` on a probe, else (None, why).

    probe_inputs(batch, length, generator) -> the inputs to call both with, where the probe
    is not one (batch, in_channels, length) tensor."""
    ref = _first_tensor(original)
    if ref is None:
        return None, "no parameters to take a device and dtype from"
    g = torch.Generator().manual_seed(0)
    if probe_inputs is None:
        inputs = (torch.randn(2, in_channels, length, generator=g),)
    else:
        inputs = probe_inputs(2, length, g)
    inputs = tuple(t.to(ref.device, ref.dtype) if isinstance(t, Tensor)
                   else [e.to(ref.device, ref.dtype) for e in t] for t in inputs)
    probe = inputs[0]
    with _EvalNoTF32(original, fused):
        try:
            want = original(*inputs)
        except Exception as exc:  # noqa: BLE001 - a module we cannot run is not swapped
            return None, f"original fails on a probe {tuple(probe.shape)}: {exc}"
        try:
            got = fused(*inputs)
        except Exception as exc:  # noqa: BLE001
            return None, f"fused candidate fails on the probe: {exc}"
    if not isinstance(want, Tensor) or got.shape != want.shape:
        return None, "probe output shapes differ"
    err = rel_err(got, want)
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not err <= tol:
        return None, f"probe outputs differ by {err:.2e} relative (over {tol:g})"
    return err, ""


def _probe_shape(m: nn.Module) -> Tuple[int, int]:
    """(channels, length) of a probe input for `m`: the first conv's channels, and long
    enough for every conv's padding and stride to matter."""
    convs = [c for c in m.modules() if isinstance(c, nn.Conv1d)]
    length = 64 + 2 * sum((c.kernel_size[0] - 1) * c.dilation[0] * c.stride[0] for c in convs)
    return convs[0].in_channels, length


# --------------------------------------------------------------------------- recognition


def _is_weight_normed(conv: nn.Module) -> bool:
    return parametrize.is_parametrized(conv, "weight") or hasattr(conv, "weight_g")


def _plain_conv(conv) -> bool:
    return (isinstance(conv, nn.Conv1d) and not _is_weight_normed(conv) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _dropouts(module: nn.Module) -> List[nn.Dropout]:
    return [m for m in module.children() if isinstance(m, nn.Dropout)]


def _with_modes_of(new: nn.Module, original: nn.Module) -> nn.Module:
    """`new` with the train/eval mode of `original`, submodule by submodule.

    A submodule of `new` takes the mode of the module at the same path in `original` (the
    same object when it was taken over); one the original has no counterpart for takes the
    original block's own mode. Never module.train(), which would set every descendant: a BN
    the user froze with .eval() inside a model in training must stay frozen.
    """
    originals = dict(original.named_modules())
    for name, sub in new.named_modules():
        sub.training = originals[name].training if name in originals else original.training
    return new


def _fresh(build: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without moving the caller's random number generator."""
    with torch.random.fork_rng(devices=[]):
        return build()


def _residual_branch(module: nn.Module):
    """(attribute name, module or None for identity); name None when there is none."""
    for name in _RESIDUAL_NAMES:
        if name in module._modules or hasattr(module, name):
            branch = getattr(module, name)
            if isinstance(branch, nn.Sequential) and len(branch) == 0:
                branch = None  # nn.Sequential() is the common way to write an identity
            if branch is None or isinstance(branch, nn.Module):
                return name, branch
    return None, None


def _bn_block_candidates(m: nn.Module) -> Tuple[List[Tuple[str, Callable, str]], str]:
    """Fused candidates for a conv1/bn1/conv2/bn2 block, or ([], why not)."""
    conv1, conv2 = m.conv1, m.conv2
    if not (_plain_conv(conv1) and _plain_conv(conv2)):
        return [], "conv1/conv2 are not plain zero-padded, ungrouped nn.Conv1d"
    if not (isinstance(m.bn1, BATCH_NORMS) and isinstance(m.bn2, BATCH_NORMS)):
        return [], "bn1/bn2 are not nn.BatchNorm1d or nn.SyncBatchNorm"
    if conv2.stride[0] != 1:
        return [], "conv2 is strided"
    res_name, residual = _residual_branch(m)
    dropouts = [d for d in _dropouts(m) if d.p > 0]
    cin, cout = conv1.in_channels, conv1.out_channels
    k, d, s = conv1.kernel_size[0], conv1.dilation[0], conv1.stride[0]

    def take_over(block: nn.Module) -> nn.Module:
        block.conv1, block.bn1, block.conv2, block.bn2 = m.conv1, m.bn1, m.conv2, m.bn2
        block.downsample = residual
        if dropouts and isinstance(block, TemporalBlock):
            block.dropout = dropouts[0]  # the user's module, with its own mode
        return _with_modes_of(block, m)

    candidates = []
    temporal_residual = residual is None or (isinstance(residual, nn.Conv1d)
                                             and residual.kernel_size[0] == 1
                                             and residual.stride[0] == 1)
    if len(dropouts) > 1:
        return [], "more than one dropout: their placement cannot be verified"
    if s == 1 and temporal_residual:
        p = dropouts[0].p if dropouts else 0.0
        candidates.append(("TemporalBlock", lambda: take_over(
            _fresh(lambda: TemporalBlock(cin, cout, k, dilation=d, dropout=p)))))
    if not dropouts:  # a BasicBlock has no dropout to carry
        for causal in (False, True):
            candidates.append((f"BasicBlock(causal={causal})", lambda causal=causal: take_over(
                _fresh(lambda: BasicBlock(cin, cout, s, residual, kernel_size=k, dilation=d,
                                          causal=causal)))))
    if not candidates:
        return [], "a dropout in a block that is not a causal TemporalBlock layout"
    notes = [f"state_dict keys {res_name}.* -> downsample.*"] if res_name == "shortcut" \
        and residual is not None else []
    if any(isinstance(bn, nn.SyncBatchNorm) for bn in (m.bn1, m.bn2)):
        notes.append(_SYNC_NOTE)
    note = "; ".join(notes)
    return [(name, build, note) for name, build in candidates], ""


def _locuslab_candidate(m: nn.Module):
    """The TemporalBlock(norm="weight") for a locuslab/TCN block, or (None, why not)."""
    conv1, conv2 = m.conv1, m.conv2
    if not all(isinstance(c, nn.Conv1d) and c.groups == 1 for c in (conv1, conv2)):
        return None, "conv1/conv2 are not ungrouped nn.Conv1d"
    k, d = conv1.kernel_size[0], conv1.dilation[0]
    if conv1.padding[0] != (k - 1) * d or conv1.stride[0] != 1:
        return None, "conv1 is not locuslab's padded, unstrided conv"
    drops = [getattr(m, name, None) for name in ("dropout1", "dropout2")]
    if not all(isinstance(x, nn.Dropout) for x in drops) or drops[0].p != drops[1].p:
        return None, "dropout1/dropout2 missing or with different p"
    ref = _first_tensor(m)

    def build() -> nn.Module:
        block = _fresh(lambda: TemporalBlock(conv1.in_channels, conv1.out_channels, k,
                                             dilation=d, dropout=drops[0].p, norm="weight"))
        block.to(device=ref.device, dtype=ref.dtype)
        block.load_state_dict(m.state_dict(), strict=True)  # old weight_g/_v keys load too
        return _with_modes_of(block, m)

    return build, ""


def _pytorch_tcn_candidate(m: nn.Module):
    """The TemporalConvNet(block="pytorch-tcn") for a pytorch-tcn TCN, or (None, why not)."""
    try:
        options = pytorch_tcn.tcn_options(m)
    except ValueError as exc:
        return None, f"pytorch-tcn TCN with an option fastres does not run: {exc}"
    ref = _first_tensor(m)

    def build() -> nn.Module:
        net = _fresh(lambda: TemporalConvNet(**options))
        net.to(device=ref.device, dtype=ref.dtype)
        net.load_state_dict(pytorch_tcn.state_dict_from_pytorch_tcn(m.state_dict()),
                            strict=True)
        return _with_modes_of(net, m)

    return build, ""


def _pytorch_tcn_probe(m: nn.Module) -> Callable:
    """Probe inputs for a pytorch-tcn TCN: x in its input_shape, and its embeddings."""
    options = pytorch_tcn.tcn_options(m)

    def inputs(batch: int, length: int, g: torch.Generator):
        x = torch.randn(batch, options["num_inputs"], length, generator=g)
        if options["input_layout"] == "NLC":
            x = x.transpose(1, 2).contiguous()
        if options["embedding_shapes"] is None:
            return (x,)
        return (x, [torch.randn(batch, shape[0], *([length] if len(shape) == 2 else []),
                                generator=g) for shape in options["embedding_shapes"]])
    return inputs


def _candidates(m: nn.Module) -> Tuple[List[Tuple[str, Callable, str]], str]:
    """The fused modules that may replace `m`, most likely first; ([], "") if m is no block."""
    if pytorch_tcn.is_pytorch_tcn(m):
        build, why = _pytorch_tcn_candidate(m)
        return ([("TemporalConvNet(block='pytorch-tcn')", build, _PYTORCH_TCN_NOTE)]
                if build else []), why
    fused_cls = FusedModule.fused_class_of(m)
    if fused_cls is not None:  # a plain twin unfuse made: back to its fused class
        return [(fused_cls.__name__, lambda: retyped(m, fused_cls), "")], ""
    if isinstance(m, FusedModule):
        return [], ""
    if not (isinstance(getattr(m, "conv1", None), nn.Module)
            and isinstance(getattr(m, "conv2", None), nn.Module)):
        return [], ""
    if hasattr(m, "bn1") and hasattr(m, "bn2"):
        return _bn_block_candidates(m)
    if hasattr(m, "net") and _is_weight_normed(m.conv1) and _is_weight_normed(m.conv2):
        build, why = _locuslab_candidate(m)
        return ([("TemporalBlock(norm='weight')", build, "")] if build else []), why
    return [], ""


def _try_block(m: nn.Module, name: str, report: ConversionReport) -> Optional[nn.Module]:
    candidates, why = _candidates(m)
    reasons = [why] if why else []
    for label, build, note in candidates:
        try:
            fused = build()
        except Exception as exc:  # noqa: BLE001 - an unbuildable candidate is skipped
            reasons.append(f"{label}: {exc}")
            continue
        probe = _pytorch_tcn_probe(m) if pytorch_tcn.is_pytorch_tcn(m) else None
        err, why = _verify(m, fused, *_probe_shape(m), probe_inputs=probe)
        if err is not None:
            report.swapped.append(Swap(name, type(m).__name__, label, err, note))
            return fused
        reasons.append(f"{label}: {why}")
    if reasons:
        report.skipped.append((name, "; ".join(reasons)))
    return None


# --------------------------------------------------------------------------- Sequential runs


def _same_padded(conv: nn.Conv1d) -> bool:
    """Whether the conv's own padding is the "same" mode's (nn.Conv1d pads symmetrically)."""
    if conv.padding == "same":
        return True
    if isinstance(conv.padding, str):
        return False
    left, right = conv_padding(conv.kernel_size[0], conv.dilation[0], conv.stride[0], "same")
    return left == right == conv.padding[0]


def _causal_pad(pad: nn.Module, conv: nn.Conv1d) -> bool:
    if not isinstance(pad, (nn.ConstantPad1d, nn.ZeroPad1d)) or getattr(pad, "value", 0) != 0:
        return False
    causal = conv_padding(conv.kernel_size[0], conv.dilation[0], conv.stride[0], "causal")
    return tuple(pad.padding) == causal and conv.padding in ((0,), "valid")


def _runs(children: List[nn.Module]) -> List[Tuple[int, int, str]]:
    """(start, length, padding) of the Conv1d -> BatchNorm1d -> ReLU runs in `children`."""
    runs, i = [], 0
    while i < len(children):
        for length, padding in ((3, "same"), (4, "causal")):
            run = children[i:i + length]
            if len(run) < length:
                continue
            conv, bn, relu = run[-3:]
            if not (_plain_conv(conv) and isinstance(bn, BATCH_NORMS)
                    and isinstance(relu, nn.ReLU)):
                continue
            if (padding == "same" and _same_padded(conv)) or \
                    (padding == "causal" and _causal_pad(run[0], conv)):
                runs.append((i, length, padding))
                i += length
                break
        else:
            i += 1
    return runs


def _try_sequential(seq: nn.Sequential, name: str, report: ConversionReport):
    children = list(seq)
    verified = {}
    for start, length, padding in _runs(children):
        run = children[start:start + length]
        err, why = _verify(nn.Sequential(*run), ConvBNReLUSequential(*run, runs={0: (length,
                           padding)}), *_probe_shape(run[-3]))
        label = f"{name}[{start}:{start + length}]"
        if err is None:
            report.skipped.append((label, why))
            continue
        verified[start] = (length, padding)
        bn = run[-2]
        report.swapped.append(Swap(label, f"Conv1d->{type(bn).__name__}->ReLU",
                                   f"ConvBNReLUSequential({padding})", err,
                                   _SYNC_NOTE if isinstance(bn, nn.SyncBatchNorm) else ""))
    if not verified:
        return None
    # Same keys, same children (each keeping its own mode): only forward changes.
    fused = ConvBNReLUSequential(collections.OrderedDict(seq._modules), runs=verified)
    fused.training = seq.training
    return fused


# --------------------------------------------------------------------------- public API


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also for models with old torch.nn.utils.weight_norm convs.

    Old weight_norm keeps the computed weight as a plain non-leaf attribute, which
    deepcopy refuses; that attribute is recomputed before every forward, so a detached
    copy of it is as good.
    """
    memo = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)



def _convert(m: nn.Module, name: str, report: ConversionReport) -> nn.Module:
    if isinstance(m, FusedModule) and m.LEAF:
        return m  # already fused; its children are its own convs and norms
    fused = _try_block(m, name, report)
    if fused is not None:
        if getattr(fused, "LEAF", True):  # (a TemporalConvNet: its blocks are fused)
            return fused  # its children are the block's own convs and norms
        m = fused  # e.g. a ResNet1d: its blocks are converted below
    for child_name, child in list(m.named_children()):
        new = _convert(child, f"{name}.{child_name}" if name else child_name, report)
        if new is not child:
            m._modules[child_name] = new
    if type(m) is nn.Sequential:  # a subclass may have its own forward: leave it alone
        seq = _try_sequential(m, name, report)
        if seq is not None:
            return seq
    return m


def convert(model: nn.Module, inplace: bool = False, *, return_report: bool = False):
    """Swap every block of `model` that fastres recognises for its fused module.

    Args:
        model: any nn.Module (it may itself be a block).
        inplace: modify `model` itself; by default a deep copy is converted.
        return_report: also return the ConversionReport.

    Returns:
        The converted model, or (model, report) with return_report. The report (also
        logged at INFO on the "fastres" logger) lists each swap with its probe error and
        each recognised block left untouched with the reason.
    """
    if not inplace:
        model = _deepcopy(model)
    report = ConversionReport()
    model = _convert(model, "", report)
    logger.info(report.summary())
    return (model, report) if return_report else model


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn every fused fastres module of `model` back into plain PyTorch modules.

    The result computes the same numbers with nn.Conv1d / nn.BatchNorm1d / F.relu only
    (no fastres op), keeps the state_dict keys, and can be exported: torch.jit.script
    (weight-normed blocks: torch.jit.trace, as parametrizations do not script), ONNX.
    """
    if not inplace:
        model = _deepcopy(model)
    if isinstance(model, FusedModule):
        model = model.unfused()
    for child_name, child in list(model.named_children()):
        new = unfuse(child, inplace=True)
        if new is not child:
            model._modules[child_name] = new
    return model
