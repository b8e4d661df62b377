"""A sweep's runs: every point at its seeds, each a :class:`~upcycle.experiments.run_spec.RunSpec` in its own folder.

Two ways to spend seeds. ``all``: every point at every seed, seed by seed (every point at the first seed, then
every point at the next), so a sweep stopped early already holds one run of every setting. ``best``: every point
at the first seed, then only the best setting there (lowest held-out loss, dense controls aside) and its dense
control at the other seeds, so the noise is measured where the verdict is decided, at the cost of two settings
rather than all (``upcycle compare`` has always spent its seeds so).

A seed sets the data order and, for a point that upcycles ``model.source``, the conversion's seed too (router
initialisation, Drop-Upcycling's draw, noise), so the seed std covers both, unless the sweep holds
``model.upcycle.seed`` itself. Each run is the point's recipe with the sweep's run settings: its own folder
``OUT/runs/NAME``, its seed, checkpoints kept until it finishes (a killed sweep resumes the run it was in), and
nothing else written (no export, no TensorBoard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import OptionError
from upcycle.experiments.control import follows
from upcycle.experiments.points import Point
from upcycle.experiments.run_data import load_run
from upcycle.experiments.run_spec import RunSpec
from upcycle.train.recipe import TrainRecipe
from upcycle.train.recipe_paths import ASSET_PREFIX

SEEDS_FOR = ("all", "best")
UPCYCLE_SEED = "model.upcycle.seed"


def sweep_run(recipe: TrainRecipe, run_dir: Path, seed: int, seed_upcycle: bool = False) -> TrainRecipe:
    """``recipe`` as one run of a sweep: in ``run_dir``, with ``seed``, checkpointing so a kill can be resumed.

    The recipe's checkpoint interval is kept; a recipe that checkpoints only at the end (or not at all) checkpoints
    at every evaluation instead, so a killed run loses at most one evaluation interval. With ``seed_upcycle`` the
    seed also seeds the recipe's conversion.
    """
    run = recipe.run
    interval = run.checkpoint_interval if run.checkpoints and run.checkpoint_interval else run.eval_interval
    model = recipe.model
    if seed_upcycle and model.upcycle is not None:
        model = dataclasses.replace(model, upcycle=dataclasses.replace(model.upcycle, seed=seed))
    return dataclasses.replace(
        recipe,
        model=model,
        run=dataclasses.replace(
            run,
            output_dir=str(run_dir),
            seed=seed,
            checkpoints=True,
            checkpoint_interval=interval,
            keep_checkpoints=1,
            export=False,
            tensorboard=False,
            log_interval=1,
        ),
    )


@dataclass(frozen=True)
class SweepPlan:
    """The runs of one sweep: its points (dense controls first) at its seeds, under ``out/runs``."""

    recipe: Path | None  # the recipe file the points come from (None: named arms, each its own recipe)
    keys: tuple[str, ...]
    points: tuple[Point, ...]
    seeds: tuple[int, ...] | None  # None: each point runs once, at its recipe's run.seed
    out: Path
    zip_axes: bool = False
    seeds_for: str = "all"  # all | best (see the module's docstring)
    seed_upcycle: bool = True  # each seed seeds the conversion too (False when the sweep sets model.upcycle.seed)

    def __post_init__(self) -> None:
        if self.seeds_for not in SEEDS_FOR:
            raise OptionError(f"unknown --seeds-for {self.seeds_for!r}.", f"use one of {', '.join(SEEDS_FOR)}.")

    @property
    def controls(self) -> list[Point]:
        return [p for p in self.points if p.control]

    @property
    def settings(self) -> list[Point]:
        """The points that compete for best: every point but the dense controls."""
        return [p for p in self.points if not p.control]

    @property
    def best_only(self) -> bool:
        """Whether only the best setting (and its control) runs the seeds after the first."""
        return self.seeds_for == "best" and self.seeds is not None and len(self.seeds) > 1 and bool(self.settings)

    def specs(self) -> list[RunSpec]:
        """Every run at every seed, seed by seed (``all``)."""
        if self.seeds is None:
            return [self.spec(point, point.recipe.run.seed) for point in self.points]
        return [self.spec(point, seed) for seed in self.seeds for point in self.points]

    def first(self) -> list[RunSpec]:
        """``best``: every point at the first seed, then the other seeds of a control every setting shares."""
        assert self.seeds is not None
        shared = self.controls if len(self.controls) == 1 else []
        return [self.spec(p, self.seeds[0]) for p in self.points] + [s for p in shared for s in self.more_seeds(p)]

    def then(self, best: Point) -> list[RunSpec]:
        """``best``: the other seeds of the best setting, and of its control when :meth:`first` did not run them."""
        control = self.control_of(best)
        extra = [control] if control is not None and len(self.controls) > 1 else []
        return [s for p in [*extra, best] for s in self.more_seeds(p)]

    def more_seeds(self, point: Point) -> list[RunSpec]:
        assert self.seeds is not None
        return [self.spec(point, seed) for seed in self.seeds[1:]]

    def best(self) -> Point:
        """The setting with the lowest final held-out loss at the first seed."""
        assert self.seeds is not None
        seed = self.seeds[0]
        return min(self.settings, key=lambda p: load_run(self.run_dir(p, seed)).evals[-1]["eval_loss"])

    def control_of(self, point: Point) -> Point | None:
        """The dense control at the same setting of every key the control follows."""
        matching = [c for c in self.controls if follows(point.values, c.values)]
        return matching[0] if len(matching) == 1 else None

    @property
    def total(self) -> int:
        if not self.best_only:
            return len(self.specs())
        assert self.seeds is not None
        extra = 1 + (1 if self.controls else 0)
        return len(self.points) + (len(self.seeds) - 1) * extra

    def run_dir(self, point: Point, seed: int) -> Path:
        return self.out / "runs" / point.run_name(seed)

    def spec(self, point: Point, seed: int) -> RunSpec:
        seeded = self.seeds is not None and self.seed_upcycle
        return RunSpec(
            variant=point.name,
            label=point.label,
            seed=seed,
            recipe=sweep_run(point.recipe, self.run_dir(point, seed), seed, seeded),
            sweep={"point": point.values, "control": point.control},
            resumable=True,
        )

    def describe(self, isolate: bool = True, parallel: int = 1) -> str:
        controls = len(self.controls)
        grid = len(self.points) - controls
        how = "zipped" if self.zip_axes else "every combination"
        if self.keys:
            swept = f"{', '.join(self.keys)} ({how})"
        elif self.recipe is None:
            swept = "named arms"
        else:
            swept = "no key (the recipe as it is)"
        seeds = f"seeds {', '.join(map(str, self.seeds))}" if self.seeds is not None else "the recipe's seed"
        if self.best_only:
            control = " and its dense control" if self.controls else ""
            seeds += f" (the first for every point; the others for the best setting{control})"
        if not isolate:
            where = "in this process"
        elif parallel > 1:
            where = f"one process each, {parallel} at a time"
        else:
            where = "one process each"
        control = f" + {controls} dense control(s)" if controls else ""
        return f"sweep of {swept}: {grid} point(s){control} x {seeds} = {self.total} runs, {where}"

    def inputs(self) -> list[tuple[str, Path]]:
        """Everything the runs read, which OUT must keep clear of: the recipe, model folders and data files."""
        found: list[tuple[str, Path]] = [("the recipe", self.recipe)] if self.recipe is not None else []
        for point in self.points:
            model, data = point.recipe.model, point.recipe.data
            for what, path in (("the model folder", model.path), ("the dense source", model.source)):
                if path is not None and not path.startswith(ASSET_PREFIX):
                    found.append((what, Path(path)))
            found += [("a data file", Path(f)) for f in _local(data.train) + _local(data.eval)]
        return list(dict.fromkeys(found))


def _local(entries: Sequence[str]) -> list[str]:
    return [e for e in entries if not e.startswith(ASSET_PREFIX)]
