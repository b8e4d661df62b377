"""`merge`: an MoE whose experts are the MLPs of several dense models, from a mergekit-moe YAML file.

Everything but the experts and routers is the base model's, and the base is planned and proven as a conversion
is (the target computes what the base computes outside its MLPs); the writer, its atomic publish and the check of
the tokenizer and generation files are the conversion's own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.convert.result import Written

if TYPE_CHECKING:
    from collections.abc import Callable

    from upcycle.convert.merge.plan import MergePlan
    from upcycle.convert.source import DenseSource
    from upcycle.convert.writer import Progress


def merge(
    config: Path,
    out: Path,
    *,
    seed: int = 0,
    shard_size: int = 2 * 1000**3,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Written[MergePlan]:
    """Merge the models CONFIG names into OUT (a dry run plans, proves and writes nothing)."""
    from upcycle.convert.merge.plan import build_merge_plan
    from upcycle.convert.merge.sources import open_merge_sources
    from upcycle.convert.merge.spec import read_merge_spec
    from upcycle.convert.source import in_background
    from upcycle.convert.writer import check_output, write_plan
    from upcycle.output_safety import refuse_overlap
    from upcycle.verify.written import refuse_other_files

    start = time.perf_counter()
    out = Path(out).absolute()
    spec = read_merge_spec(Path(config))
    base, experts, shared, names = open_merge_sources(spec)
    refuse_overlap(out, [(f"the model {name}", model.folder) for name, model in _named(base, experts, shared)])
    if not dry_run:
        check_output(out, force)
    plan, source = build_merge_plan(spec, base, experts, shared, names, seed, shard_size)
    if dry_run:
        return Written(plan, None, 0, time.perf_counter() - start)
    for calibration in plan.calibrations:  # the gate rows: the base model on the prompts, once per cache key
        calibration.ensure(base.folder)
    models = [(key, model) for key, model in _named(base, experts, shared) if key != "base_model"]
    hashes = in_background(lambda: source_hashes(models))  # beside the writing, which hashes the base

    def inspect(plan: MergePlan, dense: DenseSource, folder: Path, tensors_written: Callable[[], object]) -> None:
        refuse_other_files(plan, dense, folder)
        plan.merge["sources_sha256"] = hashes()

    written = write_plan(plan, source, out, force=force, progress=progress, inspect=inspect)
    return Written(plan, out, written, time.perf_counter() - start)


def source_hashes(models: list[tuple[str, DenseSource]]) -> dict[str, dict[str, str]]:
    """Each expert model's weight files and config, by sha256, under the merge config's name for it."""
    from upcycle.convert.source import hash_files

    return {key: hash_files([*model.weight_files, model.folder / "config.json"], True) for key, model in models}


def _named(base: DenseSource, experts: list[DenseSource], shared: list[DenseSource]) -> list[tuple[str, DenseSource]]:
    models = [("base_model", base)] + [(f"experts[{i}]", m) for i, m in enumerate(experts)]
    return models + [(f"shared_experts[{i}]", m) for i, m in enumerate(shared)]


__all__ = ["merge"]
