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
the same time keep each other's choices.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import threading
import warnings
from typing import Dict, Hashable, Iterator, List, Optional, Tuple

import torch

from .choice import Choice, device_name, versions

SCHEMA = 4  # 3: op choices only, no provenance; 4: Choice records of both levels


def default_path() -> Optional[str]:
    setting = os.environ.get("FASTRES_DISPATCH_CACHE")
    if setting == "0":
        return None
    if setting:
        return setting
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastres")


def read_file(path: str) -> Tuple[Optional[dict], Dict[str, Choice], Optional[str]]:
    """(the document's header, its valid entries, what was wrong with it or None)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        return None, {}, f"cannot read it: {exc}"
    except ValueError as exc:
        return None, {}, f"not valid JSON ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        return None, {}, "not a fastres dispatch cache (no 'entries' object)"
    if doc.get("schema") != SCHEMA:
        return None, {}, f"schema {doc.get('schema')!r}, this fastres writes {SCHEMA}"
    entries, bad = {}, 0
    for key, entry in doc["entries"].items():
        try:
            entries[key] = Choice.from_json(entry)
        except (TypeError, ValueError):
            bad += 1
    header = {k: v for k, v in doc.items() if k != "entries"}
    return header, entries, (f"{bad} malformed entries ignored" if bad else None)


class ChoiceCache:
    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()
        self.memory: Dict[Hashable, Choice] = {}
        self._disk: Dict[str, Choice] = {}
        self._read: set = set()

    def file_for(self, device: str) -> Optional[str]:
        """The file of `device` for this thread count and these software versions."""
        if self.path is None:
            return None
        tag = hashlib.sha1(json.dumps([device_name(device), torch.get_num_threads(),
                                       versions()]).encode()).hexdigest()[:12]
        return os.path.join(self.path, f"dispatch-{device.split(':')[0]}-{tag}.json")

    def _load(self, device: str) -> None:
        path = self.file_for(device)
        if path is None or path in self._read:
            return
        self._read.add(path)
        if not os.path.exists(path):
            return
        _, entries, problem = read_file(path)
        if problem is not None:
            warnings.warn(f"fastres: dispatch cache {path}: {problem}; "
                          "the affected choices will be measured again", RuntimeWarning,
                          stacklevel=4)
        self._disk.update(entries)

    def get(self, key: Hashable) -> Optional[Choice]:
        """This process's choice for `key` (one dict lookup: the op's hot path)."""
        return self.memory.get(key)

    def remember(self, key: Hashable, choice: Choice) -> Choice:
        self.memory[key] = choice
        return choice

    def stored(self, text_key: str, device: str) -> Optional[Choice]:
        """A final choice an earlier process stored for `text_key`, or None."""
        with self._lock:
            self._load(device)
            return self._disk.get(text_key)

    def store(self, text_key: str, device: str, choice: Choice) -> None:
        """Keep a final choice on disk (merged into the file; a provisional one is not kept)."""
        if not choice.final:
            return
        with self._lock:
            self._load(device)
            self._disk[text_key] = choice
            path = self.file_for(device)
            if path is None:
                return
            try:
                os.makedirs(self.path, exist_ok=True)
                with _locked(path):
                    _, entries, _ = read_file(path) if os.path.exists(path) else (None, {}, None)
                    entries[text_key] = choice
                    doc = {"schema": SCHEMA, "device": device_name(device),
                           "threads": torch.get_num_threads(), "versions": versions(),
                           "entries": {k: c.to_json() for k, c in sorted(entries.items())}}
                    fd, tmp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
                    with os.fdopen(fd, "w") as f:
                        json.dump(doc, f, indent=1)
                    os.replace(tmp, path)  # a concurrent reader sees the old or new file, whole
            except OSError:
                pass  # a read-only cache folder: the choice stays in this process

    def forget(self) -> None:
        with self._lock:
            self.memory.clear()
            self._disk.clear()
            self._read.clear()

    def files(self, device_type: str) -> List[str]:
        if self.path is None:
            return []
        return sorted(glob.glob(os.path.join(self.path, f"dispatch-{device_type}-*.json")))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on path + '.lock' (POSIX advisory locks; elsewhere, none)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace still keeps the file whole
        yield
        return
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_CACHE: Optional[ChoiceCache] = None


def cache() -> ChoiceCache:
    """The process's cache (FASTRES_DISPATCH_CACHE, read when it is first asked for)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = ChoiceCache(default_path())
    return _CACHE


def forget() -> None:
    """Drop every choice this process made or read; the cache setting is read again."""
    global _CACHE
    _CACHE = None
