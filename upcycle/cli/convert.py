"""`upcycle convert` and `upcycle families`: the plan as a table, the targets a family has."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from upcycle.cli.app import ReplaceOutput, ShardSize, app, console, err_console, failing, one_of, quiet_transformers
from upcycle.convert.options import OutputDtype, RouterInit, RouterKind, Split
from upcycle.spans import layer_spans
from upcycle.units import parse_size


@app.command("convert")
def convert_cmd(
    src: Annotated[
        str, typer.Argument(help="Dense model: a local Hugging Face folder, a .gguf file, or a Hub id (owner/name).")
    ],
    out: Annotated[Path, typer.Argument(help="Output folder for the MoE checkpoint (must not exist).")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Expansion rate E: copies of each MLP.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts per token.")] = 2,
    granularity: Annotated[int, typer.Option("--granularity", "-g", help="Shards per copy (virtual groups).")] = 1,
    shared_width: Annotated[
        int,
        typer.Option(
            min=0,
            help="Dense MLP neurons kept always on as a shared expert (qwen2_moe; glm4_moe, dots1: a whole "
            "number of routed experts wide).",
        ),
    ] = 0,
    router: Annotated[
        str, typer.Option(metavar=one_of(RouterKind), help="renorm (exact) or softmax-topk (the paper's router).")
    ] = "renorm",
    router_init: Annotated[
        str,
        typer.Option(
            metavar=one_of(RouterInit),
            help="The router's initial weights; cluster: k-means centroids of each layer's MLP input on real text; "
            "hidden: the hidden states of prompts per expert.",
        ),
    ] = "random",
    split: Annotated[
        str,
        typer.Option(
            metavar=one_of(Split), help="With -g > 1: contiguous shards, or neurons that fire together (exact both)."
        ),
    ] = "contiguous",
    calibration: Annotated[
        str,
        typer.Option(help="For cluster routers and --split activation: a text file (default: Shakespeare's training)."),
    ] = "",
    calibration_tokens: Annotated[
        int, typer.Option(help="With --router-init cluster: tokens the dense model runs.")
    ] = 4096,
    router_prompts: Annotated[
        str, typer.Option(help="With --router-init hidden: YAML prompts per expert (mergekit-moe's positive_prompts).")
    ] = "",
    weight_scale: Annotated[str, typer.Option(help="auto (the paper's factor), none, or a number.")] = "auto",
    drop_upcycling: Annotated[float, typer.Option(help="Drop-Upcycling ratio r (0 = off).")] = 0.0,
    noise: Annotated[float, typer.Option(help="Gaussian noise std relative to each tensor's std.")] = 0.0,
    layers: Annotated[str, typer.Option(help="Layers that become MoE: all, 0-11, 0,2,4 ...")] = "all",
    target: Annotated[str, typer.Option(help="auto, or a target class from `upcycle families`.")] = "auto",
    dtype: Annotated[
        str, typer.Option(metavar=one_of(OutputDtype), help="auto: the dtype the source is stored in.")
    ] = "auto",
    shard_size: ShardSize = "2GB",
    seed: Annotated[int, typer.Option(help="Seed for routers, Drop-Upcycling and noise.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: ReplaceOutput = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Accept a source that declares custom code.")] = False,
    show_plan: Annotated[bool, typer.Option("--show-plan", help="With --dry-run: list every tensor.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan (and what was written) as JSON instead of tables.")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="For a Hub id: the branch, tag or commit (default: main).")
    ] = None,
) -> None:
    """Upcycle a dense model into a native transformers MoE checkpoint (exact by default: E=8, top-2)."""
    from upcycle.convert import UpcycleOptions
    from upcycle.upcycling import convert

    with failing():
        options = UpcycleOptions(
            experts=experts,
            top_k=top_k,
            granularity=granularity,
            shared_width=shared_width,
            router=router,
            router_init=router_init,
            split=split,
            calibration=calibration,
            calibration_tokens=calibration_tokens,
            router_prompts=router_prompts,
            weight_scale=weight_scale,
            drop_upcycling=drop_upcycling,
            noise=noise,
            layers=layers,
            target=target,
            dtype=dtype,
            shard_size=parse_size(shard_size, "--shard-size"),
            seed=seed,
        )
        with writing_progress(disable=dry_run) as progress:
            result = convert(
                src, out, options, force=force, dry_run=dry_run, trust_remote_code=trust_remote_code,
                progress=progress, revision=revision,
            )  # fmt: skip
    if json_out:
        print(json.dumps(_json_report(result, show_plan), indent=2))
        return
    _print_plan(result.plan, show_plan)
    if dry_run:
        console.print("[yellow]dry run:[/] nothing was written.")
        return
    rate = result.bytes_written / result.seconds / 1e6 if result.seconds else 0.0
    console.print(
        f"[green]wrote[/] {result.out} ({result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s, {rate:.0f} MB/s)"
    )


def _json_report(result: Any, with_tensors: bool) -> dict[str, Any]:
    """The plan as upcycle.json records it (each output file's tensor count, or every tensor's recipe with
    --show-plan), and what was written (nothing for a dry run)."""
    plan = result.plan.to_json()
    if not with_tensors:
        plan["shards"] = {name: len(recipes) for name, recipes in plan["shards"].items()}
    written = {"out": str(result.out), "bytes": result.bytes_written, "seconds": round(result.seconds, 3)}
    return {"dry_run": result.out is None, "written": None if result.out is None else written, "plan": plan}


@contextmanager
def writing_progress(disable: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A bar of the bytes written, on stderr; yields the callback the writer reports to."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=err_console, transient=True, disable=disable) as progress:
        task = progress.add_task("writing", total=None)
        yield lambda done, total, name: progress.update(task, completed=done, total=total)


def print_written_json(result: Any) -> None:
    """A growth's or merge's `--json`: what was written, and the plan's record without its tensor recipes."""
    written = None if result.out is None else {"out": str(result.out), "bytes": result.bytes_written}
    record = {key: value for key, value in result.plan.to_json().items() if key != "shards"}
    print(json.dumps({"dry_run": result.out is None, "written": written, "plan": record}, indent=2))


