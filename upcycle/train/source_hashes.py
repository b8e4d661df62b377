"""sha256 of a dense source's files, remembered per file (`upcycle.convert.source.memo_sha256`) so that a
second run does not read gigabytes again."""

from __future__ import annotations

from pathlib import Path

from upcycle.convert.source import memo_sha256


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
