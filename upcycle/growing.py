"""`grow`: an MoE with m times the experts that computes what the original computes, written like a conversion.

The plan copies each expert m times and raises top-k m times (`convert.grow`); before anything is written, two
independent checks must agree that transformers computes the same from both configs: the config probe (attention,
norms, rotary tables, masks, generation) and the block probe (the MoE block itself, at small widths, from both
configs). The writer, its atomic publish and the written-folder inspection are the conversion's own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.convert.result import Written
from upcycle.errors import UnsupportedModelError

if TYPE_CHECKING:
    from upcycle.convert.grow.plan import GrowPlan
    from upcycle.convert.writer import Progress


def grow(
    src: Path | str,
    out: Path,
    factor: int,
    *,
    shard_size: int = 2 * 1000**3,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    revision: str | None = None,
) -> Written[GrowPlan]:
    """Grow the MoE at SRC (folder or Hub id) to `factor` times its experts, into OUT."""
    from upcycle.hub import resolve_model
    from upcycle.model_files import check_source_path
    from upcycle.output_safety import refuse_overlap

    start = time.perf_counter()
    out = Path(out).absolute()
    named = resolve_model(src, revision)
    src = named.folder
    check_source_path(src)
    refuse_overlap(out, [("the source", src)])
    from upcycle.convert.grow.plan import build_grow_plan
    from upcycle.convert.source import DenseSource
    from upcycle.convert.writer import check_output, write_plan
    from upcycle.verify.written import inspect_written

    if not dry_run:
        check_output(out, force)
    source = DenseSource.open(src)
    plan = build_grow_plan(source, factor, shard_size)
    plan.config_check = prove_growth(source.config, plan.config, factor, plan.growth["tied_groups"])
    if dry_run:
        return Written(plan, None, 0, time.perf_counter() - start)
    written = write_plan(plan, source, out, force=force, progress=progress, inspect=inspect_written, hub=named)
    return Written(plan, out, written, time.perf_counter() - start)


def prove_growth(config: dict, grown: dict, factor: int, tied_groups: int = 0) -> dict:
    """The config probe and the block probe on both configs; refuse (nothing written) unless both agree."""
    from upcycle.hf.config_check import check_config_equivalence
    from upcycle.hf.moe_block_probe import TOLERANCE, probe_grown_block

    report = check_config_equivalence(config, grown, source_is_moe=True)
    if not report.equivalent:
        raise UnsupportedModelError(
            f"the grown config does not compute what the original does ({report.first_problem}).",
            "nothing was written; this class cannot grow exactly.",
        )
    block = probe_grown_block(config, grown, factor, tied_groups)
    if not block.equivalent:
        why = block.problem or f"relative difference {block.relative_difference:.3g} > {TOLERANCE:g}"
        raise UnsupportedModelError(
            f"transformers' {block.block or 'MoE block'} does not compute the same with {factor}x the experts ({why}).",
            "nothing was written; this class cannot grow exactly.",
        )
    block_record = {"class": block.block, "relative_difference": block.relative_difference, "tolerance": TOLERANCE}
    return report.record() | {"block": block_record}


__all__ = ["grow", "prove_growth"]
