"""Training checkpoints that resume exactly, survive SIGKILL at any moment, detect corruption, and reshard.

Layout (one folder per step, under ``RUN_DIR/checkpoints``)::

    step-00000100/
        .metadata, __0_0.distcp, ...   torch.distributed.checkpoint (DCP) files: model + AdamW state
        trainer.json                   step, caller's trainer state (data position, schedule, metrics, recipe)
        rng-rank{r}.pt                 each rank's RNG states (torch CPU, CUDA, python `random`, numpy)
        manifest.json                  written last: every file with its size and sha256 (the commit marker)

Why DCP: each rank writes only its own shards (FSDP2 DTensors) and a checkpoint written by N ranks loads on M
ranks, or in one process with no process group at all, with the same code.

Why the temporary folder: every file goes into ``checkpoints/.step-00000100.tmp-<id>``; rank 0 writes the
manifest into it and renames it to its final name in one ``os.replace``. A process killed at any moment therefore
leaves either no ``step-*`` folder or a complete one; the leftovers (``.step-*.tmp-*``, ``.step-*.old-*``) are
removed by the next save. A final-named folder that does not match its manifest was damaged after the fact, and is
reported, never loaded or skipped silently.

Resharding and RNG: a checkpoint written by W ranks and loaded by M ranks restores the model and optimizer exactly
(DCP reshards). Rank r < W restores ``rng-rank{r}.pt``; files of ranks >= M are ignored; a rank r >= W has no RNG of
its own, so it is seeded deterministically from rank 0's saved state combined with r (distinct from rank 0's
stream, the same on every such resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from upcycle.errors import UpcycleError
from upcycle.hashing import file_sha256
from upcycle.output_safety import publish_atomically
from upcycle.train.distributed import barrier, rank_and_world

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "remove_stale",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
_FINAL = re.compile(r"^step-(\d{8,})$")
_STALE = re.compile(r"^\.step-\d+\.(tmp|old)-")

T = TypeVar("T")

# Test seam: called with the name of each point in the save protocol; a test makes it stop the process there.
_crash_hook: Callable[[str], None] | None = None


class CheckpointError(UpcycleError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; or one could not be written."""

    exit_code = 3


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_name(step: int) -> str:
    """Zero-padded so that names sort like steps (up to 10^8; beyond that the step parsed from the name decides)."""
    return f"step-{step:08d}"


