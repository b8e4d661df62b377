"""`convert`: plan a dense → MoE conversion, write it, check the written folder, and only then publish it.

It sits above both `upcycle.convert` (which plans and writes) and `upcycle.verify` (which checks), because two
facts about a conversion are only known once its files exist: whether its tokenizer and generation settings load
as the dense model's do, and how far a rounding to a narrower dtype moves the model (see `verify.written`). Those
checks, and the config check that admits the target, run beside the writing of the tensors: the folder is
published only when all of them pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.convert.options import UpcycleOptions
from upcycle.convert.result import Written

if TYPE_CHECKING:
    from upcycle.convert.plan import UpcyclePlan
    from upcycle.convert.source import DenseSource
    from upcycle.convert.writer import Progress


ConvertResult = Written  # Written[UpcyclePlan]


def convert(
    src: Path | str,
    out: Path,
    options: UpcycleOptions | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    revision: str | None = None,
) -> Written[UpcyclePlan]:
    """Upcycle SRC (HF folder, .gguf, or a Hub id at ``revision``) into OUT; a dry run plans and checks everything
    but writes nothing.

    OUT may not be SRC, lie inside it or contain it (for a .gguf SRC: the file), symlinks resolved; no flag
    overrides that, and a dry run refuses it too, since no real run could use that OUT. An existing OUT is
    replaced only with ``force``, atomically; a dry run does not check that (``--force`` can still fix it).
    """
    from upcycle.convert.targets import check_options
    from upcycle.hub import resolve_model
    from upcycle.model_files import check_source_path
    from upcycle.output_safety import free_space, refuse_overlap

    start = time.perf_counter()
    options = options or UpcycleOptions()
    check_options(options)  # before a Hub id is fetched: a typo in --target costs no download
    out = Path(out).absolute()
    named = resolve_model(src, revision)
    src = named.folder
    check_source_path(src)  # a wrong path is said at once, before torch loads
    refuse_overlap(out, [("the source", src)])
    # Imported here so that importing this module (for UpcycleOptions, ConvertResult) does not bring torch.
    from upcycle.convert.plan import NotProven, build_plan, prove_plan
    from upcycle.convert.source import open_source
    from upcycle.convert.writer import check_output, write_plan
    from upcycle.verify.written import inspect_written

    if not dry_run:
        check_output(out, force)
    with open_source(src, trust_remote_code, scratch=out.parent if out.parent.is_dir() else None) as source:
        if dry_run:
            return ConvertResult(build_plan(source, options), None, 0, time.perf_counter() - start)
        disk = free_space(out)
        plan = build_plan(source, options, disk=disk, prove=False)  # proven beside the writing, before publishing
        for calibration in plan.calibrations:  # the dense model on the calibration text, once per cache key
            calibration.ensure(source.folder)
        origin = src if src.suffix.lower() == ".gguf" else None

        def prove_and_inspect(
            plan: UpcyclePlan, dense: DenseSource, folder: Path, tensors_written: Callable[[], object]
        ) -> None:
            prove_plan(plan, dense.config)
            inspect_written(plan, dense, folder, tensors_written)

        write = functools.partial(write_plan, source=source, out=out, force=force, progress=progress, origin=origin,
                                  hub=named)  # fmt: skip
        try:
            written = write(plan, inspect=prove_and_inspect)
        except NotProven:  # nothing was published: each candidate in turn, proven first (refused if none passes)
            plan = build_plan(source, options, disk=disk)
            written = write(plan, inspect=inspect_written)
    if plan.source.get("kind") == "folder":
        remember_source(plan.source, src)
    return ConvertResult(plan, out, written, time.perf_counter() - start)


def _source_key(source: dict) -> str:
    return hashlib.sha256(json.dumps(source.get("sha256") or {}, sort_keys=True).encode()).hexdigest()


def remember_source(source: dict, folder: Path) -> None:
    """Where a conversion's dense folder lies, kept on this machine by the sha256 of its files: the converted
    folder's own record names it by its last part only (the folder travels; see `redaction`)."""
    from upcycle.assets import cache_dir
    from upcycle.output_safety import write_json_atomically

    entry = cache_dir() / "sources" / f"{_source_key(source)}.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(entry, {"path": str(Path(folder).absolute())})


def local_source(source: dict) -> Path | None:
    """The dense folder a conversion recorded in ``source`` was made from, when this machine converted it and the
    folder is still there; None otherwise."""
    from upcycle.assets import cache_dir

    if not source.get("sha256"):
        return None
    try:
        folder = Path(json.loads((cache_dir() / "sources" / f"{_source_key(source)}.json").read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if (folder / "config.json").is_file() else None


__all__ = ["ConvertResult", "UpcycleOptions", "convert", "local_source"]
