"""GradientMonitor: per-layer gradient norms over training, recorded through parameter hooks.

The monitor watches gradient flow, the way one checks whether a deep plain network's early
layers still learn: it groups a model's parameters by layer (or by block), and after every
backward pass records each group's gradient norm ||(grad of every parameter in the group)||_2.

    monitor = fastres.GradientMonitor(model)            # hooks attached
    for x, y in batches:
        loss_fn(model(x), y).backward()
        monitor.step()                                   # one row: each layer's norm now
        optimizer.step(); optimizer.zero_grad()
    monitor.detach()                                     # no hook left behind
    monitor.norms()                                      # {layer name: (steps,) array}
    monitor.plot("grad_flow.png")

It hooks parameters (`Tensor.register_post_accumulate_grad_hook`), never fastres internals,
so fused and plain models are watched alike, and what it records is the norm of `.grad`
itself (after accumulation), as `p.grad.norm()` would give. Detached, it leaves no hook: a
model it watched trains exactly as fast as one it never saw.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["GradientMonitor"]

LayerSpec = Union[None, Type[nn.Module], Tuple[Type[nn.Module], ...], Mapping[str, nn.Module]]


def _layer_groups(model: nn.Module, layers: LayerSpec) -> Dict[str, List[nn.Parameter]]:
    """{layer name: its trainable parameters}, in the model's module order.

    None: every module owning parameters itself (a conv, a BN, a linear layer).
    A module type (or tuple of types): the modules of that type, each with all of its
        parameters (pass fastres.BasicBlock to watch whole blocks).
    A mapping {name: module}: those modules, each with all of its parameters.
    """
    if layers is None:
        chosen = [(name, list(m.parameters(recurse=False))) for name, m in model.named_modules()]
    elif isinstance(layers, Mapping):
        chosen = [(name, list(m.parameters())) for name, m in layers.items()]
    elif isinstance(layers, type) or (isinstance(layers, tuple)
                                      and all(isinstance(t, type) for t in layers)):
        chosen = [(name, list(m.parameters())) for name, m in model.named_modules()
                  if isinstance(m, layers)]
    else:
        raise TypeError("layers must be None, a module type, a tuple of module types or a "
                        f"mapping of names to modules, got {type(layers).__name__}")
    groups = {name or "<root>": [p for p in params if p.requires_grad]
              for name, params in chosen}
    groups = {name: params for name, params in groups.items() if params}
    if not groups:
        raise ValueError("GradientMonitor found no trainable parameters to watch")
    return groups


class GradientMonitor:
    """Records per-layer gradient norms during training.

    Args:
        model: the model to watch (fused or plain; any nn.Module).
        layers: how parameters are grouped into layers, see `_layer_groups` (default: each
            module that owns parameters).
        attach: attach the hooks now (default); otherwise call `attach()` later.

    After each backward pass call `step()`: it appends one row holding, per layer, the
    L2 norm over all its parameters' `.grad` as accumulated by then (NaN for a layer
    whose parameters received no gradient since the previous `step()`).
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = None, *, attach: bool = True):
        self._groups = _layer_groups(model, layers)
        self.names: List[str] = list(self._groups)
        # A parameter may sit in several groups (overlapping modules in a mapping).
        self._groups_of: Dict[int, List[int]] = {}
        for index, params in enumerate(self._groups.values()):
            for p in params:
                self._groups_of.setdefault(id(p), []).append(index)
        self._handles: list = []
        # Norm of each parameter's .grad at its latest accumulation this step, kept on the
        # parameter's device until step() so that the hooks never wait for a GPU.
        self._pending: Dict[int, Tensor] = {}
        self._rows: List[np.ndarray] = []
        if attach:
            self.attach()

    # ------------------------------------------------------------------ hooks

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "GradientMonitor":
        """Register one post-accumulate-grad hook per watched parameter (idempotent)."""
        if not self._handles:
            seen = set()
            for params in self._groups.values():
                for p in params:
                    if id(p) not in seen:
                        seen.add(id(p))
                        self._handles.append(
                            p.register_post_accumulate_grad_hook(self._record))
        return self

    def detach(self) -> "GradientMonitor":
        """Remove every hook; what was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        return self

    def __enter__(self) -> "GradientMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _record(self, param: Tensor) -> None:
        # Runs after param.grad was accumulated: later accumulations in the same step (a
        # parameter used twice, gradient accumulation) overwrite, so the last one is .grad.
        if param.grad is not None:
            self._pending[id(param)] = torch.linalg.vector_norm(param.grad.detach(),
                                                                dtype=torch.float64)

    # ------------------------------------------------------------------ recording

    def step(self) -> np.ndarray:
        """Close the current step: append and return its (layers,) row of gradient norms."""
        sums = np.full(len(self.names), np.nan)
        for key, norm in self._pending.items():
            squared = float(norm) ** 2
            for index in self._groups_of[key]:
                sums[index] = squared if np.isnan(sums[index]) else sums[index] + squared
        self._pending.clear()
        row = np.sqrt(sums)
        self._rows.append(row)
        return row

    @property
    def steps(self) -> int:
        return len(self._rows)

    def as_array(self) -> np.ndarray:
        """(steps, layers) float64 array of the recorded norms; columns in `names` order."""
        if not self._rows:
            return np.empty((0, len(self.names)))
        return np.stack(self._rows)

    def norms(self) -> Dict[str, np.ndarray]:
        """{layer name: (steps,) array of its gradient norm per step}."""
        table = self.as_array()
        return {name: table[:, i] for i, name in enumerate(self.names)}

    def reset(self) -> None:
        """Forget what was recorded (the hooks stay as they are)."""
        self._rows.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ plotting

    def plot(self, path: Optional[str] = None, *, kind: str = "heatmap", ax=None,
             title: Optional[str] = None, layers: Optional[Sequence[str]] = None,
             log_range: Optional[Tuple[float, float]] = None):
        """Plot the recorded norms; save to `path` if given. Returns the matplotlib Figure.

        kind="heatmap": layers (rows, input side on top) against steps, colour = log10 norm
            (`log_range` = (low, high) fixes the colour scale, to compare two heatmaps).
        kind="lines": one line per layer over steps (log scale), coloured by depth.
        `layers` picks a subset of `names` (all by default); `ax` draws into an existing axes.
        """
        if kind not in ("heatmap", "lines"):
            raise ValueError(f"kind must be 'heatmap' or 'lines', got {kind!r}")
        if not self._rows:
            raise ValueError("nothing recorded yet: call step() after backward passes")
        # A bare Figure (no pyplot) renders with Agg and leaves the user's backend alone.
        try:
            import matplotlib
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("GradientMonitor.plot needs matplotlib: "
                              "pip install 'fastres[bench]'") from exc

        names = list(layers) if layers is not None else self.names
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; recorded: {self.names}")
        table = self.as_array()[:, [self.names.index(n) for n in names]]
        if ax is None:
            fig = Figure(figsize=(8, max(3.0, 0.18 * len(names) + 1.5)))
            ax = fig.subplots()
        else:
            fig = ax.figure
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(table)
        if kind == "heatmap":
            low, high = log_range if log_range is not None else (None, None)
            image = ax.imshow(logs.T, aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=low, vmax=high)
            fig.colorbar(image, ax=ax, label="log10 gradient norm")
            ax.set_ylabel("layer (input side on top)")
            if len(names) <= 24:
                ax.set_yticks(range(len(names)), names, fontsize=7)
        else:
            colors = matplotlib.colormaps["viridis"](np.linspace(0, 1, max(len(names), 2)))
            for i, name in enumerate(names):
                ax.plot(table[:, i], color=colors[i], lw=1,
                        label=name if len(names) <= 12 else None)
            ax.set_yscale("log")
            ax.set_ylabel("gradient norm")
            if len(names) <= 12:
                ax.legend(fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(title or "gradient norm per layer")
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig
