"""Section records and the writer that puts them on disk after every section.

A run writes <out>/<prefix>.json and <prefix>.md again after each section (and from inside
long sections, at most every few seconds), replacing the files atomically, so a run that is
cut off still leaves everything it measured; the PNG comes once at the end.

JSON layout (SCHEMA):
    schema, mode ("gpu" or "smoke"), command, created_utc, updated_utc, wall_s
    device {type, name, slug}, versions {...}, commit, build {...}, deadline {...}
    sections {key: Section.to_json()}   every section from the start, status "pending"
    summary {goals: [...], note}        once the sections are done
    files {json, markdown, png}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from typing import Dict, List, Optional

import torch

from fastres.machine import utc_now
from fastres.bench.formatting import markdown_table

SCHEMA = "fastres-gpu-evidence/1"

# What a section's status can be, in the JSON and the markdown. "failed": the section ran,
# and what it checks failed (a parity row over its bound, a timing that raised); "error":
# the section itself broke (an exception, its process killed by a fault or its timeout).
PENDING, RUNNING, OK, PARTIAL, SKIPPED, UNAVAILABLE, FAILED, ERROR = (
    "pending", "running", "ok", "partial", "skipped", "unavailable", "failed", "error")
FINAL_STATUSES = (OK, PARTIAL, SKIPPED, UNAVAILABLE, FAILED, ERROR)
# Worst first: the status of a section run as several processes (shards) is their worst.
SEVERITY = (ERROR, FAILED, PARTIAL, UNAVAILABLE, SKIPPED, OK, RUNNING, PENDING)


class SectionSkipped(Exception):
    """The whole section cannot run here (no GPU, no time); the message says why."""


class SectionUnavailable(Exception):
    """What the section measures does not exist in this build (e.g. fastres.stream)."""


@dataclasses.dataclass
class Table:
    """A table for the markdown: cells are strings, one list per row."""

    title: str
    headers: List[str]
    rows: List[List[str]] = dataclasses.field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])


@dataclasses.dataclass
class Section:
    """What one section did: machine-readable data, tables for people, and its status."""

    key: str
    title: str
    nominal_s: float
    status: str = PENDING
    reason: Optional[str] = None          # why skipped / unavailable / partial
    budget_s: Optional[float] = None      # the time it was given
    wall_s: Optional[float] = None        # the time it took
    error: Optional[Dict[str, str]] = None
    data: Dict[str, object] = dataclasses.field(default_factory=dict)
    tables: List[Table] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    skipped: List[Dict[str, str]] = dataclasses.field(default_factory=list)

    def table(self, title: str, headers: List[str]) -> Table:
        table = Table(title, list(headers))
        self.tables.append(table)
        return table

    def skip(self, what: str, why: str) -> None:
        """Record one item of the section that did not run, and why."""
        self.skipped.append({"what": what, "why": why})

    def record_error(self, exc: BaseException) -> None:
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.status = ERROR
        self.error = {"type": type(exc).__name__, "message": str(exc),
                      "traceback_tail": tail[-3000:]}

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Dict[str, object]) -> "Section":
        """The inverse of to_json (a section's record written by its own process)."""
        fields = dict(record)
        fields["tables"] = [Table(**t) for t in fields.get("tables", [])]
        return cls(**fields)


def merge_sections(parts: List[Section]) -> Section:
    """One section from the records of its shards (processes that each ran a share of its
    items): lists in `data` and table rows concatenated in shard order, other data values
    from the first shard that has them, the worst status, the first error."""
    first = parts[0]
    merged = Section(first.key, first.title, first.nominal_s, budget_s=first.budget_s)
    tables: Dict[str, Table] = {}
    for part in parts:
        for key, value in part.data.items():
            if isinstance(value, list):
                merged.data.setdefault(key, []).extend(value)
            else:
                merged.data.setdefault(key, value)
        for table in part.tables:
            if table.title not in tables:
                tables[table.title] = merged.table(table.title, table.headers)
            tables[table.title].rows.extend(table.rows)
        merged.notes += [n for n in part.notes if n not in merged.notes]
        merged.skipped += part.skipped
        if part.error and merged.error is None:
            merged.error = part.error
    merged.status = min((p.status for p in parts), key=SEVERITY.index)
    if merged.status == PARTIAL:
        merged.reason = f"{len(merged.skipped)} item(s) not run, listed below"
    else:
        reasons = [p.reason for p in parts if p.reason and p.status == merged.status]
        merged.reason = "; ".join(dict.fromkeys(reasons)) or None
    walls = [p.wall_s for p in parts if p.wall_s is not None]
    merged.wall_s = max(walls) if walls else None
    return merged


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line for a table cell: the exception's type and the start of its message."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"[:limit]


# --------------------------------------------------------------------------- the writer


class EvidenceWriter:
    """Owns the results document; rewrites <prefix>.json and .md on every flush."""

    def __init__(self, out_dir: str, prefix: str, document: Dict[str, object],
                 sections: List[Section], min_interval_s: float = 5.0):
        os.makedirs(out_dir, exist_ok=True)
        self.paths = {"json": os.path.join(out_dir, prefix + ".json"),
                      "markdown": os.path.join(out_dir, prefix + ".md"),
                      "png": os.path.join(out_dir, prefix + ".png")}
        self.document = dict(document, schema=SCHEMA, created_utc=utc_now(), summary=None,
                             files={k: os.path.basename(v) for k, v in self.paths.items()})
        self.sections = sections
        self.started = time.perf_counter()
        self.min_interval_s = min_interval_s
        self._last_flush = -math.inf

    def snapshot(self) -> Dict[str, object]:
        doc = dict(self.document, updated_utc=utc_now(),
                   wall_s=time.perf_counter() - self.started)
        doc["sections"] = {s.key: s.to_json() for s in self.sections}
        return doc

    def flush(self, force: bool = True) -> None:
        """Write both files now (force) or only if the last write is a while ago."""
        if not force and time.perf_counter() - self._last_flush < self.min_interval_s:
            return
        doc = self.snapshot()
        _atomic_write(self.paths["json"], json.dumps(_finite(doc), indent=1, default=_default,
                                                     allow_nan=False) + "\n")
        _atomic_write(self.paths["markdown"], render_markdown(doc))
        self._last_flush = time.perf_counter()


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _finite(value):
    """inf / NaN -> None (strict JSON has neither); tuples -> lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return repr(value)


# --------------------------------------------------------------------------- markdown


def _status_line(section: Dict[str, object]) -> str:
    parts = [f"**{section['status']}**"]
    if section.get("wall_s") is not None:
        budget = section.get("budget_s")
        parts.append(f"{section['wall_s']:.1f} s" + (f" of a {budget:.0f} s budget"
                                                      if budget is not None else ""))
    if section.get("reason"):
        parts.append(section["reason"])
    return " - ".join(parts)


def render_markdown(doc: Dict[str, object]) -> str:
    device, versions = doc["device"], doc.get("versions", {})
    out = [f"# fastres GPU evidence: {device['name']}", ""]
    if doc["mode"] == "smoke":
        out += ["**Smoke run on CPU: tiny shapes, Triton in its interpreter. These numbers "
                "test the script, they are not evidence about any GPU.**", ""]
    out.append(f"- command: `{doc['command']}`")
    out.append(f"- created {doc['created_utc']}, updated {doc['updated_utc']}, "
               f"wall time {doc['wall_s']:.1f} s")
    out.append(f"- commit {doc['commit']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    build = doc.get("build") or {}
    if build:
        out.append(f"- extension build: {build.get('summary', build)}")
    out.append("")
    summary = doc.get("summary")
    if doc.get("summary_error"):
        out += [f"**No goals summary: {doc['summary_error']}**", ""]
    if summary:
        out += ["## Goals", ""]
        if summary.get("note"):
            out += [summary["note"], ""]
        out.append(markdown_table(
            ["goal", "measured", "target", "result", "evidence"],
            [[g["goal"], g["measured_text"], g["target_text"], g["status"], g["evidence"]]
             for g in summary["goals"]]))
        out.append("")
    for section in doc["sections"].values():
        out += [f"## {section['title']}", "", _status_line(section), ""]
        for note in section["notes"]:
            out.append(f"- {note}")
        if section["notes"]:
            out.append("")
        for table in section["tables"]:
            if not table["rows"]:
                continue
            if table["title"]:
                out += [f"**{table['title']}**", ""]
            out += [markdown_table(table["headers"], table["rows"]), ""]
        if section["skipped"]:
            out.append("Not run:")
            out += [f"- {s['what']}: {s['why']}" for s in section["skipped"]]
            out.append("")
        if section.get("error"):
            err = section["error"]
            out += [f"Error: `{err['type']}: {err['message'][:500]}`", "", "```",
                    err["traceback_tail"].rstrip()[-1500:], "```", ""]
    return "\n".join(out) + "\n"
