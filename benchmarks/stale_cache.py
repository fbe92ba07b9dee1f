"""Can a choice measured on a busy machine make the default slower later? (issue: a stale
dispatch cache ran a TemporalBlock training step at 0.90x plain.)

Runs the block and model suites twice with one private dispatch cache
(FASTRES_DISPATCH_CACHE=a fresh folder, --reuse-dispatch-cache):
  1. under a deliberate busy load: 2 x cores spinning processes, started before and
     stopped after, so every choice is measured while the machine is loaded;
  2. quiet (once the load has fallen back), with the same cache folder: what the first
     run stored is reused.
A choice measured under load must not be stored (fastres/dispatch/measure.py), so the quiet
run measures afresh, and every block and model row that runs a fused path must be >= 0.97x
plain. A row whose default ran plain (the bench's `runs` column) is plain timed against
itself, which no stored choice can slow: it is listed with its ratio, not judged.

    python benchmarks/stale_cache.py --out benchmarks/results

Writes <prefix>-busy.{json,md,png}, <prefix>-quiet.{json,md,png} (the bench's own outputs)
and <prefix>.md, the verdict per row; the prefix names the CPU. Exit status 1 if a quiet
row is below the bound.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

BOUND = 0.97


def _spin():
    while True:
        pass


def _wait_until_quiet(limit_s: float = 600.0) -> float:
    """Wait until the dispatcher would call the machine quiet (its one-minute load average
    lags the spinners by a minute); seconds waited. A quiet run that starts in the busy
    run's tail stores nothing and times noise."""
    from fastres.dispatch.choice import BUSY_LOAD_PER_CORE
    from fastres.machine import load_per_core
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        load = load_per_core()
        if load is None or load <= BUSY_LOAD_PER_CORE / 2:
            break
        time.sleep(5)
    return time.monotonic() - start


def _bench(out: str, prefix: str, cache: str, threads: int) -> dict:
    env = {**os.environ, "FASTRES_DISPATCH_CACHE": cache}
    subprocess.run([sys.executable, "-m", "fastres", "bench", "--only", "block,model",
                    "--reuse-dispatch-cache", "--no-progress", "--threads", str(threads),
                    "--out", out, "--prefix", prefix], env=env, check=True)
    with open(os.path.join(out, prefix + ".json")) as f:
        return json.load(f)


def main() -> int:
    from fastres.bench.environment import device_slug
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prefix")
    args = parser.parse_args()
    prefix = args.prefix or f"{device_slug(torch.device('cpu'))}-stale-cache"
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        spinners = [multiprocessing.Process(target=_spin, daemon=True)
                    for _ in range(2 * (os.cpu_count() or 1))]
        for p in spinners:
            p.start()
        try:
            busy = _bench(args.out, prefix + "-busy", cache, args.threads)
        finally:
            for p in spinners:
                p.terminate()
        stored = sorted(os.listdir(cache))
        waited = _wait_until_quiet()
        quiet = _bench(args.out, prefix + "-quiet", cache, args.threads)
    lines = ["# Stale dispatch cache: busy run, then quiet run with the same cache",
             "", f"device: {quiet['environment'].get('device_name')}, torch "
             f"{quiet['environment'].get('torch')}, commit {quiet['environment'].get('git_commit')}",
             f"busy run: load average {busy['environment'].get('load_average_start')}; "
             f"files in the cache after it: {stored or 'none'}",
             f"quiet run (after waiting {waited:.0f} s for the load to fall): load average "
             f"{quiet['environment'].get('load_average_start')}; "
             f"{quiet['dispatch']['summary']}", "",
             "| suite | row | ran (from the cache?) | fastres vs plain (quiet) | >= 0.97 |",
             "|---|---|---|---|---|"]
    failed = 0
    for name, suite in quiet["suites"].items():
        for row in suite["rows"]:
            if row["impl"] != "fastres" or row["status"] != "ok":
                continue
            cached = any(c["why"].startswith("cached") for c in row["choices"] or [])
            if row["runs"] == "plain":
                verdict = "plain against itself"
            else:
                ok = row["speedup"] >= BOUND
                failed += not ok
                verdict = "yes" if ok else "NO"
            lines.append(f"| {name} | {row['task']} | {row['runs']}"
                         f"{' (cached)' if cached else ''} | {row['speedup']:.2f}x | {verdict} |")
    lines += ["", f"{failed} row(s) running a fused path below {BOUND}x plain"]
    with open(os.path.join(args.out, prefix + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
