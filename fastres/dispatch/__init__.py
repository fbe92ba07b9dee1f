"""Which backend runs: everything that decides, in one package (what exists is
fastres/backends/).

Two levels decide, and nothing else does:
- the op level (op.py): which backend runs one call of fastres.conv_bn_relu;
- the module level (module.py): how the outermost fused module of a call runs its stages
  (plain, each stage its own choice, all on one backend, or a whole-module path such as
  TemporalConvNet's stacked kernel).
Both return a Choice (choice.py), time with the one timer (fastres/timing.py) by one rule
(measure.py), keep choices in one cache (cache.py), probe candidates for correctness
before timing them (op.py), and never measure where that is unsafe (measure.py).
`fastres.explain` reads the log of what they chose (choice.py).
"""
from . import choice, measure, module, op
from .cache import cache, forget
from .choice import Choice, recording
from .measure import MARGIN_BACKWARD, MARGIN_FORWARD, why_not_measure
from .op import (CPP_MIN_LENGTH, candidates, describe_default, forced_backend, static_choice,
                 trace_time_choice, use_backend)

__all__ = ["CPP_MIN_LENGTH", "Choice", "MARGIN_BACKWARD", "MARGIN_FORWARD", "cache", "candidates",
           "choice", "describe_default", "forced_backend", "forget", "measure", "module", "op",
           "recording", "static_choice", "trace_time_choice", "use_backend", "why_not_measure"]
