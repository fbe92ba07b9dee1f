"""TCN against LSTM and GRU on the adding problem (Bai, Kolter and Koltun, 2018).

Input: T steps of 2 features, a random number in [0, 1] and a marker that is 1 at exactly
two steps (one in each half of the sequence) and 0 elsewhere. Target: the sum of the two
marked numbers. Predicting the mean, 1, scores MSE ~0.167; a model that remembers the two
marked numbers across the sequence scores ~0.

Models, at about the same parameter count, each reading its output at the last step:
    TCN (fastres)   fastres.TemporalConvNet (receptive field >= T) -> linear
    TCN (plain)     fastres.unfuse of a copy: the same weights in plain PyTorch modules
    LSTM, GRU       nn.LSTM / nn.GRU, one layer -> linear
All run on the same device, with the same batches, under Adam. Training is interleaved:
each step goes to the model that has used the least training time so far, so a busy
machine slows every model alike. Test MSE is measured off the clock.

Prints the time each model needed to reach MSE 0.05 (and its final MSE); writes
tcn_vs_rnn.png: test MSE against training wall time.

    python examples/tcn_vs_rnn.py                   # ~1 min on 2 CPU cores, T = 100
    python examples/tcn_vs_rnn.py --length 400 --seconds 120 --device cuda
    python examples/tcn_vs_rnn.py --smoke           # a few seconds
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

import fastres
from _common import now, parser, report, save_figure, start

SOLVED = 0.05  # test MSE counted as "learned the task"


@dataclasses.dataclass
class Size:
    length: int         # T
    batch: int
    channels: int       # TCN channels per level
    seconds: float      # training wall time per model
    eval_every: int     # steps of a model between two of its test evaluations
    test: int


SIZES = {"default": Size(100, 32, 24, 15.0, 25, 512),
         "smoke": Size(24, 8, 8, 0.6, 5, 64)}
KERNEL = 3


def adding_batch(n: int, length: int, g: torch.Generator):
    """(x (n, 2, length), y (n,)): numbers and markers, and the sum of the marked numbers."""
    numbers = torch.rand(n, length, generator=g)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g)
    markers = torch.zeros(n, length)
    markers[torch.arange(n), first] = 1.0
    markers[torch.arange(n), second] = 1.0
    return torch.stack([numbers, markers], 1), (numbers * markers).sum(1)


class TCNRegressor(nn.Module):
    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.tcn = fastres.TemporalConvNet(2, [channels] * levels, kernel_size=KERNEL,
                                           dropout=0.0)
        self.head = nn.Linear(channels, 1)

    def forward(self, x):                      # (B, 2, T) -> (B,)
        return self.head(self.tcn(x)[:, :, -1]).squeeze(1)


class RNNRegressor(nn.Module):
    def __init__(self, cell: type, hidden: int):
        super().__init__()
        self.rnn = cell(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):                      # (B, 2, T) -> (B,)
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1]).squeeze(1)


def levels_for(length: int) -> int:
    """Fewest TemporalBlocks whose receptive field 1 + 2 (K-1) (2**n - 1) covers `length`."""
    return max(1, math.ceil(math.log2((length - 1) / (2 * (KERNEL - 1)) + 1)))


def matched_hidden(gates: int, target: int) -> int:
    """Hidden size whose one-layer RNN (2 inputs) + linear read-out comes closest to target."""
    count = lambda h: gates * h * (2 + h + 2) + h + 1  # noqa: E731 (weights, two biases)
    return min(range(1, 1025), key=lambda h: abs(count(h) - target))


def build(size: Size, device):
    tcn = TCNRegressor(size.channels, levels_for(size.length))
    target = sum(p.numel() for p in tcn.parameters())
    models = {"TCN (fastres)": tcn, "TCN (plain)": fastres.unfuse(copy.deepcopy(tcn)),
              "LSTM": RNNRegressor(nn.LSTM, matched_hidden(4, target)),
              "GRU": RNNRegressor(nn.GRU, matched_hidden(3, target))}
    return {name: m.to(device) for name, m in models.items()}


def test_mse(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        mse = F.mse_loss(model(x), y).item()
    model.train()
    return mse


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--length", type=int, help="sequence length T")
    p.add_argument("--seconds", type=float, help="training wall time per model")
    args = p.parse_args()
    device = start(args)
    size = SIZES["smoke" if args.smoke else "default"]
    size = dataclasses.replace(size, length=args.length or size.length,
                               seconds=args.seconds or size.seconds)
    models = build(size, device)
    data = torch.Generator().manual_seed(args.seed)
    x_test, y_test = (t.to(device) for t in adding_batch(size.test, size.length, data))
    # One batch stream per model, the same batches in the same order for all of them.
    streams = {name: torch.Generator().manual_seed(args.seed + 1) for name in models}
    opts = {name: torch.optim.Adam(m.parameters(), lr=4e-3) for name, m in models.items()}
    clock = {name: 0.0 for name in models}
    steps = {name: 0 for name in models}
    curves = {name: [(0.0, test_mse(m, x_test, y_test))] for name, m in models.items()}
    # Before the clocks start, each model runs once on a batch of the training shape, state
    # restored: fastres's dispatch measures its choices on a shape's first call, which is
    # set-up, not training (fastres.autotune; for the RNNs a plain untimed step).
    warm_x, _ = adding_batch(size.batch, size.length, torch.Generator().manual_seed(-1 % 2**31))
    for model in models.values():
        fastres.autotune(model, warm_x.to(device))
    progress = tqdm(total=round(size.seconds * len(models)), unit="s", leave=False,
                    disable=None, desc="training (interleaved)")
    while min(clock.values()) < size.seconds:
        name = min(clock, key=clock.get)
        model, opt = models[name], opts[name]
        x, y = (t.to(device) for t in adding_batch(size.batch, size.length, streams[name]))
        started = now(device)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        spent = now(device) - started
        clock[name] += spent
        progress.update(spent)
        steps[name] += 1
        if steps[name] % size.eval_every == 0 or clock[name] >= size.seconds:
            curves[name].append((clock[name], test_mse(model, x_test, y_test)))
    progress.close()

    rows = []
    for name, model in models.items():
        solved = next((t for t, mse in curves[name] if mse < SOLVED), None)
        rows.append([name, sum(p.numel() for p in model.parameters()), steps[name],
                     f"{1e3 * clock[name] / steps[name]:.1f}",
                     "-" if solved is None else f"{solved:.1f}",
                     f"{curves[name][-1][1]:.4f}"])
    tcn = models["TCN (fastres)"]
    report(args, "tcn_vs_rnn", f"Adding problem, T = {size.length}: {size.seconds:g} s of "
           f"training per model, batch {size.batch}",
           ["model", "params", "steps", "ms/step", f"s to test MSE < {SOLVED}",
            "final test MSE"], rows,
           notes=[f"TCN: {len(tcn.tcn.network)} levels x {size.channels} channels, kernel "
                  f"{KERNEL}, receptive field {tcn.tcn.receptive_field} >= T; predicting the "
                  f"mean scores ~0.167. '-': not reached in the time given.",
                  "each model ran one untimed call first (fastres.autotune: the dispatch "
                  "measures a shape's choices on its first call)"], device=device)

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    styles = {"TCN (fastres)": ("tab:red", "-"), "TCN (plain)": ("tab:red", ":"),
              "LSTM": ("tab:blue", "-"), "GRU": ("tab:green", "-")}
    for name, curve in curves.items():
        seconds, mse = zip(*curve)
        color, ls = styles[name]
        ax.plot(seconds, mse, color=color, ls=ls, label=name)
    ax.axhline(1 / 6, color="gray", lw=0.8, ls="--", label="predict the mean (1/6)")
    ax.axhline(SOLVED, color="gray", lw=0.8, ls=":", label=f"MSE {SOLVED}")
    ax.set(yscale="log", xlabel=f"training wall time (s, {args.device})", ylabel="test MSE",
           title=f"Adding problem, T = {size.length}: TCN vs LSTM / GRU at ~equal parameters")
    ax.legend()
    save_figure(fig, args, "tcn_vs_rnn")


if __name__ == "__main__":
    main()
