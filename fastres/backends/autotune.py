"""Dispatch by measurement: time the backends that can run a call, keep the fastest.

As `torch.backends.cudnn.benchmark` does for convolutions: the first call of each signature
(fastres.backends.Call: device, dtype, shapes, kernel, padding, norm mode, residual, whether
gradients are needed) runs every candidate a few times, interleaved, forward and backward
when gradients are needed, on private copies of its inputs; the winner runs every later call
with that signature. Eager PyTorch is always a candidate, and a fused backend must beat it
by a margin to be chosen, so measurement noise cannot make the default slower than PyTorch.

The choices persist in a JSON file per device and software versions (DispatchCache), so a
process does not measure again what an earlier one did. Environment:
    FASTRES_DISPATCH=static          never measure; use the static rule (backends.static_choice)
    FASTRES_DISPATCH_CACHE=0         keep choices in memory only
    FASTRES_DISPATCH_CACHE=DIR       where the files go (default: ~/.cache/fastres)
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from ..conventions import cpu_name

logger = logging.getLogger("fastres")

# How much faster than eager a fused backend must measure to be chosen: forward-only calls,
# and calls with a backward. Timed in isolation, a stage's cost leaves out part of what it
# costs inside a model (allocator and cache state, the other layers' threads); the margin
# absorbs that, larger for training, where it was larger: on a 2-core CPU a BasicBlock
# stage's C++ train step measured 6% faster than eager alone and made the block 15% slower.
MARGIN_FORWARD = 0.05
MARGIN_BACKWARD = 0.15
ROUNDS = 5                  # interleaved timing rounds per candidate
MIN_BLOCK_S = 2e-3          # a timed block lasts at least this long (clock resolution)
MAX_CALLS_PER_BLOCK = 64
SCHEMA = 3  # 2: candidates timed after an eager neighbour; 3: margins by mode


@dataclasses.dataclass
class Measurement:
    """Seconds per call of each candidate (median over rounds), and the winner."""

    backend: str
    times_s: Dict[str, float]
    measured_utc: str

    def reason(self) -> str:
        times = ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in
                          sorted(self.times_s.items(), key=lambda kv: kv[1]))
        return f"measured (each after an eager neighbour): {times}"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(candidates: List[str], make_run: Callable[[str], Callable[[], object]],
            device: str, with_backward: bool = False) -> Measurement:
    """Time every candidate's run (interleaved rounds); the fastest wins, by a margin over
    eager (MARGIN_FORWARD, or MARGIN_BACKWARD when the runs include a backward).

    make_run(name) returns a call doing one forward (+ backward) on private inputs. Each
    timed call follows a call of eager PyTorch on another copy of the inputs, as a stage in
    a model follows PyTorch's own layers: on a CPU, switching between oneDNN (PyTorch's
    convs) and the BLAS the C++ kernels use costs both sides tens of microseconds (measured:
    a oneDNN conv of 167 us takes 248 us when MKL GEMMs run between its calls), which a
    candidate timed back to back never shows. So a sample is the time of the pair, eager
    neighbour included, and the times reported are those pairs'. A candidate that raises is
    dropped, with a warning (eager never is: its error propagates).
    """
    neighbour = make_run("eager")
    runs: Dict[str, Callable[[], object]] = {}
    numbers: Dict[str, int] = {}
    for name in candidates:
        try:
            run = make_run(name)
            run()                       # warm-up: compilation, allocator, caches
            neighbour()
            _synchronize(device)
            start = time.perf_counter()
            neighbour()
            run()
            _synchronize(device)
            once = max(time.perf_counter() - start, 1e-7)
        except Exception as exc:        # noqa: BLE001 - a candidate that cannot run loses
            if name == "eager":
                raise
            logger.warning("fastres: backend %r failed while being measured and is not "
                           "used for this call signature: %s: %s", name, type(exc).__name__,
                           exc)
            continue
        runs[name] = run
        numbers[name] = max(1, min(MAX_CALLS_PER_BLOCK, int(MIN_BLOCK_S / once)))
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(ROUNDS):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(numbers[name]):
                neighbour()
                run()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / numbers[name])
    times = {name: statistics.median(s) for name, s in samples.items()}
    best = min(times, key=times.get)
    margin = MARGIN_BACKWARD if with_backward else MARGIN_FORWARD
    if best != "eager" and "eager" in times and times[best] > (1 - margin) * times["eager"]:
        best = "eager"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Measurement(best, times, stamp)


# ----------------------------------------------------------------------------- the cache


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} x{os.cpu_count()}, {torch.get_num_threads()} threads"


def _versions() -> Dict[str, Optional[str]]:
    from .._version import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"fastres": __version__, "torch": torch.__version__, "triton": triton_version}


class DispatchCache:
    """Measured choices by call signature, in memory and (optionally) in a JSON file per
    device name and software versions, so that another process reuses them."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()
        self.entries: Dict[str, Dict[str, object]] = {}
        self._loaded_files: Dict[str, bool] = {}

    def _file(self, device: str) -> Optional[str]:
        if self.path is None:
            return None
        name = _device_name(device)
        tag = hashlib.sha1(json.dumps([name, _versions()]).encode()).hexdigest()[:12]
        return os.path.join(self.path, f"dispatch-{device.split(':')[0]}-{tag}.json")

    def _load(self, device: str) -> None:
        path = self._file(device)
        if path is None or path in self._loaded_files:
            return
        self._loaded_files[path] = True
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return
        if doc.get("schema") == SCHEMA and doc.get("device") == _device_name(device) \
                and doc.get("versions") == _versions():
            self.entries.update(doc.get("entries", {}))

    def lookup(self, key: str, device: str) -> Optional[Dict[str, object]]:
        with self._lock:
            self._load(device)
            return self.entries.get(key)

    def store(self, key: str, device: str, measurement: Measurement) -> None:
        with self._lock:
            self._load(device)
            self.entries[key] = dataclasses.asdict(measurement)
            path = self._file(device)
            if path is None:
                return
            prefix = key.split("|", 1)[0] + "|"
            doc = {"schema": SCHEMA, "device": _device_name(device), "versions": _versions(),
                   "entries": {k: v for k, v in self.entries.items() if k.startswith(prefix)}}
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: a concurrent reader sees old or new, whole
            except OSError:
                pass  # a read-only home directory: the choice stays in memory

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self._loaded_files.clear()


def default_cache_path() -> Optional[str]:
    setting = os.environ.get("FASTRES_DISPATCH_CACHE")
    if setting == "0":
        return None
    if setting:
        return setting
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastres")


_FORCE_MEASURING = threading.local()


def measuring_enabled() -> bool:
    if getattr(_FORCE_MEASURING, "on", False):
        return True
    return os.environ.get("FASTRES_DISPATCH", "measure") != "static"


@contextlib.contextmanager
def measuring():
    """Measure new call signatures inside the block even where FASTRES_DISPATCH=static."""
    previous = getattr(_FORCE_MEASURING, "on", False)
    _FORCE_MEASURING.on = True
    try:
        yield
    finally:
        _FORCE_MEASURING.on = previous
