"""A sweep's runs: every point at every seed, each a :class:`~upcycle.compare.plan.RunSpec` in its own folder.

Runs go seed by seed (every point at the first seed, then every point at the next), so a sweep stopped early
already holds one run of every setting. Each run is the point's recipe with the sweep's run settings: its own
folder ``OUT/runs/NAME``, its seed, checkpoints kept until it finishes (a killed sweep resumes the run it was in),
and nothing else written (no export, no TensorBoard), as compare's measurement runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle.compare.plan import RunSpec
from upcycle.sweep.naming import run_name
from upcycle.sweep.points import Point
from upcycle.train.recipe import TrainRecipe
from upcycle.train.recipe_paths import ASSET_PREFIX


def sweep_run(recipe: TrainRecipe, run_dir: Path, seed: int) -> TrainRecipe:
    """``recipe`` as one run of a sweep: in ``run_dir``, with ``seed``, checkpointing so a kill can be resumed.

    The recipe's checkpoint interval is kept; a recipe that checkpoints only at the end (or not at all) checkpoints
    at every evaluation instead, so a killed run loses at most one evaluation interval.
    """
    run = recipe.run
    interval = run.checkpoint_interval if run.checkpoints and run.checkpoint_interval else run.eval_interval
    return dataclasses.replace(
        recipe,
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

    recipe: Path
    keys: tuple[str, ...]
    points: tuple[Point, ...]
    seeds: tuple[int, ...] | None  # None: each point runs once, at its recipe's run.seed
    out: Path
    zip_axes: bool = False

    def specs(self) -> list[RunSpec]:
        """Every run, seed by seed."""
        if self.seeds is None:
            return [self.spec(point, point.recipe.run.seed) for point in self.points]
        return [self.spec(point, seed) for seed in self.seeds for point in self.points]

    def spec(self, point: Point, seed: int) -> RunSpec:
        run_dir = self.out / "runs" / run_name(point.values, seed, point.control)
        return RunSpec(
            variant=point.name,
            label=point.label,
            seed=seed,
            recipe=sweep_run(point.recipe, run_dir, seed),
            sweep={"point": point.values, "control": point.control},
            resumable=True,
        )

    def describe(self, isolate: bool = True) -> str:
        controls = sum(p.control for p in self.points)
        grid = len(self.points) - controls
        how = "zipped" if self.zip_axes else "every combination"
        swept = f"{', '.join(self.keys)} ({how})" if self.keys else "no key (the recipe as it is)"
        seeds = f"seeds {', '.join(map(str, self.seeds))}" if self.seeds is not None else "the recipe's seed"
        runs = len(self.specs())
        where = "one process each" if isolate else "in this process"
        control = f" + {controls} dense control(s)" if controls else ""
        return f"sweep of {swept}: {grid} point(s){control} x {seeds} = {runs} runs, {where}"

    def inputs(self) -> list[tuple[str, Path]]:
        """Everything the runs read, which OUT must keep clear of: the recipe, model folders and data files."""
        found: list[tuple[str, Path]] = [("the recipe", self.recipe)]
        for point in self.points:
            model, data = point.recipe.model, point.recipe.data
            for what, path in (("the model folder", model.path), ("the dense source", model.source)):
                if path is not None and not path.startswith(ASSET_PREFIX):
                    found.append((what, Path(path)))
            found += [("a data file", Path(f)) for f in _local(data.train) + _local(data.eval)]
        return list(dict.fromkeys(found))


def _local(entries: Sequence[str]) -> list[str]:
    return [e for e in entries if not e.startswith(ASSET_PREFIX)]
