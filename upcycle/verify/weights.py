"""The weight check: every MoE tensor re-made from the dense model with its recorded recipe, compared bit for bit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from upcycle.convert.calibration import CalibrationMissing
from upcycle.convert.finite import non_finite_count
from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.source import SAFETENSORS_DTYPES, DenseSource
from upcycle.convert.tensor_recipe import TensorRecipe

CHUNK_BYTES = 64 * 1024**2  # rows compared at a time for copied tensors (embeddings, LM head)


@dataclass
class WeightMismatch:
    tensor: str
    problem: str
    max_abs_diff: float = math.nan
    non_finite: bool = False  # the tensor is its recipe's output bit for bit, but holds NaN or inf


@dataclass
class WeightReport:
    tensors_checked: int = 0
    mismatches: list[WeightMismatch] = field(default_factory=list)
    source_matches_provenance: bool | None = True  # None: the given dense model cannot be compared with the record
    not_remade: list[str] = field(default_factory=list)  # routers made from calibration data this machine lacks

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.source_matches_provenance is not False


def check_weights(dense: DenseSource, moe: DenseSource, plan: UpcyclePlan, source_hashes: dict | None) -> WeightReport:
    """Re-make every planned tensor from the dense model and compare it bit for bit with the MoE file.

    `source_hashes` are the dense files' sha256 as found now (None: not computed); they must equal the ones
    recorded at conversion.
    """
    return WeightChecker(dense, moe, plan).finish(source_hashes)


class WeightChecker:
    """The weight check, tensor by tensor, so a pass that already reads tensors (streaming) can feed it.

    `read_checked(name)` reads an MoE tensor, checks it against its recipe and returns it; dense tensors already in
    memory can be lent with `lend_dense`, so nothing is read twice. `finish()` checks whatever was not fed.
    """

    def __init__(self, dense: DenseSource, moe: DenseSource, plan: UpcyclePlan) -> None:
        self.dense, self.moe = dense, moe
        self.report = WeightReport()
        self.recorded_hashes = plan.source.get("sha256") or {}
        self.planned = {recipe.name: recipe for recipe in plan.recipes}
        self.done: set[str] = set()
        self.lent: dict[str, torch.Tensor] = {}
        self.read_dense = CachedReader(lambda name: self.lent[name] if name in self.lent else dense.read(name))
        for name in sorted(set(moe.tensors) - set(self.planned)):
            self.report.mismatches.append(WeightMismatch(name, "not in the plan (unexpected tensor)"))

    def layer_names(self, layer: int) -> list[str]:
        return [name for name, recipe in self.planned.items() if recipe.layer == layer]

    def lend_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        """Dense tensors (by checkpoint name, as stored) to use instead of reading them; replaces the last loan."""
        self.lent = tensors

    def read_checked(self, name: str) -> torch.Tensor:
        actual = self.moe.read(name)
        self.check(name, actual)
        return actual

    def check(self, name: str, actual: torch.Tensor | None = None) -> bool:
        """Check one planned tensor (read from the MoE file unless given); True when it matches its recipe."""
        if name in self.done or name not in self.planned:
            return name in self.done and not any(m.tensor == name for m in self.report.mismatches)
        self.done.add(name)
        self.report.tensors_checked += 1
        recipe = self.planned[name]
        if name not in self.moe.tensors:
            self.report.mismatches.append(WeightMismatch(name, "missing from the checkpoint"))
            return False
        if (
            actual is None
            and recipe.op == "copy"
            and recipe.rows is None
            and recipe.cols is None
            and recipe.source_rows is None
        ):
            problem = _copy_problem(self.dense, self.moe, recipe)  # in chunks: an embedding never sits whole in memory
            if problem is not None:
                self.report.mismatches.append(WeightMismatch(name, *problem))
            return problem is None
        actual = self.moe.read(name) if actual is None else actual
        try:
            expected = materialize(recipe, self.read_dense)
        except CalibrationMissing:  # the router does not decide the output of copies: the function check proves it
            self.report.not_remade.append(name)
            return True
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            problem = f"is {list(actual.shape)} {actual.dtype}, planned {list(expected.shape)} {expected.dtype}"
            self.report.mismatches.append(WeightMismatch(name, problem))
            return False
        if not same_bits(actual, expected):
            diff = (actual.float() - expected.float()).abs().max().item()
            self.report.mismatches.append(WeightMismatch(name, _describe(recipe, actual), diff))
            return False
        bad = non_finite_count(actual)
        if bad:  # the recorded copy of a source that holds NaN: identical, and still no model to prove
            self.report.mismatches.append(WeightMismatch(name, _non_finite_problem(bad, recipe), non_finite=True))
            return False
        return True

    def finish(self, source_hashes: dict | None) -> WeightReport:
        """Check every planned tensor not checked yet, and the dense files' sha256 (`source_hashes`, as found now;
        None: not comparable) against the record; the mismatches in plan order."""
        if source_hashes is None:
            self.report.source_matches_provenance = None
        elif self.recorded_hashes:
            self.report.source_matches_provenance = source_hashes == self.recorded_hashes
        self.lent = {}
        for name in self.planned:
            self.check(name)
        order = {name: i for i, name in enumerate(self.planned)}
        self.report.mismatches.sort(key=lambda m: order.get(m.tensor, -1))
        return self.report


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: a NaN equals the same NaN (torch.equal says NaN != NaN), and -0.0 differs from 0.0."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def tensor_difference(
    a: DenseSource, a_name: str, b: DenseSource, b_name: str, dtype: torch.dtype, non_finite: list[int] | None = None
) -> float | None:
    """None when tensor `a_name` cast to `dtype` equals `b_name` bit for bit, else the largest difference.

    Both are read in chunks of rows, each byte once, so an embedding table or LM head never sits whole in memory.
    `non_finite`, when given, receives the count of NaN/inf values in `b_name`.
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
        if non_finite is not None:
            non_finite.append(non_finite_count(actual))
        if not same_bits(expected, actual):
            diff = (expected.float() - actual.float()).abs().max().item()
            worst = diff if worst is None else max(worst, diff)
    return worst


def _copy_problem(dense: DenseSource, moe: DenseSource, recipe: TensorRecipe) -> tuple[str, float, bool] | None:
    assert recipe.source is not None
    dtype = SAFETENSORS_DTYPES[recipe.dtype]
    info = moe.tensors[recipe.name]
    if info.shape != tuple(recipe.shape) or info.dtype != dtype:
        return f"is {list(info.shape)} {info.dtype}, planned {list(recipe.shape)} {dtype}", math.nan, False
    counts: list[int] = []
    diff = tensor_difference(dense, recipe.source, moe, recipe.name, dtype, counts)
    if diff is not None:
        return _describe(recipe, None), diff, False
    return (_non_finite_problem(sum(counts), recipe), math.nan, True) if sum(counts) else None


def _non_finite_problem(count: int, recipe: TensorRecipe) -> str:
    origin = f" (bit-identical to its recipe from {recipe.source}, which holds them)" if recipe.source else ""
    return f"holds {count} NaN/inf value(s){origin}: a model with non-finite weights is never equivalent"


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
