"""How much memory this machine can give, and how much this process has used (Linux /proc; None elsewhere)."""

from __future__ import annotations


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
