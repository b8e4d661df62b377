"""Whether each cache entry is intact: conversions and token streams against the sha256 their records hold (every
byte is read), the rest for the files their builder guarantees to put there."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from upcycle.assets import SMOLLM2_FOLDER_FILES
from upcycle.cache.entries import CacheEntry


def _check_smollm2(path: Path) -> str | None:
    missing = [name for name in SMOLLM2_FOLDER_FILES if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    return _safetensors_problem(path / "model.safetensors")


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is no dict
                handle.get_slice(name)  # reads every tensor's header entry, not its bytes
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for one meaning: unreadable
        return f"{path.name} cannot be read ({str(error).splitlines()[0]})"
    return None


def _check_conversion(path: Path) -> str | None:
    from upcycle.train.conversion import entry_problems

    record_path = path.with_name(f"{path.name}.json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "its record is missing or unreadable"
    if not isinstance(record, dict) or not str(record.get("key", "")).startswith(path.name):
        return "its record does not name it"
    problems = entry_problems(path, record)
    return "; ".join(problems[:3]) if problems else None


def _check_tokens(path: Path) -> str | None:
    from upcycle.train.token_cache import stream_problem

    return stream_problem(path)


def _check_eval_data(path: Path) -> str | None:
    missing = [name for name in ("LICENSE", "mmlu") if not (path / name).exists()]
    return f"{', '.join(missing)} missing" if missing else None


def _check_texts(path: Path) -> str | None:
    return None if any(path.glob("*_gut.txt")) else "no text in it"


def _check_model_folder(path: Path) -> str | None:
    missing = [name for name in ("config.json", "upcycle.json") if not (path / name).is_file()]
    return f"{', '.join(missing)} missing" if missing else None


def _check_memo(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "not readable JSON"
    return None if isinstance(data, dict) and {"kind", "value"} <= set(data) else "not a memo"


CHECKS: dict[str, Callable[[Path], str | None]] = {
    "SmolLM2 model": _check_smollm2,
    "benchmark data": _check_eval_data,
    "Shakespeare": _check_texts,
    "conversion": _check_conversion,
    "tokens": _check_tokens,
    "demo MoE": _check_model_folder,
    "calibration": _safetensors_problem,
    "config fact": _check_memo,
}
"""How each kind is checked: conversions and token streams against the sha256 their records hold (every byte is
read), the rest by what their builder guarantees to put there."""


def verify_entries(entries: list[CacheEntry], on_entry: Callable[[CacheEntry], None] = lambda _: None) -> None:
    """Set each entry's `problem` (None when intact); the kinds without a check are left as they are."""
    for entry in entries:
        check = CHECKS.get(entry.kind)
        if check is not None and entry.obsolete is None:
            entry.problem = check(entry.paths[0])
        on_entry(entry)
