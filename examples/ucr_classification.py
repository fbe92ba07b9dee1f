"""Classifying real time series with fastres.ResNet1d, fused against plain (same weights).

Data: UCR/UEA classification datasets that the aeon package ships inside its package data
(GunPoint by default; ItalyPowerDemand, BasicMotions, ArrowHead, ...). This script reads
those files directly and never downloads anything. Install aeon with

    pip install "fastres[examples]"      (or: pip install aeon)

or point --data-dir at a folder holding NAME_TRAIN.ts and NAME_TEST.ts of any dataset in
the same (.ts) format.

Models: fastres.ResNet1d (a small 1D ResNet-18 layout) and its plain twin,
fastres.unfuse(copy.deepcopy(model)): the same weights, trained on the same batches in the
same order, steps interleaved (one fused step, one plain step) so that a busy machine
slows both alike. Prints test accuracy and time for each; the eval forward is timed with
fastres.bench.timing.measure (interleaved rounds, median). Writes ucr_classification.png:
example series per class, the learning curves, and the times.

    python examples/ucr_classification.py                       # GunPoint, ~1 min on 2 cores
    python examples/ucr_classification.py --dataset BasicMotions --epochs 60
    python examples/ucr_classification.py --smoke               # a few seconds
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

import fastres
from fastres.dispatch import describe_default
from fastres.bench.timing import TIMING, measure
from _common import now, parser, report, save_figure, start

INSTALL_HINT = ('the UCR/UEA datasets come from the aeon package\'s bundled data: '
                'pip install "fastres[examples]" (or pip install aeon), '
                'or pass --data-dir with NAME_TRAIN.ts / NAME_TEST.ts files')


@dataclasses.dataclass
class Size:
    epochs: int
    batch: int
    widths: Tuple[int, int, int, int]


SIZES = {"default": Size(40, 16, (16, 32, 64, 128)),
         "smoke": Size(2, 8, (4, 4, 8, 8))}


# --------------------------------------------------------------------------- data


def bundled_dir(dataset: str) -> str:
    """The folder of `dataset` inside aeon's package data; never a download."""
    try:
        import aeon  # the top-level package only: cheap, and it imports no loaders
    except ImportError:
        raise SystemExit(f"ucr_classification: {INSTALL_HINT}") from None
    root = os.path.join(os.path.dirname(aeon.__file__), "datasets", "data")
    folder = os.path.join(root, dataset)
    if not os.path.isfile(os.path.join(folder, f"{dataset}_TRAIN.ts")):
        shipped = sorted(d for d in os.listdir(root)
                         if os.path.isfile(os.path.join(root, d, f"{d}_TRAIN.ts")))
        raise SystemExit(f"ucr_classification: aeon {aeon.__version__} ships no "
                         f"{dataset}_TRAIN.ts; it ships: {', '.join(shipped)}")
    return folder


def read_ts(path: str) -> Tuple[np.ndarray, List[str]]:
    """A classification .ts file (sktime/aeon format) as (X (n, channels, length), labels).

    Header lines start with '@' ('#' for comments); after '@data' each line holds the
    channels separated by ':', each channel's values by ',', and the class label last.
    Missing values ('?') and unequal lengths are refused: this example needs neither.
    """
    series, labels = [], []
    with open(path, encoding="utf-8") as f:
        in_data = False
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower().startswith("@data")
                continue
            *channels, label = line.split(":")
            if not channels:
                raise ValueError(f"{path}:{number}: no class label after the values")
            if "?" in line:
                raise ValueError(f"{path}:{number}: missing values are not supported")
            series.append([[float(v) for v in c.split(",")] for c in channels])
            labels.append(label.strip())
    if not series:
        raise ValueError(f"{path}: no @data section or no series")
    shapes = {(len(s), len(s[0])) for s in series} | {(len(s), len(c)) for s in series
                                                       for c in s}
    if len(shapes) != 1:
        raise ValueError(f"{path}: series of unequal shapes {sorted(shapes)[:4]}")
    return np.asarray(series, dtype=np.float32), labels


def load(dataset: str, data_dir: str = None):
    """((x_train, y_train), (x_test, y_test), class names): float32 (n, c, L), int64 (n,)."""
    folder = data_dir or bundled_dir(dataset)
    (x_train, l_train), (x_test, l_test) = (
        read_ts(os.path.join(folder, f"{dataset}_{split}.ts")) for split in ("TRAIN", "TEST"))
    classes = sorted(set(l_train))
    unknown = set(l_test) - set(classes)
    if unknown:
        raise ValueError(f"test labels {sorted(unknown)} never occur in training")
    index = {c: i for i, c in enumerate(classes)}
    train, test = ((torch.from_numpy(x), torch.tensor([index[c] for c in labels]))
                   for x, labels in ((x_train, l_train), (x_test, l_test)))
    return train, test, classes


# --------------------------------------------------------------------------- training


