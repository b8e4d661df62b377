"""Dense → MoE conversion: plan it from headers and config, then stream it into a native HF checkpoint.

The options import alone (no torch): a recipe's ``model.upcycle`` is :class:`UpcycleOptions`, and reading a recipe
must stay quick. The conversion's modules load when :func:`convert`, ``build_plan`` or ``UpcyclePlan`` is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    src: Path,
    out: Path,
    options: UpcycleOptions | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Upcycle SRC (HF folder or .gguf) into OUT; a dry run plans and checks everything but writes nothing.

    OUT may not be SRC, lie inside it or contain it (for a .gguf SRC: the file), symlinks resolved; no flag
    overrides that, and a dry run refuses it too, since no real run could use that OUT. An existing OUT is
    replaced only with ``force``, atomically; a dry run does not check that (``--force`` can still fix it).
    """
    from upcycle.convert.plan import build_plan
    from upcycle.convert.source import open_source
    from upcycle.convert.targets import check_options
    from upcycle.convert.writer import check_output, write_plan
    from upcycle.output_safety import free_space, refuse_overlap

    start = time.perf_counter()
    options = options or UpcycleOptions()
    check_options(options)
    src, out = Path(src), Path(out).absolute()
    refuse_overlap(out, [("the source", src)])
    if not dry_run:
        check_output(out, force)
    with open_source(src, trust_remote_code, scratch=out.parent if out.parent.is_dir() else None) as source:
        plan = build_plan(source, options, disk=None if dry_run else free_space(out))
        if dry_run:
            return ConvertResult(plan, None, 0, time.perf_counter() - start)
        origin = src if src.suffix.lower() == ".gguf" else None
        from upcycle.verify.written import inspect_written  # verify's own checks, on the folder before it is published

        written = write_plan(plan, source, out, force=force, progress=progress, origin=origin, inspect=inspect_written)
    return ConvertResult(plan, out, written, time.perf_counter() - start)


def __getattr__(name: str) -> Any:
    """``UpcyclePlan`` and ``build_plan``, imported on first use (they bring torch)."""
    if name in ("UpcyclePlan", "build_plan"):
        from upcycle.convert import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConvertResult", "UpcycleOptions", "UpcyclePlan", "build_plan", "convert"]
