"""`upcycle train`, `upcycle recipes` and `upcycle export`: the progress of a run and its end."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from upcycle.cli.app import NOTHING_WRITTEN, SIZE_SYNTAX, ReplaceOutput, app, console, err_console, fail, failing
from upcycle.errors import OptionError, SourceError, UpcycleError
from upcycle.units import parse_size


@app.command("train")
def train_cmd(
    recipe: Annotated[
        str,
        typer.Argument(help="A YAML recipe file, or the name of a recipe that ships with upcycle (upcycle recipes)."),
    ],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: --set optim.lr=1e-4.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest checkpoint in run.output_dir.")
    ] = False,
    resume_from: Annotated[
        Path | None,
        typer.Option("--resume-from", help="Continue from this checkpoint (a folder in run.output_dir/checkpoints)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the run that run.output_dir holds (its metrics, checkpoints, export)."),
    ] = False,
    allow_changes: Annotated[
        str,
        typer.Option(
            help="With --resume: accept these changes to what is trained (comma-separated: model, data, seed, "
            "global_batch)."
        ),
    ] = "",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Resolve recipe, batch and parallel layout; print each rank's memory; load no weights."
        ),
    ] = False,
    world_size: Annotated[
        int | None, typer.Option(min=1, help="With --dry-run: plan for this many ranks instead of those launched.")
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(help=f"With --dry-run: one rank's device memory ({SIZE_SYNTAX}; default: the one seen)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
) -> None:
    """Continue training an upcycled model from a recipe (1 CPU, 1 GPU, or many GPUs and nodes under torchrun)."""
    from upcycle.train.recipe import load_recipe
    from upcycle.train.shipped_recipes import find_recipe

    loaded = None
    try:
        with err_console.status("reading the recipe (its model and texts are fetched once, when missing)"):
            loaded = load_recipe(find_recipe(recipe), list(set_ or []))
        if dry_run or world_size is not None or device_memory is not None or json_out:
            if not dry_run:
                raise OptionError("--world-size, --device-memory and --json only plan a run.", "add --dry-run.")
            from upcycle.train.dry_run import dry_run as plan_run

            budget = parse_size(device_memory, "--device-memory") if device_memory is not None else None
            planned = plan_run(loaded, world_size, budget)
            if json_out:
                print(json.dumps(planned.to_json(), indent=2))
                return
            for line in planned.lines():
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        from upcycle.train.loop import train  # torch and transformers: only once the recipe is known to be valid

        allowed = {name.strip() for name in allow_changes.split(",") if name.strip()}
        with RichTrainReporter() as reporter:
            summary = train(
                loaded, reporter, resume=resume, allow_changes=allowed, force=force, resume_from=resume_from
            )
    except (UpcycleError, KeyboardInterrupt) as error:
        first_on_host = int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not first_on_host and isinstance(error, OptionError | SourceError):  # the ranks share their input
            raise typer.Exit(error.exit_code) from None
        left = interrupted_training(loaded.run.output_dir, recipe, set_ or []) if loaded and not dry_run else None
        raise fail(error, left or NOTHING_WRITTEN) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports for the run
    if summary.conversion is not None:
        c = summary.conversion
        how = "reused" if c.reused else f"converted in {c.convert_seconds:.1f} s, verified in {c.verify_seconds:.1f} s"
        console.print(f"model: {c.folder} ({how}; source hashed in {c.hash_seconds:.1f} s)", highlight=False)
    if summary.export_dir:
        console.print(f"[green]exported[/] {summary.export_dir}")
    console.print(f"trained {summary.steps} steps, {summary.tokens:,} tokens in {summary.seconds:.0f} s")


class RichTrainReporter:
    """Draws the loop's progress: a bar with loss, tokens/s, learning rate and ETA; evaluations as lines."""

    def __init__(self) -> None:
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.waiting = None  # the wait before training starts: converting, tokenising, loading
        self.waiting_for = ""

    def __enter__(self) -> RichTrainReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, info: dict[str, Any]) -> None:
        console.print(
            f"{info['steps']} steps x {info['tokens_per_step']:,} tokens on {info['world_size']} x {info['device']} "
            f"({info['precision']}, experts: {info['experts_implementation']}, {info['routers']} MoE layers)"
        )
        if self.waiting is not None:
            self.progress.remove_task(self.waiting)
            self.waiting = None
        self.task = self.progress.add_task("train", total=info["steps"], completed=info["start_step"], stats="")

    def step(self, record: dict[str, Any]) -> None:
        stats = (
            f"loss {record['loss']:.4f}  aux {record['aux_loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"lr {record['lr']:.2e}"
        )
        self.progress.update(self.task, completed=record["step"], stats=stats)

    def evaluated(self, record: dict[str, Any]) -> None:
        line = f"step {record['step']}: held-out loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.2f})"
        if "dense_eval_loss" in record:
            matches = record["step0_matches_dense"]
            same = {True: "[green]equal[/]", False: "[red]differs[/]", None: "[yellow]approximate[/]"}[matches]
            line += (
                f", dense model {record['dense_eval_loss']:.4f}; logits {same} "
                f"(Δ {record['step0_rel_diff']:.2g}, {record['step0_precision']})"
            )
        if "load_imbalance_max_over_mean" in record:
            line += f", expert load max/mean up to {max(record['load_imbalance_max_over_mean']):.2f}"
        self.progress.console.print(line)

    def message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/]")

    def working(self, what: str, done: int | None = None, total: int | None = None) -> None:
        if what != self.waiting_for:  # a new wait: its own count, or none (rich keeps a total once set)
            if self.waiting is not None:
                self.progress.remove_task(self.waiting)
            self.waiting = self.progress.add_task(what, total=total, stats="")
        self.waiting_for = what
        self.progress.update(self.waiting, completed=done or 0)


