"""The shipped sweeps: the paper's training questions, each one command (``upcycle sweep --preset NAME``).

- ``lr``: the peak learning rate over a decade around the recipe's own (x1/3, x1, x10/3), with the dense control
  at each, because the paper finds the learning rate the knob that matters most when training an upcycle.
- ``capacity``: dropless against capacity factors 1.0, 1.25 and 2.0: held-out loss, tokens/s and the share of
  token-to-expert assignments each MoE layer dropped.
- ``experts``: E = 2, 4, 8 and 16 copies at top-2, with the dense control: where more experts stop paying.
- ``compare`` is the fourth: the paper's upcycling variants as named arms, ``upcycle compare``.

Each runs on a recipe (the shipped ``cpu-quickstart`` by default, or the user's own) at a size: ``cpu`` or
``gpu``, compare's sizes (:mod:`upcycle.experiments.sizes`), applied as the ``--set`` overrides :func:`size_sets`
lists, or ``recipe`` (the recipe's own batch, steps and schedule). Seeds go where the verdict is decided: every
setting at seed 0, then the best setting and its dense control at seed 1.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from upcycle.errors import OptionError
from upcycle.experiments.sizes import SIZES, Size
from upcycle.train.recipe import TrainRecipe

DEFAULT_RECIPE = "cpu-quickstart"
RECIPE_SIZE = "recipe"  # the recipe's own size: no overrides


@dataclass(frozen=True)
class Preset:
    """One shipped sweep: the question, the grid (made from the sized recipe), and how seeds are spent."""

    name: str
    question: str
    grid: Callable[[TrainRecipe], list[str]]  # --grid texts for the sized recipe
    with_dense: bool
    seeds: int = 2
    seeds_for: str = "best"
    sets: tuple[str, ...] = ()  # what the question holds fixed, whatever the recipe says


def _lr_grid(recipe: TrainRecipe) -> list[str]:
    lr = recipe.optim.lr
    values = [float(f"{lr * factor:.2g}") for factor in (1 / 3, 1.0, 10 / 3)]
    return ["optim.lr=" + ",".join(f"{v:g}" for v in values)]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "lr",
            "which peak learning rate, over a decade around the recipe's, trains the upcycle best?",
            _lr_grid,
            True,
        ),
        Preset(
            "capacity",
            "what does dropping tokens (a capacity factor) cost in held-out loss, and what does it buy in tokens/s?",
            lambda _recipe: ["moe.capacity_factor=null,1.0,1.25,2.0"],
            False,
        ),
        Preset(
            "experts",
            "how much does each doubling of the expert count (top-2) buy?",
            lambda _recipe: ["model.upcycle.experts=2,4,8,16"],
            True,
            sets=("model.upcycle.top_k=2", "model.upcycle.granularity=1"),
        ),
    )
}
COMPARE = "compare"  # the named-arm preset: `upcycle compare`


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        known = ", ".join([*PRESETS, COMPARE])
        raise OptionError(f"unknown preset {name!r}.", f"use one of {known}.")
    return PRESETS[name]


def size_sets(size: str | Size, upcycles: bool = True) -> list[str]:
    """A compare size as ``--set`` overrides of a recipe (``recipe``: none); ``upcycles``: it has model.upcycle."""
    if size == RECIPE_SIZE:
        return []
    if isinstance(size, str):
        if size not in SIZES:
            raise OptionError(f"unknown size {size!r}.", f"use one of {', '.join([*SIZES, RECIPE_SIZE])}.")
        size = SIZES[size]
    return [
        f"data.seq_len={size.seq_len}",
        f"data.eval_sequences={size.eval_sequences}",
        f"batch.micro_batch_size={size.micro_batch_size}",
        f"batch.grad_accum={size.grad_accum}",
        f"batch.steps={size.steps}",
        f"optim.lr={size.lr}",
        f"optim.min_lr={size.min_lr}",
        f"optim.warmup_steps={size.warmup_steps}",
        f"run.precision={size.precision}",
        f"run.eval_interval={size.eval_interval}",
        f"run.checkpoint_interval={max(1, size.steps // 2)}",  # a killed run resumes from half-way
        f"model.experts_implementation={size.experts_implementation}",
        *([f"model.upcycle.layers={size.moe_layers}"] if upcycles else []),
    ]


def describe_presets() -> list[str]:
    """One line per preset, for ``upcycle sweep --list-presets``."""
    lines = [f"{p.name}: {p.question}" for p in PRESETS.values()]
    lines.append(f"{COMPARE}: do the paper's upcycling variants beat the dense model? (upcycle compare)")
    return lines


@dataclass(frozen=True)
class SweepSettings:
    """A sweep's arguments once a preset and a size are applied: what `sweep.sweep_main` runs."""

    recipe: str
    grid: list[str]
    sets: list[str]
    with_dense: bool
    seeds: int | None
    seeds_for: str
    size: str

    def command(self, zip_axes: bool = False) -> str:
        """The same sweep as a plain ``upcycle sweep`` command line: no preset, no size, every override spelled."""
        parts = ["upcycle sweep", shlex.quote(self.recipe), *(f"--grid {shlex.quote(g)}" for g in self.grid)]
        parts += ["--zip"] if zip_axes else []
        parts += [f"--seeds {self.seeds}"] if self.seeds else []
        parts += [f"--seeds-for {self.seeds_for}"] if self.seeds_for != "all" else []
        parts += ["--with-dense"] if self.with_dense else []
        parts += [f"--set {shlex.quote(item)}" for item in self.sets]
        return " ".join(parts)


def sweep_settings(
    recipe: str | None,
    grid: list[str],
    sets: list[str],
    *,
    preset: str | None,
    size: str | None,
    seeds: int | None,
    seeds_for: str | None,
    with_dense: bool,
) -> SweepSettings:
    """The preset's grid, seeds and dense control, the size's overrides, then the user's ``--set`` (which win)."""
    from upcycle.train.overrides import split_override
    from upcycle.train.recipe import load_recipe
    from upcycle.train.shipped_recipes import find_recipe

    if preset is None:
        if recipe is None:
            raise OptionError("no recipe given.", "pass a recipe (upcycle recipes lists the shipped ones) or --preset.")
        size = size or RECIPE_SIZE
        sized = (
            size_sets(size, load_recipe(find_recipe(recipe)).model.upcycle is not None) if size != RECIPE_SIZE else []
        )
        return SweepSettings(recipe, grid, sized + sets, with_dense, seeds, seeds_for or "all", size)
    chosen = get_preset(preset)
    if grid:
        raise OptionError(f"--preset {preset} sets the grid itself.", "drop --grid, or drop --preset and give --grid.")
    recipe = recipe or DEFAULT_RECIPE
    size = size or ("cpu" if recipe == DEFAULT_RECIPE else RECIPE_SIZE)
    path = find_recipe(recipe)
    all_sets = [*size_sets(size, load_recipe(path).model.upcycle is not None), *chosen.sets, *sets]
    preset_grid = chosen.grid(load_recipe(path, all_sets))
    swept = {split_override(text)[0] for text in preset_grid}
    kept = [text for text in all_sets if split_override(text)[0] not in swept]  # the grid replaces them
    return SweepSettings(
        recipe,
        preset_grid,
        kept,
        chosen.with_dense or with_dense,
        seeds if seeds is not None else chosen.seeds,
        seeds_for or chosen.seeds_for,
        size,
    )
