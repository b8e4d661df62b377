"""Byte counts as people write and read them: one parser for every option and recipe, one formatter for every
message and report.

A size is read the way Hugging Face, disk makers and the SI read it: KB, MB, GB, TB are powers of 1000, KiB, MiB,
GiB, TiB powers of 1024, in any letter case. `--shard-size 2GB` is 2,000,000,000 bytes; so is a GPU's `2GB` (an
"80GB" H100 holds 80 GiB: write `80GiB`).
"""

from __future__ import annotations

import math
import re

from upcycle.errors import OptionError

SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*")


def parse_size(text: str | int, option: str) -> int:
    """Bytes of '2GB', '500MB', '80GiB', '1.5TB' or a plain count; `option` names the setting in the refusal."""
    if isinstance(text, int) and not isinstance(text, bool):
        count = text
    else:
        found = _SIZE.fullmatch(str(text).lower())
        if found is None or found.group(2) not in SIZE_UNITS:
            raise OptionError(
                f"{option} {text!r} is not a size.",
                "write it like 2GB or 500MB (powers of 1000), 80GiB (powers of 1024), or a byte count.",
            )
        value = float(found.group(1)) * SIZE_UNITS[found.group(2)]
        count = int(value) if math.isfinite(value) else 0
    if count <= 0:
        raise OptionError(f"{option} {text!r} is not a positive size.", "write it like 2GB or 80GiB.")
    return count


def format_bytes(count: int | float) -> str:
    """1.50 GiB, 12.00 MiB, 512 B: binary units, two decimals."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


AGE_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(s|min|h|d|w)\s*")


def parse_age(text: str, option: str) -> float:
    """Seconds of '30d', '12h', '90min', '2w' or '45s'; `option` names the setting in the refusal."""
    found = _AGE.fullmatch(str(text).lower())
    if found is None:
        raise OptionError(f"{option} {text!r} is not a duration.", "write it like 30d, 12h, 90min or 2w.")
    return float(found.group(1)) * AGE_UNITS[found.group(2)]
