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
def paused() -> Iterator[None]:
    """Leave what runs inside the block (a measurement's runs) out of the record."""
    previous = getattr(_log, "entries", None)
    _log.entries = None
    try:
        yield
    finally:
        _log.entries = previous


def module_measuring() -> bool:
    """Whether a module-level measurement is running on this thread."""
    return getattr(_log, "measuring", False)


@contextlib.contextmanager
def measuring_module() -> Iterator[None]:
    previous = getattr(_log, "measuring", False)
    _log.measuring = True
    try:
        with paused():
            yield
    finally:
        _log.measuring = previous


@contextlib.contextmanager
def recording() -> Iterator[List]:
    previous = getattr(_log, "entries", None), getattr(_log, "stage", None)
    _log.entries, _log.stage = [], None
    try:
        yield _log.entries
    finally:
        _log.entries, _log.stage = previous
