"""Records that travel with a model folder name local files by their last part only: a folder is uploaded as it is,
and the path of a user's home or cache says nothing to anyone else (the full record stays on this machine)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

LOCAL = "<local>"
_ABSOLUTE = re.compile(r"^(/|~[/\\]|[A-Za-z]:[\\/]|\\\\)")


def is_local_path(text: str) -> bool:
    """An absolute (or home-relative) filesystem path, POSIX or Windows; not a URL, a Hub id or a name."""
    return bool(_ABSOLUTE.match(text)) and "\n" not in text


def redacted(path: str) -> str:
    """``<local>/NAME`` for a local path: the name still says which file or folder it was."""
    parts = PureWindowsPath(path) if "\\" in path else PurePosixPath(path)
    return f"{LOCAL}/{parts.name}" if parts.name else LOCAL


def redact_local_paths(value: Any) -> Any:
    """``value`` (JSON-like) with every string that is a local path redacted, keys and structure kept."""
    if isinstance(value, dict):
        return {key: redact_local_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_local_paths(item) for item in value]
    if isinstance(value, str) and is_local_path(value):
        return redacted(value)
    return value
