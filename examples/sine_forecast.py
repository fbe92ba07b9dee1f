"""Sine-wave forecasting with a fastres TemporalConvNet.

Each series is a sum of two sine waves of random period, phase and amplitude plus noise.
A causal TCN (fastres.TemporalConvNet and a 1x1 conv read-out) reads the series up to
step t and predicts the clean signal `horizon` steps ahead, at every t at once. The
output at t depends on the inputs t - R + 1 .. t only, R being the receptive field
(1 + 2 (K - 1) sum of the dilations); the plot shades that window for one output.

Prints the test error against two baselines (repeat the last value; predict 0) and checks
the fused model against its plain twin (fastres.unfuse, same weights); writes
sine_forecast.png: truth against prediction with the receptive field, and the loss curve.

    python examples/sine_forecast.py                # ~1 min on 2 CPU cores
    python examples/sine_forecast.py --steps 3000 --device cuda
    python examples/sine_forecast.py --smoke        # a few seconds
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import fastres
from fastres.conventions import rel_err
from _common import now, parser, report, save_figure, start


@dataclasses.dataclass
class Size:
    length: int        # steps per series
    batch: int
    channels: int
    levels: int        # TemporalBlocks; block i has dilation 2**i
    steps: int
    horizon: int
    eval_every: int


SIZES = {"default": Size(256, 32, 24, 4, 600, 10, 25),
         "smoke": Size(64, 8, 8, 2, 10, 5, 5)}
KERNEL = 3


def sine_batch(n: int, length: int, horizon: int, g: torch.Generator):
    """(inputs (n, 1, length), targets (n, 1, length)): noisy series and the clean signal
    `horizon` steps later."""
    t = torch.arange(length + horizon, dtype=torch.float32)
    period = torch.empty(n, 2, 1).uniform_(12, 64, generator=g)
    phase = torch.empty(n, 2, 1).uniform_(0, 2 * np.pi, generator=g)
    amplitude = torch.empty(n, 2, 1).uniform_(0.3, 1.0, generator=g)
    clean = (amplitude * torch.sin(2 * np.pi * t / period + phase)).sum(1, keepdim=True)
    noisy = clean[..., :length] + 0.1 * torch.randn(n, 1, length, generator=g)
    return noisy, clean[..., horizon:]


class Forecaster(nn.Module):
    """TemporalConvNet -> 1x1 conv: (B, 1, L) -> (B, 1, L), causal."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.tcn = fastres.TemporalConvNet(1, [channels] * levels, kernel_size=KERNEL,
                                           dropout=0.0)
        self.head = nn.Conv1d(channels, 1, 1)

    def forward(self, x):
        return self.head(self.tcn(x))


def evaluate(model, x, y, warmup: int) -> float:
    """MSE over the steps whose receptive field lies inside the series."""
    model.eval()
    with torch.no_grad():
        mse = F.mse_loss(model(x)[..., warmup:], y[..., warmup:]).item()
    model.train()
    return mse


def plot(model, x, y, curve, baselines, size: Size, rf: int, args) -> None:
    model.eval()
    with torch.no_grad():
        pred = model(x[:1]).squeeze().cpu().numpy()
    series, truth = x[0, 0].cpu().numpy(), y[0, 0].cpu().numpy()
    steps = np.arange(size.length)
    fig = Figure(figsize=(12, 7.5))
    ax, ax_loss = fig.subplots(2, 1, gridspec_kw=dict(height_ratios=[3, 2], hspace=0.35))
    ax.plot(steps, series, color="0.7", lw=1, label="input (noisy), step t")
    ax.plot(steps + size.horizon, truth, color="k", lw=1.5,
            label=f"truth: clean signal at t + {size.horizon}")
    ax.plot(steps + size.horizon, pred, color="tab:red", lw=1.5, ls="--",
            label="TCN prediction, plotted at t + horizon")
    t_out = size.length - 1
    ax.axvspan(t_out - rf + 1, t_out, color="tab:blue", alpha=0.15,
               label=f"receptive field of the last output ({rf} steps)")
    ax.axvspan(0, min(rf - 1, size.length), color="0.5", alpha=0.08, hatch="//",
               label="warm-up: field reaches before step 0 (not scored)")
    ax.annotate("", xy=(t_out + size.horizon, pred[-1]), xytext=(t_out, series[-1]),
                arrowprops=dict(arrowstyle="->", color="tab:blue"))
    ax.set(title="test series: truth against the TCN's forecast", xlabel="step", ylabel="value")
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    steps_done, train_mse, test_mse = zip(*curve)
    ax_loss.plot(steps_done, train_mse, label="train MSE")
    ax_loss.plot(steps_done, test_mse, label="test MSE")
    for (name, value), color in zip(baselines.items(), ("tab:gray", "tab:brown")):
        ax_loss.axhline(value, color=color, ls=":", label=f"baseline: {name}")
    ax_loss.set(yscale="log", xlabel="training step", ylabel="MSE", title="learning curve")
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"Sine forecasting, {size.horizon} steps ahead, with fastres.TemporalConvNet "
                 f"({size.levels} levels x {size.channels} channels, kernel {KERNEL}; "
                 f"{args.device})")
    save_figure(fig, args, "sine_forecast")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--horizon", type=int, help="steps ahead to forecast")
    args = p.parse_args()
    device = start(args)
    size = SIZES["smoke" if args.smoke else "default"]
    size = dataclasses.replace(size, steps=args.steps or size.steps,
                               horizon=args.horizon or size.horizon)
    model = Forecaster(size.channels, size.levels).to(device)
    rf = model.tcn.receptive_field
    data = torch.Generator().manual_seed(args.seed)
    x_test, y_test = (t.to(device) for t in sine_batch(128, size.length, size.horizon, data))
    warmup = min(rf - 1, size.length - 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, size.steps)
    curve, started = [], now(device)
    for step in tqdm(range(size.steps), desc="training", leave=False, disable=None):
        x, y = (t.to(device) for t in sine_batch(size.batch, size.length, size.horizon, data))
        loss = F.mse_loss(model(x)[..., warmup:], y[..., warmup:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % size.eval_every == 0 or step + 1 == size.steps:
            curve.append((step + 1, loss.item(), evaluate(model, x_test, y_test, warmup)))
    seconds = now(device) - started

    baselines = {
        "repeat the last value": F.mse_loss(x_test[..., warmup:], y_test[..., warmup:]).item(),
        "predict 0": y_test[..., warmup:].square().mean().item(),
    }
    # The fused model against its plain twin, same weights (fastres.unfuse of a copy).
    plain = fastres.unfuse(copy.deepcopy(model)).eval()
    model.eval()
    with torch.no_grad():
        twin_err = rel_err(model(x_test), plain(x_test))
    test_mse = curve[-1][2]
    rows = [["TCN (fastres)", f"{test_mse:.4g}", f"{seconds:.1f}"]]
    rows += [[f"baseline: {name}", f"{value:.4g}", "-"] for name, value in baselines.items()]
    report(args, "sine_forecast", f"Sine forecasting {size.horizon} steps ahead "
           f"({size.steps} steps of batch {size.batch}, series of {size.length})",
           ["model", "test MSE", "train s"], rows,
           notes=[f"receptive field: {rf} steps (the first {warmup} outputs are not scored)",
                  f"fused vs plain twin (fastres.unfuse, same weights), eval: relative "
                  f"difference {twin_err:.1e}"], device=device)
    plot(model, x_test, y_test, curve, baselines, size, rf, args)


if __name__ == "__main__":
    main()