def _step_of(path: Path) -> int | None:
    match = _FINAL.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Every final-named checkpoint folder of the run, oldest step first; not verified (see `verify_checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _FINAL.match(p.name) and p.is_dir()), key=lambda p: _step_of(p) or 0)


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


def _fix_for(path: Path) -> str:
    step = _step_of(path)
    older = [p for p in list_checkpoints(path.parent.parent) if step is not None and (_step_of(p) or 0) < step]
    hint = f" (the one before it is {older[-1]})" if older else ""
    return (
        f"delete {path} (or move it out of {path.parent}) to resume from the checkpoint before it{hint}, "
        "or resume from an older one with --resume-from PATH."
    )


def _read_manifest(path: Path) -> dict[str, Any]:
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
            _fix_for(path),
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
        raise CheckpointError(f"Checkpoint {path} is corrupt: {file} is not a valid manifest.", _fix_for(path))
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {manifest['format_version']}; this upcycle reads up to "
            f"{FORMAT_VERSION}.",
            "upgrade upcycle.",
        )
    for name in files:
        if not name or "/" in name or "\\" in name or name in {".", "..", MANIFEST}:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: its manifest names an invalid file {name!r}.", _fix_for(path)
            )
    for name in (".metadata", TRAINER, "rng-rank0.pt"):
        if name not in files:
            raise CheckpointError(f"Checkpoint {path} is corrupt: its manifest lists no {name}.", _fix_for(path))
    return manifest


def _check_file(path: Path, name: str, entry: dict[str, Any], hashes: bool) -> str | None:
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
    manifest = _read_manifest(path)  # every rank: it raises the same way everywhere, no collective needed
    names = sorted(manifest["files"])
    mine = names[rank::world] if hashes else names
    problems = {n: p for n in mine if (p := _check_file(path, n, manifest["files"][n], hashes))}
    if hashes and world > 1:
        gathered: list[dict[str, str] | None] = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = {k: v for part in gathered for k, v in (part or {}).items()}
    if problems:
        first = problems[min(problems)]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"Checkpoint {path} is corrupt: {first}{more}.", _fix_for(path))
    return manifest


def read_trainer_state(path: Path | str) -> dict[str, Any]:
    """The trainer state saved with a checkpoint (its trainer.json checked against the manifest), nothing loaded."""
    path = Path(path)
    manifest = _read_manifest(path)
    problem = _check_file(path, TRAINER, manifest["files"][TRAINER], hashes=True)
    if problem:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {problem}.", _fix_for(path))
    try:
        record = json.loads((path / TRAINER).read_text())
        state = record["trainer_state"]
        version = record["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: {path / TRAINER} is unreadable ({exc}).", _fix_for(path)
        ) from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {version}; this upcycle reads up to {FORMAT_VERSION}.",
            "upgrade upcycle.",
        )
    state.setdefault("step", record.get("step"))
    return state


# ---------------------------------------------------------------------------------------------------------------
# Process group helpers: every function also works with no process group (one process, world size 1).


def _on_rank0(action: Callable[[], T], what: str) -> T:
    """Run `action` on rank 0 and give every rank its result; if it fails, every rank raises (none hangs)."""
    rank, world = rank_and_world()
    if world == 1:
        return action()
    box: list[Any] = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            box[0] = ("ok", action())
        except Exception as exc:  # reported to the other ranks, re-raised below
            error = exc
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise CheckpointError(f"Rank 0 failed to {what}: {value}")
    return value


def _on_all_ranks(action: Callable[[], T], what: str) -> list[T]:
    """Run `action` on every rank and gather the results; if one rank fails, every rank raises (none hangs)."""
    rank, world = rank_and_world()
    if world == 1:
        return [action()]
    error: Exception | None = None
    try:
        mine: tuple[str, Any] = ("ok", action())
    except Exception as exc:  # reported to the other ranks, re-raised below
        error, mine = exc, ("error", str(exc))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    for other, (status, value) in enumerate(gathered):
        if status == "error":
            raise CheckpointError(f"Rank {other} failed to {what}: {value}")
    return [value for _, value in gathered]


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is exactly what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        yield


def _describe(exc: BaseException) -> str:
    """One line per distinct failure; DCP's CheckpointException otherwise prints every rank's traceback."""
    if isinstance(exc, CheckpointException):
        lines = {str(failure[0] if isinstance(failure, tuple) else failure) for failure in exc.failures.values()}
        return "; ".join(sorted(lines))
    return str(exc)


def _at(point: str) -> None:
    if _crash_hook is not None:
        _crash_hook(point)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# RNG states: only tensors, ints, floats, strings and containers, so that torch.load(weights_only=True) reads them.


def _rng_state() -> dict[str, Any]:
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_extra_rank(rank0_state: dict[str, Any], rank: int) -> None:
    """A rank the checkpoint had no RNG for: a seed from rank 0's state and this rank, distinct and reproducible."""
    digest = hashlib.sha256(rank0_state["torch"].numpy().tobytes() + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little")
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ---------------------------------------------------------------------------------------------------------------
# Save


def _write_rank_files(tmp: Path, rank: int, trainer_json: str) -> None:
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    _write_durably(tmp / f"rng-rank{rank}.pt", buffer.getvalue())
    if rank == 0:
        _write_durably(tmp / TRAINER, trainer_json.encode())


def _entry(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": file_sha256(file)}


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` highest steps (always including the one just written); move the rest aside, then delete."""
    checkpoints = list_checkpoints(root.parent)
    doomed = [p for p in checkpoints[: max(0, len(checkpoints) - keep)] if p != newest]
    for path in doomed:
        aside = root / f".{path.name}.old-{secrets.token_hex(4)}"
        try:
            os.replace(path, aside)  # atomic: no half-deleted folder ever carries a final name
        except OSError as exc:  # the new checkpoint is committed; a failed clean-up must not stop training
            warnings.warn(f"could not remove old checkpoint {path}: {exc}", stacklevel=3)
            continue
        _at("pruned-aside")
        shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-{step:08d}`` atomically and keep the newest `keep`; return its path.

    `optimizer=None` saves the model only: an optimizer that has not stepped yet has no state, and asking DCP for
    it would make one up (a zero-learning-rate step) and change every later update.

    Collective when a process group is initialised: every rank calls it with its shard of the model. The
    trainer state (rank 0's is written) must be JSON-serialisable; JSON turns tuples into lists and keys into
    strings. Saving a step that already exists replaces it (a crash in the middle of that replacement leaves the
    checkpoint before it as the latest). Checkpoints of higher steps than `step` (a run resumed from an older
    checkpoint into the same folder) are kept and stay the latest; a warning names them.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, world = rank_and_world()
    try:
        trainer_json = json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": world,
                "torch_version": torch.__version__,
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "trainer_state": trainer_state,
            },
            indent=2,
            allow_nan=True,
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer_state must be JSON-serialisable: {exc}") from exc

    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)

    def prepare() -> str:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(run_dir)
        tmp = root / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        return str(tmp)

    try:
        tmp = Path(_on_rank0(prepare, f"create a temporary checkpoint folder in {root}"))
        _at("tmp-created")
        if optimizer is None:
            saved = {"model": get_model_state_dict(model)}
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            saved = {"model": model_state, "optim": optim_state}
        with _quiet_dcp():
            dcp.save(saved, checkpoint_id=tmp)
        _at("dcp-saved")
        _on_all_ranks(lambda: _write_rank_files(tmp, rank, trainer_json), "write its checkpoint files")
        _at("files-written")
        names = sorted(p.name for p in tmp.iterdir())
        shares = _on_all_ranks(lambda: {n: _entry(tmp / n) for n in names[rank::world]}, "hash its checkpoint files")
        entries = {name: entry for share in shares for name, entry in share.items()}
    except CheckpointError:
        raise
    except (OSError, CheckpointException) as exc:  # DCP gathers every rank's failure into one CheckpointException
        raise CheckpointError(
            f"Could not write checkpoint {final}: {_describe(exc)}.",
            "free disk space or fix permissions; the partial files are removed by the next save.",
        ) from exc

    def commit() -> str:
        manifest = {
            "format": "upcycle-checkpoint",
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "files": dict(sorted(entries.items())),
        }
        _write_durably(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        _at("manifest-written")
        aside = root / f".{final.name}.old-{secrets.token_hex(4)}"
        publish_atomically(tmp, final, force=True, aside=aside, on_aside=lambda: _at("old-moved-aside"))
        _at("renamed")
        _fsync_dir(root)
        _prune(root, keep, final)
        newer = [p.name for p in list_checkpoints(run_dir) if (_step_of(p) or 0) > step]
        if newer:
            warnings.warn(
                f"checkpoints of later steps ({', '.join(newer)}) remain in {root}: latest_checkpoint returns "
                f"{newer[-1]}, not the {final.name} just written; delete them to continue from this run",
                stacklevel=3,
            )
        return str(final)

    try:
        return Path(_on_rank0(commit, f"commit checkpoint {final}"))
    except OSError as exc:
        raise CheckpointError(
            f"Could not commit checkpoint {final}: {exc}.",
            "free disk space or fix permissions; the partial files are removed by the next save.",
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Verify `path` (sizes and sha256), restore model, optimizer and this rank's RNG; return the trainer state.

    Collective when a process group is initialised. Works for any number of ranks, whatever number wrote it,
    and for FSDP2-sharded or plain models. `optimizer=None` loads the model only (evaluation, export).
    """
    path = Path(path)
    rank, _ = rank_and_world()
    manifest = verify_checkpoint(path, hashes=True)
    state = read_trainer_state(path)
    try:
        if optimizer is None:
            model_state, optim_state = get_model_state_dict(model), None
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
        wanted = {"model": model_state} if optim_state is None else {"model": model_state, "optim": optim_state}
        with _quiet_dcp():
            dcp.load(wanted, checkpoint_id=path)
        if optimizer is None:
            set_model_state_dict(model, model_state)
        else:
            set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optim"])
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"Checkpoint {path} does not fit this model or optimizer: {_describe(exc)}",
            "resume with the recipe and model that wrote it, or train into a fresh output folder.",
        ) from exc
    own = path / f"rng-rank{rank}.pt"
    try:
        if own.name in manifest["files"]:
            _set_rng_state(torch.load(own, weights_only=True))
        else:
            _seed_extra_rank(torch.load(path / "rng-rank0.pt", weights_only=True), rank)
    except Exception as exc:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {own} is unreadable ({exc}).", _fix_for(path)) from exc
    barrier()
    return state
