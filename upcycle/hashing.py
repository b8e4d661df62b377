"""sha256 of a file, read in large blocks without buffering (hashlib releases the GIL, so threads overlap it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 16 * 1024**2


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()