def evaluate(model, x, y) -> Tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", default="GunPoint", help="default: %(default)s")
    p.add_argument("--data-dir", help="read NAME_TRAIN.ts / NAME_TEST.ts from here, not aeon")
    p.add_argument("--epochs", type=int)
    args = p.parse_args()
    device = start(args)
    size = SIZES["smoke" if args.smoke else "default"]
    size = dataclasses.replace(size, epochs=args.epochs or size.epochs)
    (x_train, y_train), (x_test, y_test), classes = load(args.dataset, args.data_dir)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    n_train, channels, length = x_train.shape

    fused = fastres.ResNet1d([1, 1, 1, 1], in_channels=channels, num_classes=len(classes),
                             widths=size.widths).to(device)
    models = {"fastres": fused, "plain": fastres.unfuse(copy.deepcopy(fused))}
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    train_s = {name: 0.0 for name in models}
    history = {name: [] for name in models}  # (epoch, train loss, test accuracy)
    order = torch.Generator().manual_seed(args.seed)
    steps = 0
    for epoch in tqdm(range(1, size.epochs + 1), desc="epochs", leave=False, disable=None):
        perm = torch.randperm(n_train, generator=order).to(device)
        losses = {name: [] for name in models}
        for i in range(0, n_train, size.batch):
            idx = perm[i:i + size.batch]
            if len(idx) < 2:  # batch norm needs two values per channel
                continue
            steps += epoch > 1
            for name, model in models.items():  # interleaved: the same batch for both
                started = now(device)
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                if epoch > 1:  # the first epoch warms up: fastres measures each new shape
                    train_s[name] += now(device) - started
                losses[name].append(loss.item())
        for name, model in models.items():
            history[name].append((epoch, np.mean(losses[name]),
                                  evaluate(model, x_test, y_test)[1]))

    for model in models.values():
        model.eval()
    with torch.no_grad():
        logits = {name: m(x_test) for name, m in models.items()}
        eval_times = measure({name: (lambda m=m: m(x_test)) for name, m in models.items()},
                             device, TIMING["quick" if args.smoke else "default"])
    drift = (logits["fastres"] - logits["plain"]).abs().max().item()
    steps = max(steps, 1)
    rows = []
    for name in models:
        acc = (logits[name].argmax(1) == y_test).float().mean().item()
        rows.append([name, f"{acc:.3f}", f"{train_s[name]:.1f}",
                     f"{1e3 * train_s[name] / steps:.1f}",
                     f"{1e3 * eval_times[name].median_s:.2f}"])
    speed = {"train step": train_s["plain"] / train_s["fastres"],
             "eval forward": eval_times["plain"].median_s / eval_times["fastres"].median_s}
    rows.append(["plain / fastres", "-", f"{speed['train step']:.2f}x", "-",
                 f"{speed['eval forward']:.2f}x"])
    report(args, "ucr_classification",
           f"{args.dataset}: ResNet1d, fastres vs plain from the same weights "
           f"({size.epochs} epochs, batch {size.batch}, {n_train} train / {len(y_test)} test "
           f"series of {channels}x{length}, {len(classes)} classes)",
           ["model", "test acc", "train s", "ms/step", f"eval ms ({len(y_test)} series)"], rows,
           notes=[f"largest logit difference after training: {drift:.2e}",
                  "train time: epochs 2 on (the first warms up: fastres's dispatch measures "
                  "each new input shape on its first call)",
                  f"fastres default dispatch here: {describe_default(device, torch.float32)}",
                  f"widths {size.widths}; eval: median of {len(eval_times['fastres'].times_s)} "
                  "interleaved rounds"], device=device)
    plot(x_train, y_train, classes, history, train_s, steps, eval_times, args)


def plot(x_train, y_train, classes, history, train_s, steps, eval_times, args) -> None:
    fig = Figure(figsize=(15, 4.5))
    ax_data, ax_curve, ax_time = fig.subplots(1, 3, gridspec_kw=dict(wspace=0.3))
    colors = [f"C{i}" for i in range(10)]
    for k, name in enumerate(classes[:10]):
        for j, series in enumerate(x_train[y_train == k][:3, 0].cpu()):
            ax_data.plot(series, color=colors[k], lw=0.8, label=f"class {name}" if j == 0 else None)
    ax_data.legend(fontsize=7)
    ax_data.set(title=f"{args.dataset}: 3 training series per class (channel 0)",
                xlabel="step")
    for name, ls in (("fastres", "-"), ("plain", "--")):
        epochs, loss, acc = zip(*history[name])
        ax_curve.plot(epochs, loss, color="tab:blue", ls=ls, label=f"train loss, {name}")
        ax_curve.plot(epochs, acc, color="tab:green", ls=ls, label=f"test accuracy, {name}")
    ax_curve.set(title="same weights, same batches", xlabel="epoch", ylim=(0, None))
    ax_curve.legend(fontsize=7)
    names = list(train_s)
    step_ms = [1e3 * train_s[n] / steps for n in names]
    eval_ms = [1e3 * eval_times[n].median_s for n in names]
    xs = np.arange(len(names))
    ax_time.bar(xs - 0.2, step_ms, 0.4, label="train step (mean)")
    ax_time.bar(xs + 0.2, eval_ms, 0.4, label="eval forward, test set (median)")
    ax_time.set(xticks=xs, xticklabels=names, ylabel="ms", title=f"time ({args.device})")
    ax_time.legend(fontsize=7)
    fig.suptitle(f"ResNet1d on {args.dataset}: fastres against plain PyTorch", y=1.03)
    save_figure(fig, args, "ucr_classification")


if __name__ == "__main__":
    main()
