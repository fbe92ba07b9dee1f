"""What fastres.GradientMonitor costs a training loop: detached (should be nothing) and recording.

    PYTHONPATH=$PWD python benchmarks/bench_monitor.py            # ~1 min
    PYTHONPATH=$PWD python benchmarks/bench_monitor.py --quick    # seconds

Three copies of one fastres.TemporalConvNet (same weights) train with the same inputs, each
step being forward, a mean-square loss, backward, SGD step:
- "never attached": no monitor ever saw this model;
- "detached": a GradientMonitor attached its hooks, recorded a few steps, then detached;
- "recording": a GradientMonitor attached, with monitor.step() after every backward.
The three are timed together by fastres.bench.timing.measure (interleaved rounds in rotating
order, median per call), so a busy machine slows them alike. The ratios to "never attached"
are the overheads. Writes benchmarks/results/<device>-<date>-monitor.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os

import torch

import fastres
from fastres.bench.environment import environment
from fastres.bench.formatting import fmt_pct, fmt_x, markdown_table, text_table
from fastres.bench.timing import TimingConfig, measure

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {  # (batch, channels, levels, length)
    "default": (16, 32, 6, 512),
    "quick": (4, 8, 2, 64),
}
TIMINGS = {
    "default": TimingConfig(min_rounds=15, max_rounds=40, max_time_s=40.0, min_block_s=0.2,
                            warmup_s=0.5),
    "quick": TimingConfig(min_rounds=3, max_rounds=3, max_time_s=0.1, min_block_s=0.0,
                          warmup_s=0.0, min_warmup_calls=1),
}


def train_step(model, x, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step()
        opt.step()
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = "quick" if args.quick else "default"
    batch, channels, levels, length = SIZES[size]
    torch.manual_seed(0)
    base = fastres.TemporalConvNet(channels, [channels] * levels, kernel_size=3,
                                   dropout=0.0).to(device)
    never, detached, recording = (copy.deepcopy(base) for _ in range(3))
    x = torch.randn(batch, channels, length, device=device)

    warm = fastres.GradientMonitor(detached)
    for _ in range(3):
        train_step(detached, x, warm)()
    warm.detach()
    hooks = sum(len(p._post_accumulate_grad_hooks or {}) for p in detached.parameters())
    assert hooks == 0, f"{hooks} hooks left after detach"
    monitor = fastres.GradientMonitor(recording)

    results = measure({"never attached": train_step(never, x),
                       "detached": train_step(detached, x),
                       "recording": train_step(recording, x, monitor)}, device, TIMINGS[size])
    for stats in results.values():
        if isinstance(stats, Exception):
            raise stats
    base_s = results["never attached"].median_s
    headers = ["model", "median ms/step", "spread (IQR/median)", "rounds", "vs never attached"]
    rows = [[name, f"{1e3 * s.median_s:.3f}", fmt_pct(s.spread), str(len(s.times_s)),
             fmt_x(s.median_s / base_s)] for name, s in results.items()]
    title = (f"GradientMonitor overhead: TemporalConvNet {levels} levels x {channels} ch, "
             f"batch {batch}, length {length}, float32, {device.type}, train step")
    print(title)
    print(text_table(headers, rows))
    env = environment(device)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{device.type}-{datetime.date.today()}-monitor"
                        + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"title": title, "environment": env, "layers": len(monitor.names),
                   "results": {n: s.to_json() for n, s in results.items()}}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {title}\n\nCommand: `python benchmarks/bench_monitor.py"
                f"{' --quick' if args.quick else ''}`; {env['device_name']}, torch "
                f"{env['torch']}, commit {env['git_commit']}, load average at start "
                f"{env['load_average_start']}. {len(monitor.names)} watched layers.\n\n"
                + markdown_table(headers, rows) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