RecipeName = Annotated[str, typer.Argument(help="A recipe name from `upcycle recipes`.")]
recipes_app = typer.Typer(help="The recipes that ship with upcycle: list them, show one, copy one to edit.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_cmd(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON: name, file, summary.")] = False,
) -> None:
    """List the recipes that ship with upcycle (run one with `upcycle train NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from upcycle.train.shipped_recipes import shipped_recipes, summary

    with failing():
        recipes = shipped_recipes()
    if json_out:
        listed = [{"name": name, "file": str(path), "summary": summary(path)} for name, path in recipes.items()]
        print(json.dumps(listed, indent=2))
        return
    table = Table("recipe", "what it trains", box=None, pad_edge=False)
    for name, path in recipes.items():
        table.add_row(f"[bold]{name}[/]", summary(path))
    console.print(table)
    console.print(
        "run one: upcycle train NAME   read it: upcycle recipes show NAME   edit a copy: upcycle recipes copy NAME ."
    )


@recipes_app.command("show")
def recipes_show_cmd(name: RecipeName) -> None:
    """Print a shipped recipe."""
    from upcycle.train.shipped_recipes import shipped_recipe

    with failing():
        path = shipped_recipe(name)
    print(path.read_text(encoding="utf-8"), end="")


@recipes_app.command("copy")
def recipes_copy_cmd(
    name: RecipeName,
    dest: Annotated[Path, typer.Argument(help="A .yaml file, or a folder to write NAME.yaml into.")],
    force: ReplaceOutput = False,
) -> None:
    """Write an editable copy of a shipped recipe."""
    from upcycle.train.shipped_recipes import copy_recipe

    with failing():
        path = copy_recipe(name, dest, force=force)
    console.print(f"wrote {path}; run it with: upcycle train {path}", markup=False, highlight=False)


def interrupted_training(run_dir: str, recipe: str, overrides: list[str]) -> str | None:
    """What a Ctrl-C left of a run and the command that goes on from it (None: the run folder holds nothing)."""
    from upcycle.train.checkpoint_manifest import list_checkpoints, step_of
    from upcycle.train.run_folder import earlier_run

    command = f"upcycle train {shlex.quote(recipe)}" + "".join(f" --set {shlex.quote(o)}" for o in overrides)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        return (
            f"the run in {run_dir} has checkpoints up to step {step_of(checkpoints[-1])}. "
            f"Fix: continue it with `{command} --resume`."
        )
    if earlier_run(Path(run_dir)):
        return f"the run in {run_dir} stopped before its first checkpoint. Fix: start again with `{command} --force`."
    return None


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder of `upcycle train` (or one checkpoint folder in it).")],
    out: Annotated[Path, typer.Argument(help="Where the HF-native checkpoint goes (must not exist unless --force).")],
    force: ReplaceOutput = False,
) -> None:
    """Export a training checkpoint (the latest in RUN_DIR, or the one given) as an HF-native MoE folder."""
    from upcycle.train.export import export_checkpoint, find_checkpoint

    with failing():
        checkpoint = find_checkpoint(run_dir)
        path = export_checkpoint(checkpoint, out, force=force)
    console.print(f"[green]exported[/] {checkpoint.name} → {path}")
