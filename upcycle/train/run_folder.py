"""One run per run folder: what a run may find there before it starts, and the lock it holds while it trains.

A run folder holds one run's records (metrics, checkpoints, the resolved recipe, the export). A second run into it
would mix its records with the first's and replace its checkpoints and export, so it is refused unless it resumes
that run (`--resume`) or replaces it (`--force`). While a run trains, its first rank holds a lock on the folder, so
two runs started into one folder cannot both write it. `--resume` with nothing to resume is refused and touches
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from upcycle.errors import OptionError
from upcycle.output_safety import remove
from upcycle.train.checkpoint_manifest import (
    CHECKPOINTS,
    TRAINER,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from upcycle.train.export import check_replaceable_export

LOCK_NAME = ".upcycle-run.lock"
RUN_RECORDS = ("metrics.jsonl", "recipe.resolved.json", "tensorboard", CHECKPOINTS, "export")


def earlier_run(run_dir: Path) -> list[str]:
    """The records of an earlier run in the folder (its metrics, recipe, checkpoints, export), by name."""
    found = []
    for name in RUN_RECORDS:
        path = run_dir / name
        if name == CHECKPOINTS:
            if list_checkpoints(run_dir):
                found.append(name)
        elif path.exists() and not (path.is_dir() and not any(path.iterdir())):
            found.append(name)
    return found


def check_run_folder(run_dir: Path, resume: bool, resume_from: Path | None, force: bool) -> Path | None:
    """Refuse a start that would resume nothing or overwrite another run; the checkpoint to resume, if any.

    Reads only: nothing is written or removed here, so a refused start loses nothing.
    """
    if resume_from is not None:
        if not resume_from.is_dir() or not (resume_from / TRAINER).is_file():
            raise OptionError(
                f"--resume-from {resume_from} is not a checkpoint (no {TRAINER} there).",
                f"pass one of the folders in {run_dir / CHECKPOINTS}.",
            )
        if resume_from.resolve().parent != (run_dir / CHECKPOINTS).resolve():
            raise OptionError(
                f"--resume-from {resume_from} is not a checkpoint of the run in {run_dir}; resuming it there would "
                "mix two runs' records.",
                f"pass one of the folders in {run_dir / CHECKPOINTS}, or set run.output_dir to the run it belongs to.",
            )
        verify_checkpoint(resume_from, hashes=False)
        return resume_from
    if resume:
        latest = latest_checkpoint(run_dir)  # its manifest checked now, before anything is converted or tokenised
        if latest is None:
            where = "does not exist" if not run_dir.exists() else f"holds no checkpoint in {CHECKPOINTS}/"
            raise OptionError(
                f"--resume: the run folder {run_dir} {where}, so there is nothing to resume; nothing was changed.",
                "check run.output_dir (or --set run.output_dir=...), or start the run without --resume.",
            )
        return latest
    found = earlier_run(run_dir)
    if found and not force:
        resumable = CHECKPOINTS in found
        raise OptionError(
            f"{run_dir} holds another run ({', '.join(found)}); a new run would mix its metrics with that run's and "
            "replace its checkpoints and export"
            + ("." if resumable else "; it stopped before its first checkpoint, so it cannot be resumed."),
            ("pass --resume to continue it, " if resumable else "pass ")
            + "--force to replace it, or set run.output_dir to a new folder.",
        )
    if found and force:
        check_replaceable_export(run_dir / "export")  # --force replaces a run's records, never the user's files
    return None


def clear_earlier_run(run_dir: Path) -> None:
    """--force: remove the earlier run's records before this run writes its own."""
    for name in RUN_RECORDS:
        remove(run_dir / name)


@contextmanager
def run_lock(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Hold the folder's lock for the whole run (the first rank only); refuse at once when another run holds it."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OptionError(
            f"another upcycle run is training into {run_dir} right now.",
            "wait for it to finish, or set run.output_dir to another folder.",
        ) from None
    try:
        yield
    finally:
        lock.release()
