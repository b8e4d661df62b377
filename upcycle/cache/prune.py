"""Removing what is no longer wanted: which entries go, and removing one safely (under its builder's lock, never
while a process reads it, renamed aside before its bytes are deleted, links never followed)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

from filelock import FileLock, Timeout

from upcycle.assets import users
from upcycle.cache.entries import CacheEntry


@dataclass
class PrunePlan:
    remove: list[tuple[CacheEntry, str]]  # entry, why
    keep_bytes: int


def plan_prune(
    entries: list[CacheEntry],
    older_than_s: float | None = None,
    max_bytes: int | None = None,
    damaged: bool = False,
    now: float | None = None,
) -> PrunePlan:
    """What goes: obsolete entries always; then unused for longer than `older_than_s`; then damaged ones (when
    verified); then the least recently used until the rest fits in `max_bytes`."""
    now = time.time() if now is None else now
    remove: list[tuple[CacheEntry, str]] = []
    rest: list[CacheEntry] = []
    for entry in entries:
        if entry.kind == "unknown" or entry.kind.startswith("link to"):  # not this cache's own: never removed
            continue
        if entry.users:  # a running process reads it (a training run its conversion): kept, whatever is asked
            rest.append(entry)
            continue
        if entry.obsolete:
            remove.append((entry, entry.obsolete))
        elif older_than_s is not None and now - entry.last_used > older_than_s:
            remove.append((entry, f"unused for {_age(now - entry.last_used)}"))
        elif damaged and entry.problem:
            remove.append((entry, f"damaged: {entry.problem}"))
        else:
            rest.append(entry)
    kept = sum(entry.bytes for entry in rest)
    if max_bytes is not None:
        for entry in sorted((e for e in rest if not e.users), key=lambda e: e.last_used):
            if kept <= max_bytes:
                break
            remove.append((entry, "least recently used, over the size limit"))
            kept -= entry.bytes
    return PrunePlan(remove, kept)


def remove_entry(entry: CacheEntry) -> bool:
    """Remove an entry under its builder's lock; False when a process holds that lock (being built) or has begun
    to read it since it was listed: then it is kept. A link is never followed."""
    lock = FileLock(entry.lock) if entry.lock is not None and entry.lock.parent.is_dir() else None
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        if users(entry.paths[0]):
            return False
        for path in entry.paths:
            if path.is_symlink():
                continue
            if not path.exists():
                continue
            if path.is_dir():
                aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
                os.replace(path, aside)  # the entry disappears at once; then its bytes go
                shutil.rmtree(aside, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.release()
    return True


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def age_text(last_used: float, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: '3 d ago'."""
    return f"{_age((time.time() if now is None else now) - last_used)} ago"
