"""The one cache of choices: in memory for this process, and final choices on disk.

Memory holds every Choice this process made or read, by key (a call signature tuple, or a
module's key). Disk holds final Choices (choice.py) in one JSON file per device, thread
count and software versions, so another process reuses them instead of measuring again:

    FASTRES_DISPATCH_CACHE=0      keep choices in memory only
    FASTRES_DISPATCH_CACHE=DIR    where the files go (default: ~/.cache/fastres)

A file is read once per process. Anything wrong with it (not JSON, truncated, another
schema, entries of the wrong shape) is ignored with one warning: a cache can only save
measuring, never break a call. Writers merge: a process storing a choice locks the file,
re-reads it, adds its entry and replaces the file atomically, so processes that measure at
the same time keep each other's choices (POSIX file locks: fastres builds for Linux).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import os
import tempfile
import threading
import warnings
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from ..machine import device_name, versions
from .choice import Choice

SCHEMA = 4  # 3: op choices only, no provenance; 4: Choice records of both levels


def read_file(path: str) -> Tuple[Optional[dict], Dict[str, Choice], Optional[str]]:
    """(the document, None where it is not a cache this fastres reads; its valid entries;
    what was wrong with it, or None)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, {}, None
    except (OSError, ValueError) as exc:
        return None, {}, f"not readable as JSON ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        return None, {}, "not a fastres dispatch cache (no 'entries' object)"
    if doc.get("schema") != SCHEMA:
        return None, {}, f"schema {doc.get('schema')!r}, this fastres writes {SCHEMA}"
    entries = {}
    for key, entry in doc["entries"].items():
        with contextlib.suppress(TypeError, ValueError):
            entries[key] = Choice.from_json(entry)
    bad = len(doc["entries"]) - len(entries)
    return doc, entries, (f"{bad} malformed entries ignored" if bad else None)


class ChoiceCache:
    """memory: this process's choices by key (a call signature, or a module's text key),
    read with one dict lookup on the op's hot path; the files' final choices by text key,
    each file read at most once."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.memory: Dict[Hashable, Choice] = {}
        self._files: Dict[Optional[str], Dict[str, Choice]] = {}  # a file's entries, by path
        self._lock = threading.RLock()

    def file_for(self, device: str) -> Optional[str]:
        """The file of `device` for this thread count and these software versions."""
        if self.path is None:
            return None
        tag = hashlib.sha1(json.dumps([device_name(device), torch.get_num_threads(),
                                       versions()]).encode()).hexdigest()[:12]
        return os.path.join(self.path, f"dispatch-{device.split(':')[0]}-{tag}.json")

    def stored(self, text_key: str, device: str) -> Optional[Choice]:
        """A final choice an earlier process stored for `text_key`, or None."""
        path = self.file_for(device)
        with self._lock:
            if path not in self._files:
                _, self._files[path], problem = read_file(path) if path else (0, {}, 0)
                if problem:
                    warnings.warn(f"fastres: dispatch cache {path}: {problem}; the affected "
                                  "choices will be measured again", RuntimeWarning, stacklevel=4)
            return self._files[path].get(text_key)

    def store(self, text_key: str, device: str, choice: Choice) -> None:
        """Keep a final choice on disk, merged into the file under a lock and replaced
        atomically (a concurrent reader sees the old or the new file, whole); a provisional
        choice is not kept."""
        path = self.file_for(device)
        if not choice.final or path is None:
            return
        with self._lock, contextlib.suppress(OSError):  # (read-only: kept in this process)
            self.stored(text_key, device)
            self._files[path][text_key] = choice
            os.makedirs(self.path, exist_ok=True)
            with open(path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
                entries = read_file(path)[1]
                entries[text_key] = choice
                doc = {"schema": SCHEMA, "device": device_name(device),
                       "threads": torch.get_num_threads(), "versions": versions(),
                       "entries": {k: dataclasses.asdict(c) for k, c in sorted(entries.items())}}
                fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, indent=1)
                os.replace(tmp, path)

    def files(self, device_type: str) -> List[str]:
        if self.path is None:
            return []
        return sorted(glob.glob(os.path.join(self.path, f"dispatch-{device_type}-*.json")))


@functools.lru_cache(maxsize=None)
def cache() -> ChoiceCache:
    """The process's cache (FASTRES_DISPATCH_CACHE, read when it is first asked for)."""
    setting = os.environ.get("FASTRES_DISPATCH_CACHE")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return ChoiceCache(None if setting == "0" else setting or os.path.join(base, "fastres"))


def forget() -> None:
    """Drop every choice this process made or read; the cache setting is read again."""
    cache.cache_clear()
