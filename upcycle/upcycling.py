"""`convert`: plan a dense → MoE conversion, write it, check the written folder, and only then publish it.

It sits above both `upcycle.convert` (which plans and writes) and `upcycle.verify` (which checks), because two
facts about a conversion are only known once its files exist: whether its tokenizer and generation settings load
as the dense model's do, and how far a rounding to a narrower dtype moves the model (see `verify.written`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.convert.options import UpcycleOptions

if TYPE_CHECKING:
    from upcycle.convert.plan import UpcyclePlan
    from upcycle.convert.writer import Progress


@dataclass
class ConvertResult:
    plan: UpcyclePlan
    out: Path | None  # None for a dry run
    bytes_written: int
    seconds: float


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
) -> ConvertResult:
    """Upcycle SRC (HF folder, .gguf, or a Hub id at ``revision``) into OUT; a dry run plans and checks everything
    but writes nothing.

    OUT may not be SRC, lie inside it or contain it (for a .gguf SRC: the file), symlinks resolved; no flag
    overrides that, and a dry run refuses it too, since no real run could use that OUT. An existing OUT is
    replaced only with ``force``, atomically; a dry run does not check that (``--force`` can still fix it).
    """
    # Imported here so that importing this module (for UpcycleOptions, ConvertResult) does not bring torch.
    from upcycle.convert.plan import build_plan
    from upcycle.convert.source import open_source
    from upcycle.convert.targets import check_options
    from upcycle.convert.writer import check_output, write_plan
    from upcycle.hub import resolve_model
    from upcycle.output_safety import free_space, refuse_overlap
    from upcycle.verify.written import inspect_written

    start = time.perf_counter()
    options = options or UpcycleOptions()
    check_options(options)
    out = Path(out).absolute()
    named = resolve_model(src, revision)
    src = named.folder
    refuse_overlap(out, [("the source", src)])
    if not dry_run:
        check_output(out, force)
    with open_source(src, trust_remote_code, scratch=out.parent if out.parent.is_dir() else None) as source:
        plan = build_plan(source, options, disk=None if dry_run else free_space(out))
        if dry_run:
            return ConvertResult(plan, None, 0, time.perf_counter() - start)
        origin = src if src.suffix.lower() == ".gguf" else None
        written = write_plan(
            plan, source, out, force=force, progress=progress, origin=origin, inspect=inspect_written, hub=named
        )
    return ConvertResult(plan, out, written, time.perf_counter() - start)


__all__ = ["ConvertResult", "UpcycleOptions", "convert"]
