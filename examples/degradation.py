"""Degradation and gradient flow in 1D: plain deep CNNs against residual ones.

He et al. (2016) found that a deeper plain network (no skip connections) trains *worse*
than a shallower one, on the training set itself, and that identity skips fix it. This
reproduces that in 1D, in about a minute on 2 CPU cores:

- task: classify 64-step noisy sequences by which of 4 motifs they hide, at a random place;
- plain:    stem + 2*n Conv1d -> BatchNorm1d -> ReLU layers, no skips (nn.Sequential,
            fused by fastres.convert into ConvBNReLUSequential runs);
- residual: stem + n fastres.BasicBlock (the same convs and BNs, plus identity skips);
  at each depth both hold the same initial weights (built from one seed, in the same
  order) and see the same batches: the skips are the only difference;
- fastres.GradientMonitor records every conv layer's gradient norm at every step.

Prints a table (training loss and accuracy, test accuracy, gradient norm of the first
conv relative to the last) and writes degradation.png: loss and accuracy curves,
gradient norm against depth, and per-layer gradient-norm heatmaps of the deepest pair.

    python examples/degradation.py                          # ~1 min, depths 2/8/16 blocks
    python examples/degradation.py --depths 4 16 32 --steps 600 --threads 2   # larger
    python examples/degradation.py --smoke                  # a few seconds
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import fastres
from _common import now, parser, report, save_figure, start

CLASSES, MOTIF = 4, 16


@dataclasses.dataclass
class Size:
    depths: List[int]      # blocks (2 conv layers each) per model
    channels: int
    length: int
    steps: int
    batch: int
    train: int             # training sequences
    test: int
    eval_every: int


SIZES = {"default": Size([2, 8, 16], 16, 64, 200, 64, 2048, 512, 10),
         "smoke": Size([1, 3], 8, 32, 12, 16, 128, 64, 4)}


def motif_data(n: int, length: int, motifs: torch.Tensor, g: torch.Generator):
    """n sequences (n, 1, length) of unit noise, each hiding one motif at a random place;
    labels (n,) say which motif."""
    x = torch.randn(n, 1, length, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    start = torch.randint(0, length - MOTIF + 1, (n, 1), generator=g)
    x[:, 0].scatter_add_(1, start + torch.arange(MOTIF), motifs[y])
    return x, y


def stage(c_in: int, c_out: int) -> List[nn.Module]:
    return [nn.Conv1d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]


def plain_net(blocks: int, channels: int) -> nn.Module:
    """Stem and 2*blocks conv layers without skips; fastres.convert fuses every stage."""
    layers = stage(1, channels)
    for _ in range(2 * blocks):
        layers += stage(channels, channels)
    return nn.Sequential(fastres.convert(nn.Sequential(*layers)), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(channels, CLASSES))


def residual_net(blocks: int, channels: int) -> nn.Module:
    """The same stem and convs, in fastres.BasicBlocks with identity skips."""
    return nn.Sequential(fastres.convert(nn.Sequential(*stage(1, channels))),
                         *[fastres.BasicBlock(channels, channels) for _ in range(blocks)],
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, CLASSES))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(name, model, data, size: Size, device, seed: int) -> Dict[str, object]:
    """SGD with momentum; the same batch order for every model. Returns curves and norms."""
    (x_train, y_train), (x_test, y_test) = data
    model.to(device).train()
    monitor = fastres.GradientMonitor(model, nn.Conv1d)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed + 1)
    losses, hits, test_acc = [], [], []
    started = now(device)
    for step in tqdm(range(size.steps), desc=name, leave=False, disable=None):
        idx = torch.randint(0, size.train, (size.batch,), generator=order).to(device)
        logits = model(x_train[idx])
        loss = F.cross_entropy(logits, y_train[idx])
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
        losses.append(loss.item())
        hits.append((logits.argmax(1) == y_train[idx]).float().mean().item())
        if (step + 1) % size.eval_every == 0 or step + 1 == size.steps:
            test_acc.append((step + 1, accuracy(model, x_test, y_test)))
    seconds = now(device) - started
    monitor.detach()
    return dict(losses=np.array(losses), hits=np.array(hits), test_acc=test_acc,
                monitor=monitor, seconds=seconds,
                params=sum(p.numel() for p in model.parameters()))


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(runs: Dict[str, Dict], size: Size, args) -> None:
    fig = Figure(figsize=(15, 8.5))
    grid = fig.add_gridspec(2, 6, hspace=0.35, wspace=0.9)
    ax_loss, ax_acc, ax_flow = (fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3))
    colors = dict(zip(size.depths, ("tab:blue", "tab:orange", "tab:red", "tab:purple",
                                    "tab:green")))
    window = max(1, size.steps // 20)
    for (kind, depth), run in runs.items():
        style = dict(color=colors[depth], ls="-" if kind == "residual" else "--",
                     label=f"{kind}, {2 * depth + 1} convs")
        curve = smooth(run["losses"], window)
        ax_loss.plot(np.arange(len(curve)) + window, curve, **style)
        steps, acc = zip(*run["test_acc"])
        ax_acc.plot(steps, acc, **style)
        mean_norm = np.nanmean(run["monitor"].as_array(), axis=0)
        ax_flow.plot(np.arange(1, len(mean_norm) + 1), mean_norm, marker=".", **style)
    ax_loss.set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy")
    ax_acc.set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax_acc.axhline(1 / CLASSES, color="gray", lw=0.8, ls=":")
    ax_flow.set(title="gradient flow: mean norm per layer", xlabel="conv layer "
                "(1 = input side)", ylabel="gradient norm", yscale="log")
    ax_loss.legend(fontsize=7)
    deepest = max(size.depths)
    monitors = [runs[(kind, deepest)]["monitor"] for kind in ("plain", "residual")]
    with np.errstate(divide="ignore"):
        logs = np.log10(np.concatenate([m.as_array().ravel() for m in monitors]))
    finite = logs[np.isfinite(logs)]
    shared = (finite.min(), finite.max())  # one colour scale for both heatmaps
    for i, (kind, monitor) in enumerate(zip(("plain", "residual"), monitors)):
        ax = fig.add_subplot(grid[1, 3 * i:3 * i + 3])
        monitor.plot(ax=ax, log_range=shared,
                     title=f"{kind}, {2 * deepest + 1} convs: gradient norm per conv layer")
    fig.suptitle("Degradation in 1D: deeper plain CNNs train worse; residual blocks do not "
                 f"(fastres, {args.device}, {size.steps} steps, batch {size.batch})")
    save_figure(fig, args, "degradation")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--depths", type=int, nargs="+", help="blocks per model (2 convs each)")
    p.add_argument("--steps", type=int, help="training steps per model")
    args = p.parse_args()
    device = start(args)
    size = SIZES["smoke" if args.smoke else "default"]
    size = dataclasses.replace(size, depths=args.depths or size.depths,
                               steps=args.steps or size.steps)
    g = torch.Generator().manual_seed(args.seed)
    motifs = 1.5 * torch.randn(CLASSES, MOTIF, generator=g)
    data = [tuple(t.to(device) for t in motif_data(n, size.length, motifs, g))
            for n in (size.train, size.test)]
    runs, rows = {}, []
    for depth in size.depths:
        for kind, build in (("plain", plain_net), ("residual", residual_net)):
            torch.manual_seed(args.seed + depth)  # both kinds draw the same initial weights
            run = train(f"{kind}-{depth}", build(depth, size.channels), data, size, device,
                        args.seed)
            runs[(kind, depth)] = run
            tail = max(1, size.steps // 5)
            norms = np.nanmean(run["monitor"].as_array(), axis=0)
            rows.append([kind, 2 * depth + 1, run["params"],
                         f"{run['losses'][-tail:].mean():.3f}",
                         f"{run['hits'][-tail:].mean():.3f}",
                         f"{run['test_acc'][-1][1]:.3f}", f"{norms[0] / norms[-1]:.3g}",
                         f"{run['seconds']:.1f}"])
    report(args, "degradation", "Degradation: plain vs residual 1D CNNs "
           f"({size.steps} steps, batch {size.batch}, {size.channels} channels)",
           ["model", "convs", "params", "train loss (last 20%)", "train acc (last 20%)",
            "test acc", "grad norm first/last conv", "train s"], rows,
           notes=["train loss/acc: mean over the last 20% of steps; grad norm first/last conv: "
                  "mean gradient norm of the input-side conv over the output-side one."],
           device=device)
    plot(runs, size, args)


if __name__ == "__main__":
    main()
