"""Formatting shared by the suites, the report, the CLI and fastres.explain: numbers, tables,
and the bar chart the speedup panels use (matplotlib is imported by the caller that plots)."""
from __future__ import annotations

from typing import Optional, Sequence


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(str(r[i])) for r in cells]) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in cells]
    return "\n".join(lines)


def bar_chart(ax, rows, value: str, title: str, reference_line: Optional[float] = None,
              log: bool = False) -> None:
    """Horizontal bars of row[value], grouped by task, one colour per impl."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    height = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, task in enumerate(tasks):
            for r in rows:
                if r["task"] == task and r["impl"] == impl and r.get(value) is not None:
                    ys.append(i + (j - (len(impls) - 1) / 2) * height)
                    xs.append(r[value])
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=7)
    ax.invert_yaxis()
    if reference_line is not None:
        ax.axvline(reference_line, color="black", linewidth=0.8, linestyle="--")
    if log:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
