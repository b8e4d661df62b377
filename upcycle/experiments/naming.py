"""A sweep's names: one readable, stable folder per grid point and seed, e.g. ``optim.lr=0.0003,seed=0``.

A name is a function of the point alone (its keys and the values as the recipe reads them, not as typed: ``3e-4``
and ``0.0003`` are one folder), so a sweep run again, or extended by more values, finds its finished runs. A
name is kept to safe characters; when that loses information (a path, a list, a mapping) or the name grows too
long, a short hash of the full point is added, so two points never share a folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from upcycle.train.recipe_paths import PATH_KEYS

MAX_NAME = 96  # characters of the readable part; folder names stay far below the file system's 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
CONTROL = "dense"  # the dense control's name prefix


def value_text(value: Any) -> str:
    """A value as it reads in a name: YAML/JSON spelling (``null``, ``true``, ``0.0003``), strings bare."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def point_text(point: Mapping[str, Any]) -> str:
    """``key=value,key=value`` in the grid's key order."""
    return ",".join(f"{key}={value_text(value)}" for key, value in point.items())


def safe_name(raw: str) -> str:
    """``raw`` kept to safe characters and a bounded length; a hash of ``raw`` added when anything was lost."""
    name = _UNSAFE.sub("_", raw)
    if name == raw and len(name) <= MAX_NAME and not name.startswith("."):
        return name
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME].lstrip('.')}-{digest}"


def variant_name(point: Mapping[str, Any], control: bool = False) -> str:
    """The name of a grid point, its seeds together (a table row): ``optim.lr=0.0003``, ``dense,optim.lr=0.0003``."""
    parts = [CONTROL] if control else []
    if point:
        parts.append(point_text(point))
    return safe_name(",".join(parts) or "recipe")


def run_name(point: Mapping[str, Any], seed: int, control: bool = False) -> str:
    """The folder of one run: the point's name and its seed, ``optim.lr=0.0003,seed=0``."""
    return f"{variant_name(point, control)},seed={seed}"


def label(point: Mapping[str, Any], control: bool = False) -> str:
    """The point for people (tables, legends): paths shortened to their last part."""
    shown = ", ".join(f"{key}={_shown(key, value)}" for key, value in point.items())
    if control:
        return f"dense control, {shown}" if shown else "dense control"
    return shown or "the recipe"


def _shown(key: str, value: Any) -> str:
    if key in PATH_KEYS and isinstance(value, str):
        return Path(value).name
    if key in PATH_KEYS and isinstance(value, (list, tuple)):
        return "[" + ",".join(Path(str(v)).name for v in value) + "]"
    return value_text(value)
