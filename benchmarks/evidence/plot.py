"""The PNG: speedups per workload against eager and torch.compile, and where the time goes."""
from __future__ import annotations

from typing import Dict, List, Optional

from .profiling import short_name

TOP_KERNELS = 8


def _speedup_panel(ax, rows: List[Dict[str, object]]) -> None:
    rows = [r for r in rows if r["impl"] == "fastres" and r.get("status") == "ok"]
    labels = [r["workload"] for r in rows]
    height = 0.4
    for offset, key, name in ((-height / 2, "vs_eager", "vs eager"),
                              (height / 2, "vs_compile", "vs torch.compile (best mode)")):
        ys = [i + offset for i, r in enumerate(rows) if r.get(key) is not None]
        xs = [r[key] for r in rows if r.get(key) is not None]
        ax.barh(ys, xs, height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastres (default dispatch), device time; > 1 is faster")
    ax.set_title("Timings: fastres against eager PyTorch and torch.compile", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def _profile_panel(ax, impl: str, profile: Dict[str, object], workload: str) -> None:
    kernels = profile["kernels"][:TOP_KERNELS]
    ax.barh(range(len(kernels)), [k["time_per_step_us"] for k in kernels])
    ax.set_yticks(range(len(kernels)))
    ax.set_yticklabels([f"{short_name(k['name'], 48)} (x{k['count_per_step']:g})"
                        for k in kernels], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("us per step")
    ax.set_title(f"Where the time goes, {impl}: {workload}; {profile['launches_per_step']:.0f} "
                 f"launches, {profile['time_per_step_us']:.0f} us per step", fontsize=8)


def write_png(doc: Dict[str, object], path: str) -> Optional[str]:
    """Draw the panels that have data; None when none has."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing_rows = doc["sections"]["timings"]["data"].get("rows", [])
    profile = doc["sections"]["profile"]["data"]
    panels = []
    if any(r["impl"] == "fastres" and r.get("status") == "ok" for r in timing_rows):
        n = sum(r["impl"] == "fastres" for r in timing_rows)
        panels.append((max(3.0, 0.3 * n + 1.2), lambda ax: _speedup_panel(ax, timing_rows)))
    for impl, result in profile.get("profiles", {}).items():
        panels.append((3.0, lambda ax, impl=impl, result=result:
                       _profile_panel(ax, impl, result, profile["workload"])))
    if not panels:
        return None
    # Constrained layout makes room for the long kernel names on the left.
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(h for h, _ in panels)),
                             gridspec_kw={"height_ratios": [h for h, _ in panels]},
                             squeeze=False, constrained_layout=True)
    for ax, (_, draw) in zip(axes[:, 0], panels):
        draw(ax)
    smoke = " - SMOKE RUN ON CPU, not evidence" if doc["mode"] == "smoke" else ""
    fig.suptitle(f"fastres GPU evidence: {doc['device']['name']}, torch "
                 f"{doc['versions'].get('torch')}, commit {doc['commit'][:12]}{smoke}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
