"""The weight check: every MoE tensor re-made from the dense model with its recorded recipe, compared bit for bit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.recipe import TensorRecipe
from upcycle.convert.source import SAFETENSORS_DTYPES, DenseSource

CHUNK_BYTES = 64 * 1024**2  # rows compared at a time for copied tensors (embeddings, LM head)


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
        if recipe.op == "copy" and recipe.rows is None and recipe.cols is None:  # compared in chunks: any size
            report.tensors_checked += 1
            problem = _copy_problem(dense, moe, recipe)
            if problem is not None:
                report.mismatches.append(WeightMismatch(name, *problem))
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


def tensor_difference(a: DenseSource, a_name: str, b: DenseSource, b_name: str, dtype: torch.dtype) -> float | None:
    """None when tensor `a_name` cast to `dtype` equals `b_name` bit for bit, else the largest difference.

    Both are read in chunks of rows, each byte once, so an embedding table or LM head never sits whole in memory.
    """
    info_a, info_b = a.tensors[a_name], b.tensors[b_name]
    if info_a.shape != info_b.shape or info_b.dtype != dtype:
        return math.inf
    rows = info_a.shape[0] if info_a.shape else 1
    step = max(1, CHUNK_BYTES // max(1, info_a.nbytes // max(rows, 1)))
    worst = None
    for begin in range(0, rows, step):
        expected = a.read_rows(a_name, begin, begin + step).to(dtype)
        actual = b.read_rows(b_name, begin, begin + step)
        if not torch.equal(expected, actual):
            diff = (expected.float() - actual.float()).abs().max().item()
            worst = diff if worst is None else max(worst, diff)
    return worst


def _copy_problem(dense: DenseSource, moe: DenseSource, recipe: TensorRecipe) -> tuple[str, float] | None:
    assert recipe.source is not None
    dtype = SAFETENSORS_DTYPES[recipe.dtype]
    info = moe.tensors[recipe.name]
    if info.shape != tuple(recipe.shape) or info.dtype != dtype:
        return f"is {list(info.shape)} {info.dtype}, planned {list(recipe.shape)} {dtype}", math.nan
    diff = tensor_difference(dense, recipe.source, moe, recipe.name, dtype)
    return None if diff is None else (_describe(recipe, None), diff)


def _describe(recipe: TensorRecipe, actual: torch.Tensor | None) -> str:
    if recipe.op == "router" and recipe.group_size > 1 and actual is not None:
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
