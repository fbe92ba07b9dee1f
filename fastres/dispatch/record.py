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

_log = threading.local()


def recording_active() -> bool:
    return getattr(_log, "entries", None) is not None


def record(where, call: Optional[Call], choice: Choice) -> None:
    entries = getattr(_log, "entries", None)
    if entries is not None:
        entries.append((where if where is not None else getattr(_log, "stage", None),
                        call, choice))


def set_stage(stage) -> None:
    """Name the stage (the caller's conv module) the next op choices belong to."""
    _log.stage = stage


@contextlib.contextmanager
def _scoped(**values) -> Iterator[None]:
    """Set attributes of this thread's record for the block."""
    previous = {name: getattr(_log, name, None) for name in values}
    _log.__dict__.update(values)
    try:
        yield
    finally:
        _log.__dict__.update(previous)


def paused():
    """Leave what runs inside the block (a measurement's runs) out of the record."""
    return _scoped(entries=None)


def module_measuring() -> bool:
    """Whether a module-level measurement is running on this thread."""
    return bool(getattr(_log, "measuring", False))


def measuring_module():
    return _scoped(measuring=True, entries=None)


@contextlib.contextmanager
def recording() -> Iterator[List]:
    entries: List = []
    with _scoped(entries=entries, stage=None):
        yield entries
