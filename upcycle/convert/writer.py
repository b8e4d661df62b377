"""Executing a plan into an output folder atomically: a temporary folder beside OUT, renamed at the end.

Whatever stops the run (bad input, a full disk, Ctrl-C, SIGTERM) removes the temporary folder, so OUT either
is the complete checkpoint or does not exist. A SIGKILL cannot be caught: the next run sweeps the folders of
dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from upcycle.convert.finite import check_finite
from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.safetensors_stream import StreamingShardWriter
from upcycle.convert.source import DenseSource, hash_files, in_background
from upcycle.convert.written_plan import WrittenPlan
from upcycle.errors import OutputError, SourceError
from upcycle.hub import ModelSource
from upcycle.model_card import write_conversion_card
from upcycle.model_files import copied_files, record_files
from upcycle.model_identity import source_identity
from upcycle.output_safety import (
    free_space,
    publish_atomically,
    refuse_existing,
    refuse_overlap,
    remove,
    sweep_stale,
    temporary_sibling,
)
from upcycle.redaction import redact_local_paths
from upcycle.units import format_bytes

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)
DISK_HEADROOM = 64 * 1024**2  # config, tokenizer, upcycle.json and the file system's own blocks
# Checks a folder before it is published, while its tensors are written: config.json and the copied files are
# there from the start; the last argument waits until every tensor file is complete (and raises what stopped them).
Inspect = Callable[[WrittenPlan, DenseSource, Path, Callable[[], object]], None]


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception so cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum  # the command exits 128 + signum, as a shell reports a process the signal ended


def check_output(out: Path, force: bool, source: Path | None = None) -> None:
    """Refuse before anything is written: OUT over or inside its SOURCE, or an existing OUT without --force."""
    if source is not None:
        refuse_overlap(out, [("the source", source)])
    refuse_existing(out, force)


def write_plan(
    plan: WrittenPlan,
    source: DenseSource,
    out: Path,
    force: bool = False,
    progress: Progress | None = None,
    origin: Path | None = None,
    inspect: Inspect | None = None,
    hub: ModelSource | None = None,
) -> int:
    """Write the checkpoint the plan describes into OUT; returns the bytes of tensor data written.

    `inspect` runs on the folder before it is published, beside the tensors being written (on a thread of their
    own: the checks need no tensor until they ask for them): it may refuse the folder (nothing is left behind) or
    add to the plan what it measured (a rounding's deviation), which upcycle.json then records."""
    check_output(out, force, origin or source.folder)
    free, where = free_space(out)
    if free < plan.total_bytes * 1.01 + DISK_HEADROOM:
        raise OutputError(
            f"not enough disk space for {out}: it needs {format_bytes(plan.total_bytes)} of tensors plus "
            f"{format_bytes(DISK_HEADROOM)} of headroom, and {where} has {format_bytes(free)} free.",
            "free some space or choose another OUT.",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = temporary_sibling(out)
    hashed = [origin] if origin is not None else [*source.weight_files, source.folder / "config.json"]
    try:
        with _signals_raise():
            tmp.mkdir()
            hashes = in_background(lambda: _source_hashes(hashed))
            _write_metadata(plan, source, tmp)
            written = _write_beside(plan, source, tmp, progress, inspect)
            plan.source = {
                "path": str((origin or source.folder).resolve()),
                "kind": "gguf" if origin is not None else "folder",
                "sha256": hashes(),
                **source_identity(source.folder, origin),  # name and license, as the source states them
            }
            if hub is not None and hub.repo_id:  # the repository names the model; its cache path names nothing
                plan.source |= {"path": hub.repo_id, "name": hub.repo_id, **hub.provenance()}
            record = redact_local_paths(plan.to_json())  # the folder travels; where its source lay stays here
            _write_json(tmp / "upcycle.json", record)
            write_conversion_card(tmp, record, model_id=out.name)  # README.md: the same record, for people
            publish_atomically(tmp, out, force)
    except OSError as error:
        remove(tmp)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"the disk filled up while writing {out}; nothing was left behind.",
                "free some space or choose another OUT.",
            ) from None
        raise OutputError(
            f"cannot write {out}: {error.strerror or error}.", "check the path and permissions."
        ) from None
    except BaseException:
        remove(tmp)
        raise
    return written


def _source_hashes(paths: list[Path]) -> dict[str, str]:
    """Every source file's sha256 for upcycle.json, or the error that names the file that could not be read."""
    try:
        return hash_files(paths, remembered=True)
    except OSError as error:
        raise SourceError(
            f"cannot read {error.filename or 'a source file'} to record its sha256 ({error.strerror or error}).",
            "check that the source is complete and readable, then run the command again.",
        ) from None


def _write_beside(
    plan: WrittenPlan, source: DenseSource, folder: Path, progress: Progress | None, inspect: Inspect | None
) -> int:
    """The tensors on a worker thread, `inspect` on this one; whichever fails first stops the other."""
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="upcycle-writer") as pool:
        tensors = pool.submit(_write_tensors, plan, source, folder, progress, stop)
        try:
            if inspect is not None:
                inspect(plan, source, folder, tensors.result)
            return tensors.result()
        except BaseException:
            stop.set()  # the writer ends after its current tensor; leaving the pool waits for it
            raise


class _Stopped(Exception):
    """The checks beside the writer refused the folder: the remaining tensors are not made."""


def _write_tensors(
    plan: WrittenPlan, source: DenseSource, folder: Path, progress: Progress | None, stop: threading.Event
) -> int:
    read = CachedReader(source.read)
    every_recipe = plan.recipes  # once: naming a non-finite tensor's cause looks at all of them
    total, done = plan.total_bytes, 0
    for name, recipes in zip(plan.shard_names(), plan.shards, strict=True):
        writer = StreamingShardWriter(folder / name, recipes)
        try:
            for recipe in recipes:
                if stop.is_set():
                    raise _Stopped
                tensor = materialize(recipe, read)
                check_finite(recipe, tensor, every_recipe, source)  # NaN or an overflowing down-cast: refused
                done += writer.write(tensor)
                if progress is not None:
                    progress(done, total, recipe.name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return done


def _write_metadata(plan: WrittenPlan, source: DenseSource, folder: Path) -> None:
    _write_json(folder / "config.json", plan.config)
    weight_map = {r.name: name for name, shard in zip(plan.shard_names(), plan.shards, strict=True) for r in shard}
    _write_json(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map},
    )
    for path in copied_files(source.folder):
        shutil.copy2(path, folder / path.name)
    plan.copied_files = record_files(folder)  # verify proves these are what a user loads


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
