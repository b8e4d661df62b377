"""sha256 of a dense source's files, remembered per file so that a second run does not read gigabytes again.

A remembered digest is reused only while the file is the same file with the same size and modification time
(device, inode, size, mtime in nanoseconds); anything else hashes it again. The memo lives in the cache folder,
one small file per digest, each written atomically, so concurrent runs never see half a memo.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from upcycle.assets import cache_dir, mark_used
from upcycle.hashing import file_sha256


def source_hashes(source: Path) -> dict[str, str]:
    """{file name: sha256} of a .gguf file, or of every file at the top of a model folder (hidden ones aside)."""
    source = Path(source)
    if source.is_file():
        return {source.name: memo_sha256(source)}
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        from upcycle.errors import SourceError

        raise SourceError(f"{source} holds no file.", "point model.source at a dense model folder or .gguf file.")
    return {p.name: memo_sha256(p) for p in files}


def memo_sha256(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_dev}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256" / hashlib.sha256(identity.encode()).hexdigest()
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            mark_used(memo)
            return digest
    except OSError:
        pass
    digest = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.parent / f".{memo.name}.{os.getpid()}.tmp"
    tmp.write_text(digest + "\n")
    os.replace(tmp, memo)
    return digest
