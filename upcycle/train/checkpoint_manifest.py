"""Finding a run's checkpoints and checking them against their manifests, without loading anything.

A checkpoint folder is final-named (``step-00000100``) only once it is complete; its ``manifest.json``, written
last, lists every file with its size and sha256. Everything here reads: a damaged checkpoint is reported with the
fix (delete it, or resume from an older one), never skipped in favour of an older one. See `upcycle.train.checkpoint`
for the layout and the save protocol.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from upcycle.errors import UpcycleError
from upcycle.hashing import file_sha256
from upcycle.train.distributed import rank_and_world

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
_FINAL = re.compile(r"^step-(\d{8,})$")
_STALE = re.compile(r"^\.step-\d+\.(tmp|old)-")


class CheckpointError(UpcycleError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; or one could not be written."""

    exit_code = 3


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_name(step: int) -> str:
    """Zero-padded so that names sort like steps (up to 10^8; beyond that the step parsed from the name decides)."""
    return f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a final-named checkpoint folder holds (None for any other name)."""
    match = _FINAL.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Every final-named checkpoint folder of the run, oldest step first; not verified (see `verify_checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _FINAL.match(p.name) and p.is_dir()), key=lambda p: step_of(p) or 0)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest checkpoint, or None when there is none; raises CheckpointError if the newest is incomplete.

    Only names, the manifest and file sizes are checked here (cheap, on every rank); `load_checkpoint` also checks
    sha256. A damaged newest checkpoint is never skipped in favour of an older one: the user decides.
    """
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    verify_checkpoint(checkpoints[-1], hashes=False)
    return checkpoints[-1]


def remove_stale(run_dir: Path | str) -> list[Path]:
    """Delete leftovers of interrupted saves (``.step-*.tmp-*``, ``.step-*.old-*``); rank 0 only, one writer per run.

    `save_checkpoint` calls it; `load_checkpoint` does not, because it may be pointed at another run's folder whose
    save is in progress.
    """
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if _STALE.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Verification


def fix_for(path: Path) -> str:
    """What the user can do about a damaged checkpoint: the message names the one before it."""
    step = step_of(path)
    older = [p for p in list_checkpoints(path.parent.parent) if step is not None and (step_of(p) or 0) < step]
    hint = f" (the one before it is {older[-1]})" if older else ""
    return (
        f"delete {path} (or move it out of {path.parent}) to resume from the checkpoint before it{hint}, "
        "or resume from an older one with --resume-from PATH."
    )


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, checked for shape, version and the files every checkpoint has."""
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {path} does not exist.", "pass a folder under RUN_DIR/checkpoints.")
    if (path / CHECKPOINTS).is_dir():
        raise CheckpointError(
            f"{path} is a run folder, not a checkpoint.", f"pass one of {path / CHECKPOINTS}/step-*, e.g. the latest."
        )
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(
            f"Checkpoint {path} is incomplete: it has no {MANIFEST}, the marker written last by a complete save.",
            fix_for(path),
        )
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        ok = manifest.get("format") == "upcycle-checkpoint" and isinstance(manifest.get("format_version"), int)
        ok = ok and isinstance(files, dict)
        ok = ok and all(isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in files.values())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {file} is not a valid manifest.", fix_for(path))
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {manifest['format_version']}; this upcycle reads up to "
            f"{FORMAT_VERSION}.",
            "upgrade upcycle.",
        )
    for name in files:
        if not name or "/" in name or "\\" in name or name in {".", "..", MANIFEST}:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: its manifest names an invalid file {name!r}.", fix_for(path)
            )
    for name in (".metadata", TRAINER, "rng-rank0.pt"):
        if name not in files:
            raise CheckpointError(f"Checkpoint {path} is corrupt: its manifest lists no {name}.", fix_for(path))
    return manifest


def check_file(path: Path, name: str, entry: dict[str, Any], hashes: bool) -> str | None:
    """The problem with one listed file, or None."""
    file = path / name
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != entry["size"]:
        return f"{file} has {size} bytes, the manifest says {entry['size']}"
    if hashes and file_sha256(file) != entry["sha256"]:
        return f"{file} does not match its sha256 in the manifest (its contents changed after the save)"
    return None


def verify_checkpoint(path: Path | str, *, hashes: bool = True) -> dict[str, Any]:
    """Check the manifest and every file it lists (size, and sha256 when `hashes`); return the manifest.

    Collective when a process group is initialised: each rank hashes a share of the files, and all ranks raise the
    same CheckpointError, naming the first bad file.
    """
    path = Path(path)
    rank, world = rank_and_world()
    manifest = read_manifest(path)  # every rank: it raises the same way everywhere, no collective needed
    names = sorted(manifest["files"])
    mine = names[rank::world] if hashes else names
    problems = {n: p for n in mine if (p := check_file(path, n, manifest["files"][n], hashes))}
    if hashes and world > 1:
        gathered: list[dict[str, str] | None] = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = {k: v for part in gathered for k, v in (part or {}).items()}
    if problems:
        first = problems[min(problems)]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"Checkpoint {path} is corrupt: {first}{more}.", fix_for(path))
    return manifest


def read_trainer_state(path: Path | str) -> dict[str, Any]:
    """The trainer state saved with a checkpoint (its trainer.json checked against the manifest), nothing loaded."""
    path = Path(path)
    manifest = read_manifest(path)
    problem = check_file(path, TRAINER, manifest["files"][TRAINER], hashes=True)
    if problem:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {problem}.", fix_for(path))
    try:
        record = json.loads((path / TRAINER).read_text())
        state = record["trainer_state"]
        version = record["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: {path / TRAINER} is unreadable ({exc}).", fix_for(path)
        ) from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {version}; this upcycle reads up to {FORMAT_VERSION}.",
            "upgrade upcycle.",
        )
    state.setdefault("step", record.get("step"))
    return state
