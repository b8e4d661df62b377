"""The weight check: every MoE tensor re-made from the dense model with its recorded recipe, compared bit for bit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.recipe import TensorRecipe
from upcycle.convert.source import DenseSource


@dataclass
class WeightMismatch:
    tensor: str
    problem: str
    max_abs_diff: float = math.nan


@dataclass
class WeightReport:
    tensors_checked: int = 0
    mismatches: list[WeightMismatch] = field(default_factory=list)
    source_matches_provenance: bool | None = True  # None: the given dense model cannot be compared with the record

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.source_matches_provenance is not False


def check_weights(dense: DenseSource, moe: DenseSource, plan: UpcyclePlan, source_hashes: dict | None) -> WeightReport:
    """Re-make every planned tensor from the dense model and compare it bit for bit with the MoE file.

    `source_hashes` are the dense files' sha256 as found now (None: not computed); they must equal the ones
    recorded at conversion.
    """
    report = WeightReport()
    recorded = plan.source.get("sha256") or {}
    if source_hashes is None:
        report.source_matches_provenance = None
    elif recorded:
        report.source_matches_provenance = source_hashes == recorded
    planned = {recipe.name: recipe for recipe in plan.recipes}
    for name in sorted(set(moe.tensors) - set(planned)):
        report.mismatches.append(WeightMismatch(name, "not in the plan (unexpected tensor)"))
    read = CachedReader(dense.read)
    for name, recipe in planned.items():
        if name not in moe.tensors:
            report.mismatches.append(WeightMismatch(name, "missing from the checkpoint"))
            continue
        actual = moe.read(name)
        expected = materialize(recipe, read)
        report.tensors_checked += 1
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            report.mismatches.append(
                WeightMismatch(
                    name, f"is {list(actual.shape)} {actual.dtype}, planned {list(expected.shape)} {expected.dtype}"
                )
            )
        elif not torch.equal(actual, expected):
            diff = (actual.float() - expected.float()).abs().max().item()
            report.mismatches.append(WeightMismatch(name, _describe(recipe, actual), diff))
    return report


def _describe(recipe: TensorRecipe, actual: torch.Tensor) -> str:
    if recipe.op == "router" and recipe.group_size > 1:
        rows = actual.float().view(-1, recipe.group_size, actual.shape[-1])
        broken = (rows != rows[:, :1]).any(dim=-1).nonzero().tolist()
        if broken:
            group, member = broken[0]
            return (
                f"router row {group * recipe.group_size + member} breaks virtual group {group}: its rows must be "
                "identical so a token takes every shard of a copy"
            )
        return "router differs from its recorded initialisation"
    if recipe.op == "expert":
        what = "copy" if recipe.rows is None and recipe.cols is None else "shard"
        return f"expert {recipe.expert} ({recipe.projection}) is not the recorded {what} of {recipe.source}"
    if recipe.op == "copy":
        return f"differs from dense tensor {recipe.source}"
    return "differs from its recipe"
