"""Lines of choosing code (issue 21): before the dispatch rebuild (b63d181) and at a revision.

    python benchmarks/choosing_lines.py            # b63d181 against the working tree
    python benchmarks/choosing_lines.py --at REV   # ... against commit REV

A line is a line of code: Python's tokenizer drops blank lines, comments and docstrings
(a string that is a statement of its own). Two counts:

- by file: every line of the files that held choosing code before the rebuild, against
  every line of the files that hold it now. It overstates both sides, more so after the
  rebuild: those files also hold what exists (backends/__init__.py's registry, which no
  longer chooses anything), the fused modules' base class (nn/_stage.py) and a whole-module
  kernel path (stream/whole_sequence.py).
- by unit: the top-level functions, classes and assignments that decide which backend runs,
  time candidates, keep, record or report choices, on both sides; a file where everything
  is choosing is counted whole. Timers count on both sides (before: the bench's, the
  dispatcher's and the Triton tile tuner's; now: the one in fastres/timing.py).

Which units count is written out below, so the attribution can be argued with line by line.
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import tokenize
from typing import Dict, List, Optional, Sequence, Tuple

BEFORE = "b63d181"
ALL = None  # every line of the file

# path -> the top-level names that choose (ALL: the whole file).
BEFORE_UNITS: Dict[str, Optional[Sequence[str]]] = {
    "fastres/backends/__init__.py": (
        "_PREFERENCE", "_forced", "_recording", "use_backend", "forced_backend", "Decision",
        "CPP_MIN_LENGTH", "static_choice", "candidates", "_CACHE", "_DECIDED", "dispatch_cache",
        "forget_decisions", "choose", "choose_signature", "_decide", "_recorded",
        "is_recording", "record", "set_recording_stage", "not_recording", "recording",
        "describe_default", "static_rule_in_words"),
    "fastres/backends/autotune.py": ALL,
    "fastres/nn/policy.py": ALL,
    "fastres/tuning.py": ALL,
    "fastres/backends/triton/tuning.py": ALL,
    "fastres/nn/_stage.py": ("_PLAIN", "_PLANNED_DEVICES", "_PLANS", "_hooked",
                             "conv_bn_relu_stage"),
    "fastres/stream.py": ("WHOLE_SEQUENCE_MAX_BATCH", "WHOLE_SEQUENCE_MAX_STEPS",
                          "WHOLE_SEQUENCE_MIN_GAIN", "whole_sequence", "_may_run_stacked",
                          "_stacked_is_faster"),
    "fastres/bench/timing.py": ("TimingConfig", "Stats", "synchronize", "_BlockTimer",
                                "_timed_call", "measure"),
}
AFTER_UNITS: Dict[str, Optional[Sequence[str]]] = {
    "fastres/dispatch/": ALL,  # every file of the package
    "fastres/tuning.py": ALL,
    "fastres/backends/triton/tuning.py": ALL,
    "fastres/nn/_stage.py": ("_PLAIN", "_PLANNED_DEVICES", "_PLANS", "conv_bn_relu_stage"),
    "fastres/stream/whole_sequence.py": ("WHOLE_SEQUENCE_MAX_BATCH", "WHOLE_SEQUENCE_MAX_STEPS",
                                         "whole_sequence", "_may_run_stacked",
                                         "StackProgram"),
    # The same units as the bench's timer before (its presets and imports not counted).
    "fastres/timing.py": ("TimingConfig", "Stats", "synchronize", "_time_block", "measure"),
}
# The files the by-file count reads (the before side's: as its note in NOTES.md had them).
BEFORE_FILES = ("fastres/backends/__init__.py", "fastres/backends/autotune.py",
                "fastres/nn/policy.py", "fastres/tuning.py", "fastres/backends/triton/tuning.py",
                "fastres/nn/_stage.py", "fastres/stream.py@WHOLE_SEQUENCE_MAX_BATCH =")
AFTER_FILES = ("fastres/dispatch/", "fastres/backends/__init__.py", "fastres/tuning.py",
               "fastres/backends/triton/tuning.py", "fastres/nn/_stage.py",
               "fastres/stream/whole_sequence.py")


def code_lines(text: str) -> set:
    """The numbers of the lines that hold code (not blank, comment or docstring)."""
    lines, previous = set(), None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER):
            if tok.type not in (tokenize.NL, tokenize.COMMENT):
                previous = tok
            continue
        statement_start = previous is None or previous.type in (
            tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        previous = tok
        if tok.type == tokenize.STRING and statement_start:
            continue  # a docstring, or a string standing as a statement
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _show(rev: Optional[str], path: str) -> str:
    if rev is None:
        with open(path) as f:
            return f.read()
    return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _files(rev: Optional[str], path: str) -> List[str]:
    if not path.endswith("/"):
        return [path]
    cmd = ["git", "ls-files", path] if rev is None else ["git", "ls-tree", "--name-only", rev,
                                                        path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    # (the working tree: files deleted but not yet committed are gone)
    return sorted(p for p in out if p.endswith(".py") and (rev is not None or os.path.exists(p)))


def _unit_names(node: ast.stmt) -> List[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def count_units(text: str, units: Optional[Sequence[str]]) -> Tuple[int, List[str]]:
    """(code lines of the named top-level units, or of the whole file; names not found)."""
    lines = code_lines(text)
    if units is None:
        return len(lines), []
    wanted, found, total = set(units), set(), 0
    for node in ast.parse(text).body:
        names = wanted.intersection(_unit_names(node))
        if names:
            found |= names
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            total += len([n for n in lines if start <= n <= node.end_lineno])
    return total, sorted(wanted - found)


def by_unit(rev: Optional[str], spec: Dict[str, Optional[Sequence[str]]]) -> List[Tuple[str, int]]:
    rows = []
    for path, units in spec.items():
        for name in _files(rev, path):
            n, missing = count_units(_show(rev, name), units)
            if missing:
                raise SystemExit(f"{name} at {rev or 'the working tree'}: no unit {missing}")
            rows.append((name, n))
    return rows


def by_file(rev: Optional[str], paths: Sequence[str]) -> List[Tuple[str, int]]:
    rows = []
    for entry in paths:
        path, _, marker = entry.partition("@")
        for name in _files(rev, path):
            text = _show(rev, name)
            if marker:
                text = text[text.index(marker):]
            rows.append((entry if marker else name, len(code_lines(text))))
    return rows


def _table(title: str, rows: List[Tuple[str, int]]) -> int:
    print(f"{title}")
    for name, n in rows:
        print(f"  {n:5d}  {name}")
    total = sum(n for _, n in rows)
    print(f"  {total:5d}  total")
    return total


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--at", default=None, help="a revision (default: the working tree)")
    args = parser.parse_args(argv)
    now = args.at or "working tree"
    b = _table(f"by unit, {BEFORE}", by_unit(BEFORE, BEFORE_UNITS))
    a = _table(f"by unit, {now}", by_unit(args.at, AFTER_UNITS))
    bf = _table(f"by file, {BEFORE}", by_file(BEFORE, BEFORE_FILES))
    af = _table(f"by file, {now}", by_file(args.at, AFTER_FILES))
    print(f"\nby unit: {b} -> {a} ({a - b:+d}); by file: {bf} -> {af} ({af - bf:+d})")


if __name__ == "__main__":
    main()