def print_written(result: Any, table: Table, next_step: str) -> None:
    """The summary table, then what was written (or that nothing was) and the command that checks it."""
    console.print(table)
    if result.out is None:
        console.print("[yellow]dry run:[/] nothing was written.")
        return
    console.print(f"[green]wrote[/] {result.out} ({result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s)")
    console.print(next_step, markup=False, highlight=False)


def _print_plan(plan: Any, show_tensors: bool) -> None:
    opts = plan.options
    table = Table(title="Upcycle plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    exact = f"[{'green' if plan.exactness.exact else 'yellow'}]{plan.exactness.label}[/]"
    measured = plan.exactness.rounding_deviation or {}
    rounding = (
        [("rounding", f"{measured['what']} deviate {measured['relative']:.3g} relative from the dense model as stored")]
        if "relative" in measured
        else []
    )
    rows = [
        ("source family", plan.family),
        ("target", f"{plan.architecture} ({plan.target})"),
        ("experts", f"{opts.num_experts} = E {opts.experts} x G {opts.granularity}, top-{opts.top_k}"),
        ("router", f"{opts.router}, init {opts.router_init}"),
        ("MoE layers", layer_spans(plan.moe_layers)),
        ("dtype", plan.dtype),
        ("method", f"{plan.exactness.method}: {exact}"),
        ("config check", _config_check_text(plan.config_check)),
        *[("note", note) for note in plan.exactness.notes],
        *rounding,
        ("tensors / files", f"{len(plan.recipes)} in {len(plan.shards)} safetensors file(s)"),
        ("size", f"{plan.total_bytes / 1e9:.3f} GB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if show_tensors:
        detail = Table("file", "tensor", "shape", "dtype", "recipe")
        for name, shard in zip(plan.shard_names(), plan.shards, strict=True):
            for r in shard:
                how = r.op + (f" {r.source}" if r.source else "")
                how += f" rows{list(r.rows)}" if r.rows else ""
                how += f" cols{list(r.cols)}" if r.cols else ""
                how += f" x{r.scale:g}" if r.scale != 1 else ""
                how += f" drop {r.drop_ratio:g}" if r.drop_ratio else ""
                detail.add_row(name, r.name, str(list(r.shape)), r.dtype, how)
        console.print(detail)


def _config_check_text(record: dict) -> str:
    if not record:
        return "not run"
    windows = "full attention" if record.get("smallest_window") is None else f"windows from {record['smallest_window']}"
    return (
        f"[green]passed[/]: transformers {record.get('transformers')} computes every layer of the MoE config as the "
        f"dense one ({windows})"
    )


@app.command("families")
def families_cmd(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the table as Markdown (docs/families.md's).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print every family's row as JSON.")] = False,
) -> None:
    """Every dense family: its exact native MoE targets and the methods they hold, or why it is refused."""
    from upcycle.convert.families.table import METHODS, family_rows
    from upcycle.convert.families.table import markdown as markdown_table

    quiet_transformers()
    if markdown:
        typer.echo(markdown_table(), nl=False)
        return
    rows = family_rows()
    if json_out:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        return
    table = Table(title="dense families upcycle converts exactly")
    table.add_column("family")
    table.add_column("targets")
    for method in METHODS:
        table.add_column(method)
    for row in rows:
        if row.targets:
            needs = f" (transformers >= {row.needs})" if row.needs else ""
            cells = [", ".join(row.methods[m]) or "[red]no[/]" for m in METHODS]
            table.add_row(f"{row.family}{needs}", ", ".join(row.targets), *cells)
    console.print(table)
    for row in rows:
        for reason in row.refused_configs:
            console.print(f"  [yellow]{row.family}[/] configs refused: {reason}")
    refused = [row for row in rows if not row.targets]
    exact = len(rows) - len(refused)
    console.print(f"{exact} families exact; {len(refused)} refused:")
    for row in refused:
        console.print(f"  [yellow]{row.family}[/]: {row.reason}")
