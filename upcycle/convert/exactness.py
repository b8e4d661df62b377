"""The exactness claim of a plan, and what makes one exact only up to rounding: the paper's expert scaling
factors, narrowing casts, and copies scaled into 16-bit dtypes. `verify` re-derives the rounding from the headers
and the recipes, rather than trusting the label.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from upcycle.convert.options import UpcycleOptions
from upcycle.convert.source import DTYPE_CODES, DenseSource
from upcycle.convert.tensor_recipe import TensorRecipe

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


CODE_NAMES = {code: name for name, code in DTYPE_NAMES.items()}


@dataclass
class Exactness:
    """Whether the MoE equals the dense model at init, and why not when it does not.

    `exact` means the same numbers as the dense model as stored. A conversion whose method is exact but that
    rounds some source tensors to a narrower dtype is not exact: it is exact up to rounding to `rounded_to`, and the
    deviation the rounding causes is measured at convert time (`rounding_deviation`).
    """

    exact: bool
    method: str
    notes: list[str] = field(default_factory=list)
    rounded_to: str | None = None  # the output dtype some source values were rounded to
    exact_up_to_rounding: bool = False  # the method is exact; only the rounding separates the MoE from the dense
    rounding_deviation: dict | None = None  # measured after writing: {"relative": ..., "what": ..., "tokens": ...}

    @property
    def label(self) -> str:
        if self.exact:
            return "exact"
        if self.exact_up_to_rounding:
            return f"exact up to rounding to {self.rounded_to}"
        return "approximate by design"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Exactness:
        """Read a record; fields added since (rounding) take their defaults when an older upcycle wrote it."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def expert_scales(opts: UpcycleOptions) -> tuple[tuple[float, float, float], Exactness]:
    """(gate, up, down) weight factors and the exactness they leave.

    A factor s on an expert's output goes on the linear path of the gated MLP only: sqrt(s) on up and on down
    multiplies the output by exactly s, because the gate sits inside the nonlinearity (SiLU(s^a x) != s^a SiLU(x)).
    The paper's s^(1/3) on every matrix is its rule for a two-matrix squared-ReLU MLP, not for SwiGLU.
    """
    override = opts.weight_scale_factor_override()
    if opts.router == "renorm":
        if override is None:
            method = "renormalised router, copies" + (" in virtual groups" if opts.granularity > 1 else "")
            return (1.0, 1.0, 1.0), Exactness(True, method)
        return _linear_path(override), Exactness(
            False,
            f"renormalised router with weight scale {override:g}",
            [f"up and down scaled by sqrt({override:g}): every expert's output is {override:g} x the dense MLP's"],
        )
    if opts.weight_scale == "none":
        return (1.0, 1.0, 1.0), Exactness(
            False,
            "softmax-topk router without weight scaling",
            ["the selected router probabilities sum to less than 1, so the MLP output shrinks"],
        )
    uniform = opts.experts / opts.top_k  # G = 1 here: k selected weights of 1/E each sum to k/E
    if opts.router_init == "zero" and override is None:
        method = f"softmax-topk, zero router, down_proj x E/k = {uniform:g}"
        return (1.0, 1.0, uniform), Exactness(True, method, _rounding_notes(opts.num_experts, opts.top_k))
    factor = override if override is not None else opts.experts * opts.granularity**2 / opts.top_k
    scales = _linear_path(factor)
    linear = f"up and down scaled by sqrt(s) = {math.sqrt(factor):.4f}: every expert's output is s x the dense MLP's"
    if opts.router_init == "zero":
        if math.isclose(factor, uniform, rel_tol=1e-12):
            return scales, Exactness(True, f"softmax-topk, zero router, weight scale s = E/k = {factor:g}", [linear])
        return scales, Exactness(
            False,
            f"softmax-topk, zero router, weight scale s = {factor:g}",
            [linear, f"the uniform router's k weights sum to k/E, so the output is {factor / uniform:g} x the dense"],
        )
    return scales, Exactness(
        False,
        f"softmax-topk with the paper's weight scaling s = {factor:g}",
        [linear, "the router is not uniform, so the selected probabilities do not sum to k/E exactly"],
    )


