"""One content check per cache entry per launch and host, not one per rank.

Every rank of a torchrun launch reuses the same cached conversion and token stream. Re-hashing them on each rank
would read every byte once per rank (eight times on an 8-GPU host, one after another under the entry's lock). The
first rank of a launch on a host that hashes an entry leaves a stamp beside it: its launch and the files' (size,
mtime, inode). A later rank of the same launch on the same host skips the hash only while every file still has that
state; any other process (another launch, a single-process run) always hashes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from upcycle.output_safety import write_json_atomically

KEPT_LAUNCHES = 8


def launch_id() -> str | None:
    """Shared by the ranks of one torchrun launch on one host (their agent is their parent); None outside torchrun."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{socket.gethostname()}:{os.getppid()}:{run}:{restart}"


def stamp_path(entry: Path) -> Path:
    """Beside the entry, never inside it (a conversion folder's hashes cover every file in it)."""
    return entry.with_name(f".{entry.name}.checked.json")


def file_states(files: list[Path]) -> list[list[object]]:
    states: list[list[object]] = []
    for path in sorted(files):
        stat = path.stat()
        states.append([str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return states


def checked_in_this_launch(entry: Path, files: list[Path]) -> bool:
    """True when a rank of this launch on this host hashed these files and none has changed since."""
    launch = launch_id()
    if launch is None:
        return False
    try:
        stamps = json.loads(stamp_path(entry).read_text())
        return stamps.get(launch) == file_states(files)
    except (OSError, ValueError, AttributeError):
        return False


def mark_checked(entry: Path, files: list[Path]) -> None:
    """Record that this launch hashed `files` (call while holding the entry's lock, right after the hash)."""
    launch = launch_id()
    if launch is None:
        return
    path = stamp_path(entry)
    try:
        stamps = json.loads(path.read_text())
        stamps = stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        stamps = {}
    stamps.pop(launch, None)
    stamps[launch] = file_states(files)
    write_json_atomically(path, dict(list(stamps.items())[-KEPT_LAUNCHES:]))
