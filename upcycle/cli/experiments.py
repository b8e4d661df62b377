"""`upcycle compare`, `upcycle sweep` and `upcycle plot`: experiments made of runs, and their figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from upcycle.cli.app import ReplaceOutput, app, console, failing
from upcycle.errors import OptionError
from upcycle.experiments.variants import VARIANTS

Parallel = Annotated[
    int,
    typer.Option(min=1, help="Runs at once, each in its own process with one GPU of its own (the i-th visible GPU)."),
]
BesideOthers = Annotated[
    bool,
    typer.Option("--beside-others", help="Write into an --out folder that also holds other files (left untouched)."),
]


@app.command("compare")
def compare_cmd(
    recipes: Annotated[
        list[Path] | None,
        typer.Argument(help="Recipes to compare, one arm each (default: the dense control and the paper's upcycles)."),
    ] = None,
    size: Annotated[
        str,
        typer.Option(
            help="cpu (measured: under 30 min on 2 cores) or gpu (1.3 M tokens per run in bf16; not timed yet)."
        ),
    ] = "cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the runs, compare.md/.png/.json.")] = Path(
        "runs/compare"
    ),
    seeds: Annotated[int, typer.Option(help="Seeds for the dense control and the best MoE (others: 1).")] = 2,
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help=f"Repeatable: {', '.join(VARIANTS)}."),
    ] = None,
    parallel: Parallel = 1,
    beside_others: BesideOthers = False,
    tasks: Annotated[
        str | None,
        typer.Option(help="Downstream tasks scored at each run's start and end, e.g. arc_easy,piqa (upcycle eval)."),
    ] = None,
    task_limit: Annotated[int, typer.Option(min=1, help="Items of each benchmark (the first ones).")] = 100,
) -> None:
    """Train the dense control and its upcycled MoEs on the same tokens; held-out loss table, plot and JSON.

    The sweep preset of named arms (upcycle sweep --preset compare): finished runs reused, a killed one resumed.
    """
    from upcycle.experiments.compare import compare_main

    benchmarks = tasks.split(",") if tasks else ()
    with failing():
        compare_main(
            list(recipes or []), size=size, out=out, seeds=seeds, variants=variant, parallel=parallel,
            beside_others=beside_others, tasks=benchmarks, task_limit=task_limit, echo=_echo,
        )  # fmt: skip


@app.command("sweep")
def sweep_cmd(
    recipe: Annotated[
        str | None,
        typer.Argument(
            help="A YAML recipe file, or the name of a shipped recipe (upcycle recipes); with --preset, default "
            "cpu-quickstart.",
            show_default=False,
        ),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="Repeatable: a recipe key and its values, KEY=v1,v2,... (YAML, as --set takes them), e.g. "
            "--grid optim.lr=1e-4,3e-4 --grid model.upcycle.experts=4,8.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A shipped sweep instead of --grid: lr, capacity, experts, or compare (the paper's variants, as "
            "upcycle compare). --list-presets says what each asks."
        ),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            help="cpu or gpu: compare's batch, steps, schedule and MoE layers as --set overrides; recipe: none "
            "(default: cpu for a preset on the shipped recipe, else recipe)."
        ),
    ] = None,
    zip_: Annotated[
        bool, typer.Option("--zip", help="Pair the i-th values of every --grid instead of every combination.")
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Seeds 0..N-1, each setting the data order and the conversion's seed (default: the recipe's).",
        ),
    ] = None,
    seeds_for: Annotated[
        str | None,
        typer.Option(
            "--seeds-for",
            help="all: every point at every seed; best: every point at the first, the best one and its dense "
            "control at the rest (presets: best).",
        ),
    ] = None,
    with_dense: Annotated[
        bool,
        typer.Option(
            "--with-dense", help="Also train the dense control: the recipe's model.source as it is, same settings."
        ),
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key for every run: --set batch.steps=50.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for the runs, sweep.md/.json and sweep-KEY.png (runs/sweep-NAME or -PRESET)."
        ),
    ] = None,
    parallel: Parallel = 1,
    beside_others: BesideOthers = False,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="Say what each preset asks, and stop.")] = False,
) -> None:
    """Train a recipe at every point of a grid of recipe keys; held-out loss table, a plot per key, and JSON.

    One process per run, in OUT/runs; run it again to continue: finished runs reused, a killed one resumed.
    """
    from upcycle.experiments.presets import COMPARE, describe_presets
    from upcycle.experiments.sweep import sweep_main

    if list_presets:
        for line in describe_presets():
            console.print(line, markup=False, highlight=False)
        return
    with failing():
        if preset == COMPARE:
            from upcycle.experiments.compare import compare_main

            refuse_for_compare(recipe, grid, zip_, seeds_for, with_dense, set_)
            compare_main(
                size=size or "cpu",
                out=out or Path("runs/compare"),
                seeds=seeds or 2,
                parallel=parallel,
                beside_others=beside_others,
                echo=_echo,
            )
            return
        sweep_main(
            recipe,
            list(grid or []),
            preset=preset,
            size=size,
            zip_axes=zip_,
            seeds=seeds,
            seeds_for=seeds_for,
            with_dense=with_dense,
            sets=list(set_ or []),
            out=out,
            beside_others=beside_others,
            parallel=parallel,
            echo=_echo,
        )


def _echo(text: str) -> None:
    """A line of an experiment's progress, as the library wrote it (no markup, no wrapping of long paths)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def refuse_for_compare(
    recipe: str | None,
    grid: list[str] | None,
    zip_: bool,
    seeds_for: str | None,
    with_dense: bool,
    sets: list[str] | None,
) -> None:
    """``--preset compare`` is upcycle compare: the paper's arms on its own recipe, so sweep's shaping options
    have nothing to act on."""
    given = [
        name
        for name, value in (
            ("RECIPE", recipe),
            ("--grid", grid),
            ("--zip", zip_),
            ("--seeds-for", seeds_for),
            ("--with-dense", with_dense),
            ("--set", sets),
        )
        if value
    ]
    if given:
        raise OptionError(
            f"--preset compare takes no {given[0]}: its arms are the paper's variants of SmolLM2 on its own recipe.",
            "drop it, or use upcycle compare RECIPE... for recipe arms.",
        )


@app.command("plot")
def plot_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders written by upcycle train or upcycle compare.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG file to write.")] = Path("compare.png"),
    title: Annotated[str | None, typer.Option(help="A title over the plot.")] = None,
    experts: Annotated[
        bool,
        typer.Option(
            "--experts", help="Also draw each run's expert-load heatmap (per layer, over steps) beside the loss plot."
        ),
    ] = False,
    force: ReplaceOutput = False,
) -> None:
    """Plot held-out loss against training tokens and training FLOPs for any set of runs."""
    from upcycle.experiments.compare import plot_main
    from upcycle.routing_plot import plot_expert_load

    with failing():
        written = [plot_main(run_dirs, out, title, force=force)]
        if experts:
            for run_dir in run_dirs:
                beside = out.with_name(f"{out.stem}-{run_dir.resolve().name}-expert-load.png")
                written.append(plot_expert_load(run_dir, beside, force=force))
    for path in written:
        console.print(f"wrote {path}", markup=False, highlight=False)