def _linear_path(factor: float) -> tuple[float, float, float]:
    root = math.sqrt(factor)
    return (1.0, root, root)


def _rounding_notes(num_experts: int, top_k: int) -> list[str]:
    """Measured with transformers' eager and grouped_mm experts (E up to 64): the k weighted copies sum back to the
    dense output bit for bit only when every term and partial sum is a power-of-two multiple of it."""
    if _power_of_two(num_experts) and _power_of_two(top_k) and top_k <= 4:
        return ["bit-exact: E and k are powers of two and k <= 4"]
    return [
        "equal up to float rounding (about 1e-6 relative in fp32); bit-exact only when E and k are powers of two "
        "and k <= 4"
    ]


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


LOSSLESS_CASTS = {("BF16", "F32"), ("F16", "F32")}  # every value of the first is a value of the second


def leaf_recipes(recipe: TensorRecipe) -> list[TensorRecipe]:
    """The recipes that read a source tensor behind one output tensor (a stacked tensor has one per part)."""
    if recipe.op == "stack":
        return [leaf for part in recipe.parts for leaf in leaf_recipes(part)]
    return [recipe] if recipe.source is not None else []


@dataclass(frozen=True)
class Rounding:
    """The source tensors a conversion rounds, and the output dtypes their rounded values are stored in."""

    narrowed: tuple[str, ...]  # stored in a dtype the output dtype cannot hold exactly
    scaled: tuple[str, ...]  # copied with a factor that is not a power of two into a 16-bit dtype
    into: tuple[str, ...]  # dtype names, e.g. ("bfloat16",)

    def __bool__(self) -> bool:
        return bool(self.narrowed or self.scaled)


def rounded_sources(source: DenseSource, recipes: list[TensorRecipe]) -> Rounding:
    """The source tensors a conversion rounds, from the headers and the recipes alone (so verify re-derives it
    rather than trusting a label): a narrowing cast, or a copy scaled by a factor that is not a power of two into a
    16-bit dtype (x * 3 is rarely a bf16 value; in fp32 the rounding stays near 1e-7 and the plan's notes say so)."""
    narrowed, scaled, into = set(), set(), set()
    for leaf in (leaf for recipe in recipes for leaf in leaf_recipes(recipe)):
        stored = DTYPE_CODES.get(source.tensors[leaf.source].dtype, "?")
        if stored != leaf.dtype and (stored, leaf.dtype) not in LOSSLESS_CASTS:
            narrowed.add(leaf.source)
            into.add(leaf.dtype)
        elif leaf.dtype in ("BF16", "F16") and math.frexp(leaf.scale)[0] != 0.5:
            scaled.add(leaf.source)
            into.add(leaf.dtype)
    names = tuple(sorted(CODE_NAMES.get(code, code) for code in into))
    return Rounding(tuple(sorted(narrowed)), tuple(sorted(scaled)), names)


def mark_rounding(exactness: Exactness, rounding: Rounding) -> None:
    """An exact method that rounds is exact up to rounding, with notes naming what is rounded and into what."""
    if not rounding:
        return
    exactness.exact_up_to_rounding = exactness.exact
    exactness.exact = False
    exactness.rounded_to = " and ".join(rounding.into)
    if rounding.narrowed:
        exactness.notes.append(
            f"{_some(rounding.narrowed)} are stored in a dtype that {exactness.rounded_to} cannot hold exactly: the "
            f"MoE holds their values rounded to {exactness.rounded_to}, not the dense model's"
        )
    if rounding.scaled:
        exactness.notes.append(
            f"the experts' copies of {_some(rounding.scaled)} are scaled by a factor that is not a power of two and "
            f"rounded to {exactness.rounded_to}"
        )


def _some(names: tuple[str, ...]) -> str:
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{len(names)} source tensor(s) ({', '.join(names[:2])}{more})"
