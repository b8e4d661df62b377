"""The grid's points as validated recipes, every one checked before anything runs.

Each point is the recipe file with ``--set`` and then the point's ``--grid`` values applied, loaded by
:func:`~upcycle.train.recipe.load_recipe` itself: a point is exactly as valid as ``upcycle train RECIPE --set
...`` with those values, and an invalid one stops the sweep at once, the error naming the point's keys and
values. A recipe that upcycles ``model.source`` is also planned (``convert --dry-run``: headers and config only)
once per distinct conversion, so an option the model cannot take (layers it lacks, a target it cannot become)
stops the sweep before its first run too, not after the runs before it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError, UpcycleError
from upcycle.experiments.control import applies_to_dense, check_control_keys, dense_recipe
from upcycle.experiments.grid import SWEEP_OWNED, Axis, combine
from upcycle.experiments.naming import label, point_text, run_name, variant_name
from upcycle.train.overrides import split_override
from upcycle.train.recipe import TrainRecipe, load_recipe


@dataclass(frozen=True)
class Point:
    """One setting of the swept keys: its values as the recipe reads them, and the recipe it makes."""

    values: dict[str, Any]  # swept key -> validated value (``3e-4`` typed reads 0.0003), in grid order
    recipe: TrainRecipe  # the recipe with --set and this point applied; its run settings are the sweep's to set
    control: bool = False  # the dense control (--with-dense) rather than a point of the grid
    overrides: tuple[str, ...] = field(default=(), compare=False)  # the grid's values as typed, as --set takes them
    arm: str | None = None  # a named arm (compare's variants and recipes): its name replaces the values'
    arm_label: str | None = None

    @property
    def name(self) -> str:
        return self.arm or variant_name(self.values, self.control)

    @property
    def label(self) -> str:
        return self.arm_label or label(self.values, self.control)

    def run_name(self, seed: int) -> str:
        """The run folder's name: ``optim.lr=0.0003,seed=0`` for a grid point, ``NAME-sSEED`` for a named arm."""
        return f"{self.arm}-s{seed}" if self.arm else run_name(self.values, seed, self.control)


def recipe_value(recipe: TrainRecipe, key: str) -> Any:
    """The value of a dotted key in a recipe, JSON-plain (``optim.betas`` is a list, ``model.upcycle`` a mapping)."""
    value: Any = recipe.to_dict()
    for part in key.split("."):
        value = value[part]
    return json.loads(json.dumps(value))


def grid_points(
    recipe_path: Path,
    axes: Sequence[Axis],
    *,
    zip_axes: bool = False,
    sets: Sequence[str] = (),
    with_dense: bool = False,
) -> list[Point]:
    """Every point of the grid as a validated recipe, the dense controls first (``with_dense``)."""
    keys = [a.key for a in axes]
    for item in sets:
        key, _ = split_override(item)
        if key in keys:
            raise OptionError(f"--set {key} and --grid {key} are both given.", f"keep one of them for {key}.")
        if key in SWEEP_OWNED:
            raise OptionError(f"--set {key}: the sweep sets {key} itself ({SWEEP_OWNED[key]}).", "remove this --set.")
    points = []
    for overrides in combine(axes, zip_axes):
        recipe = _load(recipe_path, sets, overrides)
        values = {key: recipe_value(recipe, key) for key in keys}
        twin = next((p for p in points if p.values == values), None)
        if twin is not None:
            raise OptionError(
                f"--grid points {', '.join(twin.overrides)} and {', '.join(overrides)} are the same setting "
                f"({point_text(values)}).",
                "list each value once.",
            )
        points.append(Point(values, recipe, overrides=overrides))
    plan_conversions(points)
    if not with_dense:
        return points
    check_control_keys(keys)
    controls: list[Point] = []
    for point in points:
        overrides = tuple(o for o in point.overrides if applies_to_dense(o.partition("=")[0].strip()))
        values = {k: v for k, v in point.values.items() if applies_to_dense(k)}
        if any(c.values == values for c in controls):
            continue
        recipe = dense_recipe(_load(recipe_path, sets, overrides))
        controls.append(Point(values, recipe, control=True, overrides=overrides))
    return controls + points


def _load(recipe_path: Path, sets: Sequence[str], overrides: Sequence[str]) -> TrainRecipe:
    """The recipe with --set and a point's values applied, validated; an error names the point."""
    try:
        return load_recipe(recipe_path, [*sets, *overrides])
    except OptionError as error:
        if not overrides:
            raise
        raise OptionError(f"--grid {', '.join(overrides)}: {error.problem}", error.fix) from None


def plan_conversions(points: Sequence[Point]) -> None:
    """Plan each distinct conversion the points ask for (nothing written): the model must take its options."""
    from upcycle.train.conversion import planned_config

    planned: list[tuple[Any, ...]] = []
    for point in points:
        model = point.recipe.model
        if model.source is None or model.upcycle is None:
            continue
        what = (model.source, model.upcycle, model.trust_remote_code)
        if what in planned:
            continue
        planned.append(what)
        try:
            planned_config(point.recipe)
        except UpcycleError as error:
            where = f"--grid {', '.join(point.overrides)}: " if point.overrides else ""
            raise OptionError(f"{where}model.upcycle: {error.problem}", error.fix) from None
