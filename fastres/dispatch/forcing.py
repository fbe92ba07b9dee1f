"""Forcing a backend: `fastres.use_backend(name)` for a block of code, or FASTRES_BACKEND."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

from .. import backends

_forced = threading.local()


@contextlib.contextmanager
def use_backend(name: str, reason: str = "forced") -> Iterator[None]:
    """Run fastres ops called inside the block (on this thread) on backend `name`.

    Raises at once if the backend cannot run on this machine. The backward of a call made
    inside the block runs on the same backend, wherever autograd runs it. `reason` is what
    fastres.explain reports for the calls.
    """
    unavailable = backends.unavailable_reason(name)
    if unavailable is not None:
        raise RuntimeError(f"fastres backend {name!r} is not available: {unavailable}")
    previous = getattr(_forced, "name", None), getattr(_forced, "reason", None)
    _forced.name, _forced.reason = name, reason
    try:
        yield
    finally:
        _forced.name, _forced.reason = previous


def forced_backend() -> Optional[str]:
    """The backend use_backend() or, failing that, FASTRES_BACKEND forces; None if none."""
    forced = getattr(_forced, "name", None)
    if forced is None and os.environ.get("FASTRES_BACKEND"):
        forced = os.environ["FASTRES_BACKEND"]
        reason = backends.unavailable_reason(forced)
        if reason is not None:
            raise RuntimeError(f"FASTRES_BACKEND={forced!r} is not available: {reason}")
    return forced


def forced_reason() -> str:
    return getattr(_forced, "reason", None) or "forced"
