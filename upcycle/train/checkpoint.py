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

Finding and verifying checkpoints (reads only) is `upcycle.train.checkpoint_manifest`; the RNG states are
`upcycle.train.rng_state`. This module saves and loads, and names the whole API in ``__all__``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

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

from upcycle.hashing import file_sha256
from upcycle.output_safety import publish_atomically
from upcycle.train.checkpoint_manifest import (
    CHECKPOINTS,
    FORMAT_VERSION,
    MANIFEST,
    TRAINER,
    CheckpointError,
    checkpoint_name,
    fix_for,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_stale,
    step_of,
    verify_checkpoint,
)
from upcycle.train.distributed import barrier, rank_and_world
from upcycle.train.rng_state import rng_state, seed_extra_rank, set_rng_state

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

T = TypeVar("T")

# Test seam: called with the name of each point in the save protocol; a test makes it stop the process there.
_crash_hook: Callable[[str], None] | None = None


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


def _interrupted(exc: BaseException) -> bool:
    """Whether DCP caught a Ctrl-C (or a signal turned into one) and reported it as a CheckpointException."""
    failures = getattr(exc, "failures", None) or {}
    return any(isinstance(failure[0], KeyboardInterrupt) for failure in failures.values())


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
# Save


def _write_rank_files(tmp: Path, rank: int, trainer_json: str) -> None:
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
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
        if _interrupted(exc):  # Ctrl-C while DCP wrote: an interruption, not a failure to write
            raise KeyboardInterrupt from exc
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
        newer = [p.name for p in list_checkpoints(run_dir) if (step_of(p) or 0) > step]
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
            set_rng_state(torch.load(own, weights_only=True))
        else:
            seed_extra_rank(torch.load(path / "rng-rank0.pt", weights_only=True), rank)
    except Exception as exc:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {own} is unreadable ({exc}).", fix_for(path)) from exc
    barrier()
    return state
