"""The registry of native MoE targets and the choice of one for a dense model."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Layout, Target
from upcycle.convert.targets.cohere2_moe import Cohere2MoeTarget
from upcycle.convert.targets.ernie4_5_moe import Ernie45MoeTarget
from upcycle.convert.targets.flex_olmo import FlexOlmoTarget
from upcycle.convert.targets.granitemoe import GraniteMoeSwaTarget, GraniteMoeTarget
from upcycle.convert.targets.group_limited import Dots1Target, Glm4MoeTarget
from upcycle.convert.targets.hunyuan_v1_moe import HunyuanMoeTarget
from upcycle.convert.targets.lfm2_moe import Lfm2MoeTarget
from upcycle.convert.targets.mixtral import MixtralTarget
from upcycle.convert.targets.qwen_moe import Qwen2MoeTarget, Qwen3MoeTarget
from upcycle.errors import OptionError, UnsupportedModelError

# The one list of target classes: the CLI, `check_options` and `upcycle families` read it.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        MixtralTarget(), Qwen2MoeTarget(), Qwen3MoeTarget(), Glm4MoeTarget(), Dots1Target(), FlexOlmoTarget(),
        Ernie45MoeTarget(), HunyuanMoeTarget(), Cohere2MoeTarget(), GraniteMoeTarget(), GraniteMoeSwaTarget(),
        Lfm2MoeTarget(),
    )
}  # fmt: skip


def check_options(opts: UpcycleOptions) -> None:
    """The options' own checks, and that a named target exists (the options sit below the targets: not there)."""
    opts.validate()
    if opts.target != "auto" and opts.target not in TARGETS:
        raise OptionError(f"unknown --target {opts.target!r}.", f"choose auto or one of: {', '.join(TARGETS)}.")


def preferred_target(dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str:
    """The first of the family's homes (its own order: simplest class first) that holds these options exactly."""
    for name in dense.spec.targets:
        if TARGETS[name].why_not(dense, opts, layout) is None:
            return name
    return next(n for n, t in TARGETS.items() if t.why_not(dense, opts, layout) is None)


def candidate_targets(dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> list[Target]:
    """The classes that declare they can hold this model, the preferred one first (only the asked one if any).

    A declaration is not a proof: the plan keeps the first candidate whose config passes the config-equivalence
    check.
    """
    fits = [n for n, t in TARGETS.items() if t.why_not(dense, opts, layout) is None]
    if opts.target == "auto" and not fits:
        reasons = "; ".join(f"{n}: {TARGETS[n].why_not(dense, opts, layout)}" for n in dense.spec.targets)
        raise UnsupportedModelError(
            f"no native MoE class holds this {dense.title} model with these options exactly ({reasons}).",
            "change the options (see upcycle convert --help and upcycle families).",
        )
    name = preferred_target(dense, opts, layout) if opts.target == "auto" else opts.target
    reason = TARGETS[name].why_not(dense, opts, layout)
    if reason:
        fix = f"use --target {' or '.join(fits)}." if fits else "change the options (see upcycle convert --help)."
        raise UnsupportedModelError(f"target {name} cannot hold this {dense.title} model exactly: {reason}.", fix)
    if opts.target != "auto":
        return [TARGETS[name]]
    return [TARGETS[n] for n in sorted(fits, key=lambda n: n != name)]


__all__ = ["TARGETS", "Layout", "Target", "candidate_targets", "check_options", "preferred_target"]
