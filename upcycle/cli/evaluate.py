"""`upcycle eval`: downstream accuracy of a model folder, per benchmark and as a macro average."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from upcycle.cli.app import app, console, failing
from upcycle.downstream.tasks import DEFAULT_TASKS, TASKS

if TYPE_CHECKING:
    from upcycle.downstream.run import EvalReport


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A causal LM folder (dense, converted or exported) or a Hub id.")],
    tasks: Annotated[str, typer.Option(help=f"Comma-separated tasks, or all. Known: {', '.join(TASKS)}.")] = ",".join(
        DEFAULT_TASKS
    ),
    limit: Annotated[int | None, typer.Option(help="Score the first N items of each task (all when left out).")] = None,
    shots: Annotated[
        int | None,
        typer.Option(help="Few-shot examples in each prompt: 0 or 5 (0-5 for MMLU). Default: 5 for MMLU, else 0."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 16,
    dtype: Annotated[str, typer.Option(help="Load and compute dtype.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    per_item: Annotated[bool, typer.Option("--per-item", help="With --json: every item's prediction too.")] = False,
) -> None:
    """Score MODEL on downstream benchmarks offline: accuracy with its standard error for each, and bits-per-byte.

    Multiple choice is scored as lm-evaluation-harness does (the log-likelihood of each choice; acc_norm divides
    it by the choice's length in characters); LAMBADA by whether greedy decoding gives the last word; MMLU with
    the harness' prompts (letters A-D; mmlu_continuation: the answers' texts), 5-shot unless --shots says.
    """
    from upcycle.downstream import parse_request
    from upcycle.hub import is_hub_id
    from upcycle.model_files import check_model_folder

    with failing():
        names = parse_request(tasks, shots)
        if not is_hub_id(model):
            check_model_folder(Path(model))  # before torch loads: a wrong path is said at once
        from upcycle.downstream.run import evaluate
        from upcycle.hf.loading import dtype_named

        with TaskBars(quiet=json_out) as progress:
            report = evaluate(
                model,
                names,
                shots=shots,
                limit=limit,
                batch_size=batch_size,
                dtype=dtype_named(dtype),
                device=device,
                progress=progress,
            )
    if json_out:
        print(json.dumps(report.to_json(per_item=per_item), indent=2))
    else:
        print_eval_report(report)


class TaskBars:
    """One bar per benchmark, drawn on the console; nothing when the output is JSON."""

    def __init__(self, quiet: bool) -> None:
        self.bar = (
            None
            if quiet
            else Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self):  # noqa: ANN204
        if self.bar is not None:
            self.bar.start()
        return self if self.bar is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done)


def print_eval_report(report: EvalReport) -> None:
    table = Table(title=f"eval: {report.model} ({report.dtype})", title_justify="left")
    for column in ("task", "shots", "items", "acc", "acc_norm", "bits/byte", "time"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for t in report.tasks:
        acc = _figure(t.acc, t.acc_stderr, bold=t.primary == "acc")
        acc_norm = (
            _figure(t.acc_norm, t.acc_norm_stderr, bold=t.primary == "acc_norm") if t.acc_norm is not None else "-"
        )
        table.add_row(
            t.title, str(t.shots), str(t.items), acc, acc_norm, f"{t.bits_per_byte:.3f}", f"{t.seconds:.0f} s"
        )
    console.print(table)
    console.print(
        f"macro average of the bold figures: [bold]{100 * report.macro_average:.1f}[/] over {len(report.tasks)} tasks "
        f"(items from {report.source}{'' if report.limit is None else f', first {report.limit} of each'})",
        highlight=False,
    )


def _figure(value: float, stderr: float | None, bold: bool) -> str:
    text = f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")
    return f"[bold]{text}[/]" if bold else text
