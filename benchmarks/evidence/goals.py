"""The summary: each H100 goal of fastres, its measured value, and met or missed.

Every goal is judged on its worst measured row (the smallest speedup, the largest ratio),
so "met" means every row it covers meets it. A goal whose rows were not measured (skipped
section, no compile, no GPU) says so instead of guessing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

from .memory_stream import step_latency

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"


@dataclasses.dataclass
class Goal:
    goal: str
    target: float
    higher_is_better: bool
    unit: str                                   # "x" (a ratio) or "us"
    # rows -> (worst value, what it is, how many rows), or None when nothing was measured
    evaluate: Callable[[Dict[str, object]], Optional[tuple]]

    def judge(self, doc: Dict[str, object]) -> Dict[str, object]:
        found = self.evaluate(doc)
        fmt = (lambda v: f"{v:.2f}x") if self.unit == "x" else (lambda v: f"{v * 1e6:.1f} us")
        target_text = (">= " if self.higher_is_better else "<= ") + fmt(self.target)
        if found is None:
            return {"goal": self.goal, "measured": None, "measured_text": "-",
                    "target": self.target, "target_text": target_text, "status": NOT_MEASURED,
                    "evidence": "no measured rows"}
        value, where, count = found
        met = value >= self.target if self.higher_is_better else value <= self.target
        return {"goal": self.goal, "measured": value, "measured_text": fmt(value),
                "target": self.target, "target_text": target_text,
                "status": MET if met else MISSED,
                "evidence": f"worst of {count}: {where}"}


def _rows(doc: Dict[str, object], section: str) -> List[Dict[str, object]]:
    rows = doc["sections"][section]["data"].get("rows", [])
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _worst(rows: List[Dict[str, object]], key: str, lowest: bool,
           label: Callable) -> Optional[tuple]:
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None
    pick = min if lowest else max
    worst = pick(rows, key=lambda r: r[key])
    return worst[key], label(worst), len(rows)


def _fastres_rows(doc, suites, **match) -> List[Dict[str, object]]:
    return [r for r in _rows(doc, "timings") if r["impl"] == "fastres" and r["suite"] in suites
            and all(pred(r[k]) for k, pred in match.items())]


def _speedup_goal(key: str, suites, **match):
    return lambda doc: _worst(_fastres_rows(doc, suites, **match), key, True,
                              lambda r: r["workload"])


def _dilation(doc) -> Optional[tuple]:
    """Largest time(dilation >= 8) / time(dilation 1) of the op at the default dispatch."""
    rows = _fastres_rows(doc, ("op",))
    base = {(r["C"], r["dtype"], r["mode"]): r for r in rows if r["dilation"] == 1}
    ratios = []
    for r in rows:
        key = (r["C"], r["dtype"], r["mode"])
        if r["dilation"] >= 8 and key in base:
            ratios.append({"ratio": r["device_s"] / base[key]["device_s"],
                           "label": f"{r['workload']} vs d1"})
    return _worst(ratios, "ratio", False, lambda r: r["label"])


def _best_baseline(doc) -> Optional[tuple]:
    """Smallest (fastest of eager and every compile) / fastres default over all workloads."""
    by_workload: Dict[str, Dict[str, float]] = {}
    for r in _rows(doc, "timings"):
        by_workload.setdefault(r["workload"], {})[r["impl"]] = r["device_s"]
    ratios = []
    for workload, times in by_workload.items():
        baselines = [t for impl, t in times.items()
                     if impl == "eager" or impl.startswith("compile")]
        if "fastres" in times and baselines:
            best = min(baselines)
            ratios.append({"ratio": best / times["fastres"], "label": workload})
    return _worst(ratios, "ratio", True, lambda r: r["label"])


def _memory(doc) -> Optional[tuple]:
    rows = [r for r in _rows(doc, "memory") if r["impl"] == "fastres"]
    return _worst(rows, "vs_eager", False, lambda r: r["workload"])


def _streaming(doc) -> Optional[tuple]:
    rows = [dict(r, latency=step_latency(r)) for r in _rows(doc, "streaming")
            if r["impl"] == "step+graph" and r["B"] == 1]
    return _worst(rows, "latency", False,
                  lambda r: "B1 graph replay, max(device, host) per step")


GOALS = [
    Goal("memory-bound (C <= 128, bf16): TemporalBlock train step vs eager", 2.0, True, "x",
         _speedup_goal("vs_eager", ("block",), C=lambda c: c <= 128,
                       dtype=lambda d: d == "bfloat16", mode=lambda m: m == "train")),
    Goal("memory-bound (C <= 128, bf16): TemporalBlock train step vs torch.compile", 1.3, True,
         "x", _speedup_goal("vs_compile", ("block",), C=lambda c: c <= 128,
                            dtype=lambda d: d == "bfloat16", mode=lambda m: m == "train")),
    Goal("memory-bound (C <= 128, bf16): TemporalBlock eval vs eager", 3.0, True, "x",
         _speedup_goal("vs_eager", ("block",), C=lambda c: c <= 128,
                       dtype=lambda d: d == "bfloat16", mode=lambda m: m == "eval")),
    Goal("compute-bound (C >= 256): op and TemporalBlock vs eager", 1.2, True, "x",
         _speedup_goal("vs_eager", ("op", "block"), C=lambda c: c >= 256)),
    Goal("dilation >= 8 within 1.1x of dilation 1 (op time ratio)", 1.1, False, "x", _dilation),
    Goal("no shape below 0.97x of the best baseline (default dispatch)", 0.97, True, "x",
         _best_baseline),
    Goal("TemporalConvNet training peak memory vs eager", 0.6, False, "x", _memory),
    Goal("streaming step with CUDA-graph capture", 10e-6, False, "us", _streaming),
]


def correctness_line(doc: Dict[str, object]) -> str:
    parts = []
    check = doc["sections"]["check"]["data"]
    if "total" in check:
        parts.append(f"fastres check {check['passed']}/{check['total']} passed")
    parity = doc["sections"]["parity"]["data"]
    if "total" in parity:
        parts.append(f"parity {parity['passed']}/{parity['total']} within bounds, bitwise "
                     f"repeat {parity['repeat_identical']}/{parity['repeat_total']} identical")
    return "; ".join(parts) or "correctness sections did not run"


def summarize(doc: Dict[str, object]) -> Dict[str, object]:
    """The summary block of the results document."""
    note = ("Each goal is judged on its worst row. Correctness: " + correctness_line(doc) + ".")
    if doc["mode"] == "smoke":
        note = ("Smoke run on CPU: the goals are evaluated to test the code; the numbers are "
                "not evidence. " + note)
    return {"goals": [goal.judge(doc) for goal in GOALS], "note": note}
