"""The one record of a choice: what runs, why, and how that was found out; and the log of
the choices made, which `fastres.explain` reads.

Both levels that choose (an op call, fastres/dispatch/op.py; the outermost fused module,
fastres/dispatch/module.py) return a Choice; the cache stores Choices; `fastres.explain` and
`fastres dispatch` print them. A measured Choice carries its provenance (the device, thread
count, software versions, when, the machine's load) and whether it is final: a choice
measured on a busy machine, or won by less than the timing noise, is used by this process
only and measured again by the next one, so a noisy moment cannot decide for good.

Inside `recording()` every choice made on the thread is logged as (where, call, choice):
where is the module that chose (the outermost fused module, for a module-level choice) or
the stage's conv (set_stage), call the op's Call or None for a module-level choice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import typing
from typing import Dict, Iterator, List, Optional

import torch

from .. import machine
from ..backends import Call

# A machine whose one-minute load average exceeds this many runnable threads per core is busy:
# a choice timed there is not stored for later processes. The measuring process itself adds
# up to its thread count (one per core by default), so a quiet machine reads about 1.
BUSY_LOAD_PER_CORE = 1.5

# Where a choice came from.
MEASURED, CACHED, STATIC, FORCED, RULE = "measured", "cached", "static", "forced", "rule"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs for one call signature (op level) or one module input (module level).

    level: "op" or "module". name: the backend (op level) or policy (module level) that
    runs. reason: why, in words. times_s: median seconds per call of every candidate timed;
    spread: the noise of the decision, the interquartile spread (relative) of the round-by-
    round time ratio of the two that decided (the fastest other candidate over the
    baseline); ratio: the median of that round-by-round ratio, what the margin is judged
    against (0.0 where nothing was compared); margin: how much
    faster than the baseline another candidate had to be; excluded: candidates left out,
    and why (a failed correctness probe, an error). source: MEASURED, CACHED, STATIC,
    FORCED or RULE. final: stored for later processes (see the module docstring).
    """

    level: str
    name: str
    reason: str
    source: str = RULE
    times_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    spread: float = 0.0
    margin: float = 0.0
    baseline: str = ""
    excluded: Dict[str, str] = dataclasses.field(default_factory=dict)
    provenance: Dict[str, object] = dataclasses.field(default_factory=dict)
    final: bool = True
    ratio: float = 0.0

    def why(self) -> str:
        """The reason with the times, as `fastres explain` and `fastres dispatch` print it."""
        if not self.times_s:
            return self.reason
        ranked = sorted(self.times_s, key=self.times_s.get)
        rival = self.name if self.name != self.baseline else ranked[0]
        verdict = f"{self.name} was fastest"
        if rival != self.baseline and self.baseline in self.times_s:
            # (the saving the margin was judged by: the paired rounds' ratio, else the medians')
            saving = 1 - (self.ratio or self.times_s[rival] / self.times_s[self.baseline])
            verdict = (f"{rival} took {abs(saving):.0%} {'less' if saving >= 0 else 'more'} "
                       f"time than {self.baseline}")
            if rival == self.name:
                verdict += f" (needed {self.margin:.0%})"
            elif saving < self.margin:
                verdict += (f", short of the {self.margin:.0%} a fused path must save, so "
                            f"{self.baseline} runs")
            else:
                verdict += (f", but samples spread {self.spread:.0%}: too close to call, so "
                            f"{self.baseline} runs")
        parts = [", ".join(f"{n} {_fmt(self.times_s[n])}" for n in ranked) + "; " + verdict]
        if self.excluded:
            parts.append("left out: " + "; ".join(f"{k}: {v}" for k, v in self.excluded.items()))
        if not self.final:
            parts.append("not stored: " + str(self.provenance.get("not_final", "provisional")))
        when = self.provenance.get("measured_utc")
        return (f"{self.source} {when}" if when else self.source) + ": " + "; ".join(parts)

    @classmethod
    def from_json(cls, doc: object) -> "Choice":
        """A Choice from a stored entry: TypeError for anything but an object of Choice's
        fields (the constructor's own check), ValueError for a field of the wrong type."""
        choice = cls(**doc)
        for key, value in doc.items():
            if not isinstance(value, _FIELD_TYPES[key]) or (
                    key == "times_s" and not all(isinstance(t, (int, float))
                                                 for t in value.values())):
                raise ValueError(f"{key} of a stored choice is {value!r:.40}")
        return dataclasses.replace(choice, source=CACHED)


# Each field's JSON type, read off its annotation (a float field also takes a JSON integer).
_FIELD_TYPES = {name: (int, float) if hint is float else typing.get_origin(hint) or hint
                for name, hint in typing.get_type_hints(Choice).items()}


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def provenance(device: str) -> Dict[str, object]:
    """Where and when a measurement is taken."""
    load = machine.load_per_core()
    return {"device": machine.device_name(device), "threads": torch.get_num_threads(),
            "versions": machine.versions(), "measured_utc": machine.utc_now(),
            "load_per_core": None if load is None else round(load, 2)}


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
