"""What the suites need around the one timer (fastres/timing.py): input rotation, cache
sizes, peak memory and the memory roofline.

Candidates that read inputs cycle through several copies of them when one copy
fits in the last-level cache (`rotation_count` / `Rotating`), so a benchmark does
not report cache bandwidth as memory bandwidth.
"""
from __future__ import annotations

import glob
import math
import os
import platform
from typing import Callable, Dict, Optional, Sequence

import torch

from ..timing import TIMING, Stats, TimingConfig, measure, synchronize  # noqa: F401 (the suites' timer)


# --------------------------------------------------------------------------- inputs and memory


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache in front of `device`'s memory (an estimate on CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or 32 * 2**20


def rotation_count(bytes_per_set: int, device: torch.device, max_sets: int = 16,
                   max_bytes: int = 2**30) -> int:
    """How many copies of an input set to cycle through so they do not all sit in cache."""
    cache = cache_bytes(device)
    if bytes_per_set >= cache:
        return 1
    wanted = math.ceil(2 * cache / max(bytes_per_set, 1))
    return max(1, min(wanted, max_sets, max_bytes // max(bytes_per_set, 1)))


class Rotating:
    """Cycles through prepared input sets: each call returns the next one."""

    def __init__(self, sets: Sequence[object]):
        self.sets, self.index = list(sets), 0

    def __call__(self):
        item = self.sets[self.index]
        self.index = (self.index + 1) % len(self.sets)
        return item

    def __len__(self) -> int:
        return len(self.sets)


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[Dict[str, int]]:
    """Peak CUDA memory of one call: absolute, and above what was allocated before it.

    None on CPU: the caching allocator statistics exist only for CUDA, and tracemalloc
    does not see torch's allocations, so any CPU number would be wrong.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_above_start_bytes": peak - before}


# glibc's malloc serves a request above its mmap threshold with a fresh mapping, and gives
# the top of its heap back to the system whenever more than its trim threshold (twice the
# mmap threshold) lies free there. The mmap threshold starts at 128 KiB and rises to the
# size of the largest mapped chunk freed so far, up to 32 MiB. So until a process has freed
# one large tensor, a call that allocates and frees a few MiB of intermediates faults their
# pages in afresh every time, and a candidate's time depended on whether an earlier suite
# had freed such a tensor (benchmarks/NOTES.md, ninth session). Every suite now starts from
# the state of a process that has freed one: the usual state of a training or serving
# process after its first steps.
SETTLE_BYTES = 32 * 2**20 - 2**12   # (just under the cap, so the threshold takes its size)


def settle_allocator() -> Dict[str, object]:
    """Allocate and free one SETTLE_BYTES tensor, raising glibc's mmap and trim thresholds
    to their cap (a no-op elsewhere); return what the results record about the allocator:
    the C library, the bytes freed, and the environment that changes malloc."""
    libc = " ".join(platform.libc_ver()).strip() or None
    block = torch.empty(SETTLE_BYTES, dtype=torch.uint8)
    del block   # (freeing the mapped chunk is what raises the thresholds)
    return {"libc": libc, "settled_bytes": SETTLE_BYTES,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted), the memory roofline.

    The buffer defaults to 4x the last-level cache (at least 64 MiB) so the copy streams
    through memory.
    """
    if nbytes is None:
        nbytes = max(64 * 2**20, 4 * cache_bytes(device))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = measure({"copy": lambda: dst.copy_(src)}, device,
                    TimingConfig(min_rounds=5, max_rounds=10, max_time_s=0.3, min_block_s=0.0,
                                 warmup_s=0.0))["copy"]
    if isinstance(stats, Exception):
        raise stats
    return 2 * nbytes / stats.median_s
