"""What `fastres.explain` sees: every choice made on this thread inside `recording()`.

Each entry is (where, call, choice): where is the module that chose (the outermost fused
module, for a module-level choice) or the stage's conv (set_stage), call the op's Call or
None for a module-level choice.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional

from ..backends import Call
from .choice import Choice

_log = threading.local()  # .entries (None: nothing is recorded), .stage, .measuring


def recording_active() -> bool:
    return getattr(_log, "entries", None) is not None


def record(where, call, choice: Choice) -> None:
    """Add a choice to the record, where one is kept; call: a Call, its fields or None."""
    if getattr(_log, "entries", None) is not None:
        _log.entries.append((where if where is not None else getattr(_log, "stage", None),
                             Call(*call) if isinstance(call, tuple) else call, choice))


def set_stage(stage) -> None:
    """Name the stage (the caller's conv module) the next op choices belong to."""
    _log.stage = stage


@contextlib.contextmanager
def recording(keep: bool = True, measuring: bool = False) -> Iterator[Optional[List]]:
    """Record the choices made inside the block into the list it yields; keep=False leaves
    them out of any record (a measurement's runs); measuring: a module's measurement runs."""
    previous = (getattr(_log, "entries", None), getattr(_log, "stage", None),
                module_measuring())
    _log.entries, _log.stage, _log.measuring = [] if keep else None, None, measuring or previous[2]
    try:
        yield _log.entries
    finally:
        _log.entries, _log.stage, _log.measuring = previous


def module_measuring() -> bool:
    """Whether a module-level measurement is running on this thread."""
    return getattr(_log, "measuring", False)
