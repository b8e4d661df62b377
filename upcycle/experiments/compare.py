"""``upcycle compare`` and ``upcycle plot``: the steps of a comparison in order, and what it writes at the end.

Choose the arms and the size, check OUT against what compare reads, plan the runs, execute them (the best MoE at
seed 0 earns the extra seeds), then summarise, render and write ``compare.json``, ``compare.md`` and
``compare.png``. Each step is its own module; this one only sequences them and talks to the user.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.downstream.tasks import parse_tasks
from upcycle.errors import OptionError
from upcycle.experiments.compare_analysis import summarise
from upcycle.experiments.compare_render import markdown_table, plot_runs
from upcycle.experiments.execute import run_plan
from upcycle.experiments.flops import FLOPS_FORMULA
from upcycle.experiments.output import check_compare_out, compare_inputs
from upcycle.experiments.paper_recipe import DataEntries, paper_recipe
from upcycle.experiments.points import Point, plan_conversions
from upcycle.experiments.report import write_report
from upcycle.experiments.run_data import load_run
from upcycle.experiments.runner import Runner, check_parallel
from upcycle.experiments.sizes import Size, get_size
from upcycle.experiments.sweep_plan import SweepPlan
from upcycle.experiments.variants import arm_points, choose_arms, control_arm
from upcycle.output_safety import refuse_existing, refuse_overlap
from upcycle.train.recipe_sections import EvalSection
from upcycle.train.shipped_recipes import find_recipe


@dataclass
class CompareResult:
    out: Path
    summary: dict[str, Any]
    markdown: str
    json_path: Path
    table_path: Path
    plot_path: Path
    seconds: float


def compare_main(
    recipes: Sequence[Path | str] = (),
    size: str | Size = "cpu",
    out: Path | str = "runs/compare",
    seeds: int = 2,
    variants: Sequence[str] | None = None,
    *,
    base: Path | str | None = None,
    train: DataEntries = "asset:shakespeare/train",
    heldout: DataEntries = "asset:shakespeare/heldout",
    isolate: bool = True,
    parallel: int = 1,
    beside_others: bool = False,
    tasks: Sequence[str] = (),
    task_limit: int | None = 100,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """``upcycle compare [RECIPE...] --size cpu|gpu --out DIR --seeds N``.

    With no recipe, trains the dense control and the paper's upcycles (``variants``, default
    :data:`~upcycle.experiments.variants.DEFAULT_VARIANTS`) of ``base`` (SmolLM2-135M by default) on the fixed
    Shakespeare split. With recipes, each recipe is one arm (its model, data and optimiser; the size sets batch,
    sequence length and evaluation so every arm sees the same tokens); the dense control is the arm whose model
    has no experts. The dense control and the best MoE (lowest held-out loss at seed 0) run with ``seeds``
    seeds, the others with seed 0. Writes ``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare.png``.

    OUT is compare's own folder (see :func:`~upcycle.experiments.output.check_compare_out`): it resumes the finished
    runs there, refuses a folder holding other files unless ``beside_others``, and never lies over or inside what it
    reads (recipes, model folders, data files).
    """
    started = time.perf_counter()
    size = get_size(size)
    if seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {seeds}.", "use 2 to measure seed noise.")
    check_parallel(parallel)
    tasks = parse_tasks(list(tasks)) if tasks else ()  # a mistyped task stops here, before anything trains
    out = Path(out).absolute()
    arms = choose_arms(recipes, variants)
    recipes = [find_recipe(r) for r in recipes]  # a file, or the name of a recipe that ships (dense-control, ...)
    echo(size.describe())
    echo(f"sized for: {size.budget}")
    dense_model: Path | None = None
    if not recipes:
        if base is None:
            from upcycle.assets import smollm2_folder

            dense_model = smollm2_folder()
        else:
            dense_model = Path(base).absolute()
    refuse_overlap(out, compare_inputs(recipes, arms, dense_model, train, heldout), option="--out")
    check_compare_out(out, beside_others)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if dense_model is not None:
        echo(f"dense model: {dense_model}")
    echo(f"text: train {train}, held out {heldout} (fixed split)")
    echo(f"{FLOPS_FORMULA}")

    control = control_arm(arms)
    paper = paper_recipe(size, dense_model, train, heldout, out / "runs") if dense_model is not None else None
    points = with_tasks(arm_points(arms, control, size, paper), tasks, task_limit)
    plan_conversions(points)
    plan = SweepPlan(None, (), tuple(points), tuple(range(seeds)), out, seeds_for="best")
    echo(f"plan: {plan.describe(isolate, parallel)}")
    runner = Runner(plan.total, isolate, echo, parallel)
    run_plan(plan, runner, echo)

    runs = [load_run(d) for d in runner.results]
    summary = summarise(runs, control.name)
    markdown = markdown_table(summary)
    plot_path = plot_runs(runs, out / "compare.png", f"upcycle compare, {size.name} size", force=True)
    seconds = time.perf_counter() - started
    model_note = str(dense_model or "the recipes' models")
    payload = {
        "size": dataclasses.asdict(size),
        "size_description": size.describe(),
        "budget": size.budget,
        "base_model": str(dense_model) if dense_model else None,
        "data": {"train": train, "heldout": heldout},
        "seconds": seconds,
        "runs": [dataclasses.asdict(r) for r in runs],
        "model_note": model_note,
    }
    header = f"{size.describe()}; sized for {size.budget}.\nModel: {model_note}."
    json_path, table_path = write_report(
        out, "compare", header, payload, summary, markdown, [plot_path], echo, f" ({size.budget})"
    )
    return CompareResult(out, summary, markdown, json_path, table_path, plot_path, seconds)


def with_tasks(points: list[Point], tasks: Sequence[str], limit: int | None) -> list[Point]:
    """Every arm scored on the same downstream tasks at its start and end (the recipe's ``eval`` section gives way)."""
    if not tasks:
        return points
    section = EvalSection(tasks=parse_tasks(list(tasks)), limit=limit, interval=0)
    return [dataclasses.replace(p, recipe=dataclasses.replace(p.recipe, eval=section)) for p in points]


def plot_main(
    run_dirs: Sequence[Path | str], out: Path | str = "compare.png", title: str | None = None, force: bool = False
) -> Path:
    """``upcycle plot RUN_DIR... --out PNG``: draw any set of runs (compare runs or plain ``upcycle train`` runs).

    OUT may not lie in (or be, or contain) a run folder it reads: a run folder holds what its run wrote. An
    existing OUT is replaced only with ``force``, atomically.
    """
    if not run_dirs:
        raise OptionError("no run folders given.", "pass one or more folders written by upcycle train or compare.")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise OptionError(f"{d} is not a folder.", "pass run folders (they hold metrics.jsonl).")
    out = Path(out)
    refuse_overlap(out, [("the run folder", d) for d in run_dirs], option="--out")
    refuse_existing(out, force, kind="file", option="--out")
    runs = [load_run(d) for d in run_dirs]
    return plot_runs(runs, out, title, force)
