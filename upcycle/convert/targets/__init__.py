"""The registry of native MoE targets and the choice of one for a dense model."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target
from upcycle.convert.targets.group_limited import Dots1Target, Glm4MoeTarget
from upcycle.convert.targets.mixtral import MixtralTarget
from upcycle.convert.targets.qwen_moe import Qwen2MoeTarget, Qwen3MoeTarget
from upcycle.errors import UnsupportedModelError

TARGETS: dict[str, Target] = {
    t.name: t for t in (MixtralTarget(), Qwen2MoeTarget(), Qwen3MoeTarget(), Glm4MoeTarget(), Dots1Target())
}


def preferred_target(dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str:
    """DESIGN.md's table: the simplest class that holds this model and these options exactly."""
    if opts.granularity > 1:
        return "dots1" if dense.qk_norm else "glm4_moe"
    if dense.family == "qwen3":
        return "qwen3_moe"
    if dense.family == "qwen2" or opts.router != "renorm" or not layout.all_moe:
        return "qwen2_moe"
    return "mixtral"


def candidate_targets(dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> list[Target]:
    """The classes that declare they can hold this model, the preferred one first (only the asked one if any).

    A declaration is not a proof: the plan keeps the first candidate whose config passes the config-equivalence
    check.
    """
    name = preferred_target(dense, opts, layout) if opts.target == "auto" else opts.target
    reason = TARGETS[name].why_not(dense, opts, layout)
    fits = [n for n, t in TARGETS.items() if t.why_not(dense, opts, layout) is None]
    if reason and (opts.target != "auto" or not fits):
        fix = f"use --target {' or '.join(fits)}." if fits else "change the options (see upcycle convert --help)."
        raise UnsupportedModelError(f"target {name} cannot hold this {dense.family} model exactly: {reason}.", fix)
    if opts.target != "auto":
        return [TARGETS[name]]
    return [TARGETS[n] for n in sorted(fits, key=lambda n: n != name)]


__all__ = ["TARGETS", "Layout", "Target", "candidate_targets", "preferred_target"]
