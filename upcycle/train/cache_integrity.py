"""Cache entries are re-checked on every reuse: each records its files' sha256, and each reuse hashes them again.

A cached conversion or token stream is trained on by every later run, so one flipped byte would spread silently.
The check reads every byte (sha256, files hashed on parallel threads: hashlib releases the GIL), which runs at disk
speed; file sizes or modification times would miss an edit that keeps both. A damaged entry (a file changed,
truncated, missing or added) is never used: it is renamed aside, under a name that says why, and built again.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from upcycle.hashing import file_sha256

HASH_THREADS = 4


def folder_digests(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file below it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(files)))) as pool:
        digests = list(pool.map(file_sha256, files))
    return {p.relative_to(folder).as_posix(): digest for p, digest in zip(files, digests, strict=True)}


def changed_files(recorded: dict[str, str], found: dict[str, str]) -> list[str]:
    """One line per file that is not as recorded: changed, missing or added."""
    lines = []
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            lines.append(f"{name} is missing")
        elif name not in recorded:
            lines.append(f"{name} was added")
        elif recorded[name] != found[name]:
            lines.append(f"{name} changed (sha256 {found[name][:12]}, recorded {recorded[name][:12]})")
    return lines


def set_aside(path: Path, why: str = "damaged") -> Path:
    """Rename a bad cache entry out of the way (kept for inspection, never read again); returns where it went."""
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def describe(problems: list[str]) -> str:
    more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more
