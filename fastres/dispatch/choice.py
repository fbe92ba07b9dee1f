"""The one record of a choice: what runs, why, and how that was found out.

Both levels that choose (an op call, fastres/dispatch/op.py; the outermost fused module,
fastres/dispatch/module.py) return a Choice; the cache stores Choices; `fastres.explain` and
`fastres dispatch` print them. A measured Choice carries its provenance (the device, thread
count, software versions, when, the machine's load) and whether it is final: a choice
measured on a busy machine, or won by less than the timing noise, is used by this process
only and measured again by the next one, so a noisy moment cannot decide for good.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from .. import machine

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
        base, fastest = self.times_s.get(self.baseline), ranked[0]
        # (the saving the margin was judged by: the paired rounds' ratio, else the medians')
        rival = self.name if self.name != self.baseline else fastest
        saving = 1 - (self.ratio or (self.times_s[rival] / base if base else 1.0))
        verdict = f"{self.name} was fastest"
        if base and self.name != self.baseline:
            verdict = (f"{self.name} took {saving:.0%} less time than {self.baseline} "
                       f"(needed {self.margin:.0%})")
        elif base and fastest != self.baseline:
            short = (f"short of the {self.margin:.0%} a fused path must save"
                     if saving < self.margin else
                     f"but samples spread {self.spread:.0%}: too close to call")
            verdict = (f"{fastest} took {saving:.0%} less time than {self.baseline}, {short}, "
                       f"so {self.baseline} runs")
        parts = [", ".join(f"{n} {_fmt(self.times_s[n])}" for n in ranked) + "; " + verdict]
        if self.excluded:
            parts.append("left out: " + "; ".join(f"{k}: {v}" for k, v in self.excluded.items()))
        if not self.final:
            parts.append("not stored: " + str(self.provenance.get("not_final", "provisional")))
        when = self.provenance.get("measured_utc")
        return (f"{self.source} {when}" if when else self.source) + ": " + "; ".join(parts)

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: object) -> "Choice":
        """A Choice from a stored entry; ValueError for anything of the wrong shape."""
        if not isinstance(doc, dict) or not set(doc) <= set(_FIELD_TYPES) \
                or not {"level", "name", "reason"} <= set(doc):
            raise ValueError(f"not a stored choice: {doc!r:.80}")
        for key, value in doc.items():
            if not isinstance(value, _FIELD_TYPES[key]) or (
                    key == "times_s" and not all(isinstance(t, (int, float))
                                                 for t in value.values())):
                raise ValueError(f"{key} of a stored choice is {value!r:.40}")
        return dataclasses.replace(cls(**doc), source=CACHED)


_FIELD_TYPES = dict(level=str, name=str, reason=str, source=str, times_s=dict, spread=(int, float), ratio=(int, float),
                    margin=(int, float), baseline=str, excluded=dict, provenance=dict, final=bool)


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def provenance(device: str) -> Dict[str, object]:
    """Where and when a measurement is taken."""
    load = machine.load_per_core()
    return {"device": machine.device_name(device), "threads": torch.get_num_threads(),
            "versions": machine.versions(), "measured_utc": machine.utc_now(),
            "load_per_core": None if load is None else round(load, 2)}
