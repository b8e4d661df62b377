"""The arms of a comparison: the dense control and the paper's upcycles of it, or user recipes, one arm each.

An arm says what differs between runs (the convert options, or a whole recipe's model, data, optimiser and MoE
settings); what must stay equal across arms comes from the size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.experiments.flops import model_cost
from upcycle.experiments.paper_recipe import sized, with_upcycle
from upcycle.experiments.points import Point
from upcycle.experiments.sizes import Size
from upcycle.train.recipe import TrainRecipe, load_recipe
from upcycle.train.shipped_recipes import find_recipe


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: the dense control (no options, no recipe), an upcycle of it, or a user recipe."""

    name: str
    label: str  # as in the paper's tables
    options: dict[str, Any] | None = None  # UpcycleOptions fields; None = the dense model itself
    recipe: TrainRecipe | None = None  # a user recipe (then the model is its model.path, no conversion)
    random_init: bool = False  # the upcycle's architecture trained from fresh weights (model.init random)

    @property
    def is_dense(self) -> bool:
        return self.options is None and self.recipe is None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("dense", "Dense (continued training)"),
        Variant("e8g1t2-renorm", "E8G1T2, topK-then-softmax (renormalised)", {"experts": 8, "top_k": 2}),
        Variant(
            "e8g1t2-softmax",
            "E8G1T2, softmax-then-topK + weight scaling",
            {"experts": 8, "top_k": 2, "router": "softmax-topk"},
        ),
        Variant("e8g8t8", "E8G8T8, virtual groups", {"experts": 8, "granularity": 8, "top_k": 8}),
        Variant("drop-upcycling", "E8G1T2, Drop-Upcycling r=0.5", {"experts": 8, "top_k": 2, "drop_upcycling": 0.5}),
        Variant("e8g1t2-random", "E8G1T2 from a random initialisation", {"experts": 8, "top_k": 2}, random_init=True),
    )
}
DEFAULT_VARIANTS = ("dense", "e8g1t2-renorm", "e8g1t2-softmax", "e8g8t8")  # e8g1t2-random: asked by name


def recipe_variant(path: Path | str) -> Variant:
    """A user recipe as one arm: its model, data, optimiser and MoE settings; the size sets batch and evaluation."""
    recipe = load_recipe(find_recipe(path))  # a file or a shipped recipe's name; validated, its paths resolved
    stem = Path(path).stem
    return Variant(stem, f"{stem} (recipe)", recipe=recipe)


def choose_arms(recipes: Sequence[Path | str], variants: Sequence[str] | None) -> list[Variant]:
    """One arm per recipe, or the named paper variants (default :data:`DEFAULT_VARIANTS`), dense control first."""
    if recipes:
        if variants:
            raise OptionError("give recipes or variants, not both.", "drop --variants when passing recipes.")
        return [recipe_variant(r) for r in recipes]
    names = list(variants or DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise OptionError(f"unknown variant {unknown[0]!r}.", f"use some of {', '.join(VARIANTS)}.")
    if "dense" not in names:
        names.insert(0, "dense")
    return [VARIANTS[n] for n in names]


def control_arm(arms: Sequence[Variant]) -> Variant:
    """The arm the others are measured against: the dense model, a recipe whose model has no experts, or the first."""
    return next((a for a in arms if a.is_dense), None) or next((a for a in arms if _is_dense_recipe(a)), arms[0])


def _is_dense_recipe(arm: Variant) -> bool:
    if arm.recipe is None or arm.recipe.model.upcycle is not None:
        return False
    try:
        return model_cost(arm.recipe.model.path).experts == 0
    except Exception:  # noqa: BLE001 - a model we cannot count is not taken for the control
        return False


def arm_points(arms: Sequence[Variant], control: Variant, size: Size, paper: TrainRecipe | None) -> list[Point]:
    """Each arm as a named point of a sweep: its recipe at the size (the paper's arms on ``paper``), the control marked.

    A paper upcycle is the paper recipe with ``model.source`` = its dense model and the variant's options as
    ``model.upcycle`` (float32, the size's MoE layers): converted once per seed into the verified cache.
    """
    points = []
    for arm in arms:
        if arm.recipe is not None:
            recipe = sized(arm.recipe, size)
        elif paper is None:
            raise ValueError(f"arm {arm.name} needs the paper's base recipe")  # a programming error
        elif arm.is_dense:
            recipe = paper
        else:
            recipe = with_upcycle(paper, {**(arm.options or {}), "dtype": "float32", "layers": size.moe_layers})
            if arm.random_init:
                recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, init="random"))
        points.append(Point({}, recipe, control=arm is control, arm=arm.name, arm_label=arm.label))
    return points
