"""What every example shares: its command line, device and threads, tables, figures, clocks.

Each example writes into --out a PNG and a markdown file holding its table together with
the machine, versions and commit that produced it, so that a number quoted from it can be
traced to the run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # examples write files; they never open windows

import torch

from fastres.bench.environment import environment
from fastres.bench.formatting import markdown_table, text_table


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every example takes; the module docstring is the --help text."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run of a few seconds (what CI runs), same code path")
    p.add_argument("--out", default="example-results",
                   help="folder for the PNG and the markdown table (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    # One thread by default: these layers are small, so a second thread buys little, and on
    # a busy 2-core machine two spinning OpenMP threads made a training step 100x slower.
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s)")
    return p


def start(args) -> torch.device:
    """Apply the common options: threads, seed, device check, output folder."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA GPU here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    return device


def now(device: torch.device) -> float:
    """Wall-clock seconds, after the device has finished the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def report(args, name: str, title: str, headers: Sequence[str], rows: Sequence[Sequence],
           notes: Sequence[str], device: torch.device) -> str:
    """Print the table; write it with the run's environment to {out}/{name}.md."""
    cells = [[str(v) for v in row] for row in rows]
    print(f"\n{title}\n")
    print(text_table(headers, cells))
    for note in notes:
        print(note)
    env = environment(device)
    lines = [f"# {title}", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`", "",
             f"Device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
             f"fastres {env['fastres']}, commit {env['git_commit']}; load average at start "
             f"{env['load_average_start']}", "",
             markdown_table(headers, cells), ""]
    lines += [f"{note}  " for note in notes]
    path = os.path.join(args.out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def save_figure(fig, args, name: str) -> str:
    path = os.path.join(args.out, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    return path
