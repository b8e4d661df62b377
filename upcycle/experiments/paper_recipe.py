"""A comparison's runs as training recipes: one base recipe per arm, each run derived from it.

The paper's arms share one base recipe, the shipped `paper-e8g1t2` (its optimiser and the paper's router losses),
with the dense model or its upcycle, the fixed text and the size's learning-rate schedule; a user recipe is its
own base (its model, data, optimiser and MoE settings). :func:`sized` then sets what must be equal across arms
(sequence length, batch, steps, evaluation) and the run section, so every run of a comparison sees the same
tokens. Runs are :class:`TrainRecipe` objects throughout: what a recipe is, and how it is checked, is defined
once, in :mod:`upcycle.train.recipe`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.convert.options import UpcycleOptions
from upcycle.experiments.sizes import Size
from upcycle.train.recipe import TrainRecipe, load_recipe
from upcycle.train.recipe_paths import data_files
from upcycle.train.recipe_sections import BatchSection, DataSection, ModelSection, RunSection
from upcycle.train.shipped_recipes import find_recipe

DataEntries = str | Path | Sequence[str | Path]
"""Training or held-out text as compare takes it: files, folders, globs or ``asset:`` names."""

PAPER_RECIPE = "paper-e8g1t2"
"""The shipped recipe of the paper's settings (optimiser, router losses): every paper arm derives from it, with
its model, text, batch, evaluation and learning-rate schedule set by the comparison's size."""


def paper_settings() -> TrainRecipe:
    """The shipped paper recipe, its `asset:` names kept (nothing is fetched for settings that are replaced)."""
    return load_recipe(find_recipe(PAPER_RECIPE), resolve_assets=False)


def measurement_run(output_dir: Path | str, seed: int, precision: str = "auto", eval_interval: int = 0) -> RunSection:
    """A run that only measures: metrics every step, and no checkpoint, export or TensorBoard to wait for."""
    return RunSection(
        output_dir=str(output_dir),
        seed=seed,
        precision=precision,
        eval_interval=eval_interval,
        checkpoints=False,
        export=False,
        tensorboard=False,
        log_interval=1,
    )


def paper_recipe(size: Size, model: Path, train: DataEntries, heldout: DataEntries, runs_dir: Path) -> TrainRecipe:
    """The recipe every paper arm trains with (an upcycle swaps in its own model folder).

    Data entries are expanded into absolute files here, once, so every run reads the same files whatever process
    runs it; relative paths are taken against the current directory, as any command-line path.
    """
    cwd = Path.cwd()
    paper = paper_settings()
    return dataclasses.replace(
        paper,
        model=ModelSection(path=str(model), experts_implementation=size.experts_implementation),
        data=DataSection(
            train=data_files(_entries(train), "data.train", cwd, resolve_assets=True),
            eval=data_files(_entries(heldout), "data.eval", cwd, resolve_assets=True),
            seq_len=size.seq_len,
            eval_sequences=size.eval_sequences,
        ),
        batch=size_batch(size),
        optim=dataclasses.replace(paper.optim, lr=size.lr, min_lr=size.min_lr, warmup_steps=size.warmup_steps),
        run=measurement_run(runs_dir, 0, size.precision, size.eval_interval),  # each run's own: see sized()
        source=None,  # the arms' recipes are built here, not read from a file of the user's
    )


def size_batch(size: Size) -> BatchSection:
    """The size's batch and steps (a recipe's own tokens or global batch give way to them)."""
    return BatchSection(micro_batch_size=size.micro_batch_size, grad_accum=size.grad_accum, steps=size.steps)


def sized(recipe: TrainRecipe, size: Size) -> TrainRecipe:
    """``recipe`` as one arm of the comparison: the size's tokens, evaluation and precision (runs set the rest)."""
    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, seq_len=size.seq_len, eval_sequences=size.eval_sequences),
        batch=size_batch(size),
        run=measurement_run(recipe.run.output_dir, recipe.run.seed, size.precision, size.eval_interval),
    )


def with_upcycle(recipe: TrainRecipe, options: dict[str, Any]) -> TrainRecipe:
    """``recipe`` (training a dense ``model.path``) as the upcycle of that model with convert's ``options``."""
    model = recipe.model
    upcycle = UpcycleOptions(**options)
    return dataclasses.replace(recipe, model=dataclasses.replace(model, path=None, source=model.path, upcycle=upcycle))


def _entries(value: DataEntries) -> tuple[str, ...]:
    values = [value] if isinstance(value, (str, Path)) else list(value)
    return tuple(str(v) for v in values)
