"""``upcycle sweep``: the steps of a sweep in order, and what it writes at the end.

Parse the grid, validate every point against the recipe, check OUT, run every point at every seed (each in its
own process, finished runs reused, an interrupted one resumed), then summarise, render and write ``sweep.json``,
``sweep.md`` and one ``sweep-KEY.png`` per swept key. Each step is its own module; this one only sequences them
and talks to the user.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.experiments.compare_render import plot_runs
from upcycle.experiments.control import applies_to_dense
from upcycle.experiments.execute import run_plan
from upcycle.experiments.grid import parse_axis
from upcycle.experiments.output import OwnedNames, check_owned_out
from upcycle.experiments.points import grid_points
from upcycle.experiments.presets import sweep_settings
from upcycle.experiments.report import write_report
from upcycle.experiments.run_data import load_run
from upcycle.experiments.runner import Runner, check_parallel
from upcycle.experiments.sweep_analysis import summarise_sweep
from upcycle.experiments.sweep_plan import UPCYCLE_SEED, SweepPlan
from upcycle.experiments.sweep_render import key_plot_path, plot_key, sweep_table
from upcycle.output_safety import refuse_overlap

SWEEP_NAMES = OwnedNames("sweep", ("runs",), ("sweep.md", "sweep.json"), ("sweep-*.png",))
"""What a sweep writes into OUT: it resumes and replaces these, and refuses a folder holding anything else."""


@dataclass
class SweepResult:
    out: Path
    summary: dict[str, Any]
    markdown: str
    json_path: Path
    table_path: Path
    plot_paths: list[Path]
    seconds: float


def default_out(recipe: Path | str, preset: str | None = None) -> Path:
    """``runs/sweep-<preset>`` or ``runs/sweep-<recipe name>``, under the current folder."""
    return Path("runs") / f"sweep-{preset or Path(recipe).stem}"


def sweep_main(
    recipe: Path | str | None,
    grid: Sequence[str] = (),
    *,
    preset: str | None = None,
    size: str | None = None,
    zip_axes: bool = False,
    seeds: int | None = None,
    seeds_for: str | None = None,
    with_dense: bool = False,
    sets: Sequence[str] = (),
    out: Path | str | None = None,
    beside_others: bool = False,
    isolate: bool = True,
    parallel: int = 1,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """``upcycle sweep [RECIPE] --grid KEY=v1,v2,... | --preset NAME [--size S] [--zip] [--seeds N] [--with-dense]``.

    Trains the recipe at every point of the grid (the cartesian product of the ``--grid`` values, or the i-th
    values together with ``zip_axes``), at seeds 0..N-1 (``seeds``; default: the recipe's own seed; with
    ``seeds_for="best"`` only the best setting and its control run the seeds after the first), plus the dense
    control (``with_dense``: the recipe's model.source trained as it is). A ``preset``
    (:mod:`upcycle.experiments.presets`) brings its grid, seeds and control; ``size`` (cpu, gpu) sets batch, steps,
    schedule and MoE layers. Every point is validated before the first run. Writes ``OUT/sweep.json``,
    ``OUT/sweep.md`` and ``OUT/sweep-KEY.png`` per key.

    OUT is the sweep's own folder: a sweep run again continues there (finished runs reused, an interrupted run
    resumed from its latest checkpoint); a folder holding other files is refused unless ``beside_others``, and OUT never
    lies over or inside what the runs read. ``parallel`` runs that many runs at once, one GPU each.
    """
    from upcycle.train.shipped_recipes import find_recipe

    started = time.perf_counter()
    if seeds is not None and seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {seeds}.", "use 2 or more to measure seed noise.")
    check_parallel(parallel)
    settings = sweep_settings(
        None if recipe is None else str(recipe),
        list(grid),
        list(sets),
        preset=preset,
        size=size,
        seeds=seeds,
        seeds_for=seeds_for,
        with_dense=with_dense,
    )
    if not settings.grid and not settings.with_dense and (settings.seeds or 1) < 2:
        raise OptionError(
            "a sweep with no --grid, --preset, --seeds N or --with-dense would train one run.",
            "add --grid KEY=v1,v2 (or --preset NAME; --list-presets shows them), or train it with `upcycle train`.",
        )
    recipe_path = find_recipe(settings.recipe).absolute()
    axes = [parse_axis(text) for text in settings.grid]
    keys = tuple(axis.key for axis in axes)
    set_keys = {item.partition("=")[0].strip() for item in settings.sets}
    if seeds is not None and "run.seed" in keys:
        raise OptionError("--seeds and --grid run.seed both set the seeds.", "keep one of them.")
    if seeds is not None and "run.seed" in set_keys:
        raise OptionError("--seeds and --set run.seed both set the seed.", "keep one of them.")
    out = Path(out if out is not None else default_out(recipe_path, preset)).absolute()
    points = grid_points(recipe_path, axes, zip_axes=zip_axes, sets=settings.sets, with_dense=settings.with_dense)
    plan = SweepPlan(
        recipe_path,
        keys,
        tuple(points),
        tuple(range(settings.seeds)) if settings.seeds else None,
        out,
        zip_axes,
        seeds_for=settings.seeds_for,
        seed_upcycle=UPCYCLE_SEED not in keys and UPCYCLE_SEED not in set_keys,
    )
    refuse_overlap(out, plan.inputs(), option="--out")
    check_owned_out(out, beside_others, SWEEP_NAMES)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    echo(f"recipe: {recipe_path}" + (f" (preset {preset}, {settings.size} size)" if preset else ""))
    if settings.sets:
        echo(f"set: {' '.join(settings.sets)}")
    echo(plan.describe(isolate, parallel))
    fixed = [k for k in keys if not applies_to_dense(k)]
    if settings.with_dense and fixed:
        echo(f"dense control: one run for every value of {', '.join(fixed)} (they do not apply to a dense model)")

    runner = Runner(plan.total, isolate, echo, parallel)
    run_plan(plan, runner, echo)
    runs = [load_run(d) for d in runner.results]
    summary = summarise_sweep(runs, keys)
    markdown = sweep_table(summary)
    plots = [plot_key(runs, summary, key, key_plot_path(out, key)) for key in keys]
    if not keys:
        plots.append(plot_runs(runs, out / "sweep-curves.png", f"upcycle sweep: {recipe_path.stem}", force=True))
    seconds = time.perf_counter() - started
    payload = {
        "recipe": str(recipe_path),
        "preset": preset,
        "size": settings.size,
        "grid": [{"key": axis.key, "values": list(axis.texts)} for axis in axes],
        "zip": zip_axes,
        "seeds": list(plan.seeds) if plan.seeds is not None else None,
        "seeds_for": plan.seeds_for,
        "with_dense": settings.with_dense,
        "set": list(settings.sets),
        "plan": plan.describe(isolate, parallel),
        "command": settings.command(zip_axes),
        "seconds": seconds,
        "runs": [dataclasses.asdict(r) for r in runs],
    }
    how = f" (preset {preset}, {settings.size} size)" if preset else ""
    header = f"Recipe {recipe_path.name}{how}; {plan.describe(isolate, parallel)}.\n\n"
    header += f"As a plain command: `{settings.command(zip_axes)}`"
    json_path, table_path = write_report(out, "sweep", header, payload, summary, markdown, plots, echo)
    return SweepResult(out, summary, markdown, json_path, table_path, plots, seconds)
