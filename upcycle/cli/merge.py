"""`upcycle merge`: an MoE from the MLPs of several dense models, read from a mergekit-moe YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from upcycle.cli.app import (
    EXIT_NOT_EQUIVALENT,
    ReplaceOutput,
    ShardSize,
    app,
    console,
    err_console,
    failing,
    quiet_transformers,
)
from upcycle.cli.convert import print_written, print_written_json, writing_progress
from upcycle.units import parse_size


@app.command("merge")
def merge_cmd(
    config: Annotated[Path, typer.Argument(help="A mergekit-moe YAML file: base_model, experts, gate_mode ...")],
    out: Annotated[Path, typer.Argument(help="Where the merged checkpoint goes (must not exist unless --force).")],
    seed: Annotated[int, typer.Option(help="Seed for gate_mode random and uniform_random.")] = 0,
    shard_size: ShardSize = "2GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and check, and write nothing.")] = False,
    force: ReplaceOutput = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the merge as JSON.")] = False,
) -> None:
    """Merge fine-tunes of one dense model into an MoE (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE)."""
    from upcycle.merging import merge

    quiet_transformers()
    with failing():
        size = parse_size(shard_size, "--shard-size")
        with writing_progress(disable=dry_run) as progress:
            result = merge(config, out, seed=seed, shard_size=size, force=force, dry_run=dry_run, progress=progress)
    plan = result.plan
    if json_out:
        print_written_json(result)
        return
    spec = plan.merge["config"]
    table = Table(title="upcycle merge", show_header=False)
    table.add_row("class", plan.architecture)
    table.add_row("base model", spec["base_model"])
    for index, expert in enumerate(spec["experts"]):
        table.add_row(f"expert {index}", expert["source_model"])
    for index, expert in enumerate(spec["shared_experts"]):
        table.add_row(f"shared expert {index}", expert["source_model"])
    table.add_row("top-k", str(spec["experts_per_token"]))
    table.add_row("routers", f"gate_mode {spec['gate_mode']}")
    table.add_row("dtype", plan.dtype)
    print_written(result, table, f"prove its parts with: upcycle verify {config} {result.out}")


def verify_merge_and_report(config: Path, merged: Path, tokens: int, text: str | None, json_out: bool) -> None:
    """`upcycle verify CONFIG.yaml MERGED`: the parts proven, the distance from each source measured."""
    from upcycle.model_files import check_converted_folder
    from upcycle.verify.merged import verify_merge

    check_converted_folder(merged)
    with err_console.status("verify: a merge's parts", spinner="dots"):
        report = verify_merge(config, merged, tokens, text)
    if json_out:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_merge_report(report)
    raise typer.Exit(0 if report.parts_proven else EXIT_NOT_EQUIVALENT)


def _print_merge_report(report) -> None:
    ok, bad = "[green]ok[/]", "[red]FAIL[/]"
    table = Table(title="verify: a merge's parts", title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("status")
    table.add_row(
        "config: computes what the base computes outside the MLPs", "", ok if report.config_equivalent else bad
    )
    if report.config_problem:
        table.add_row("", "", f"[red]{escape(report.config_problem)}[/]")
    table.add_row("tokenizer and generation settings are the base's", "", ok if not report.file_problems else bad)
    for problem in report.file_problems[:4]:
        table.add_row("", "", f"[red]{escape(problem)}[/]")
    table.add_row(
        "tensors equal to the base's", str(report.tensors_from_base), ok if not report.weight_problems else bad
    )
    table.add_row("base MLP tensors the experts replace", str(report.base_tensors_replaced), "")
    for problem in report.weight_problems[:8]:
        table.add_row("", "", f"[red]{escape(problem)}[/]")
    table.add_row(
        "router rows re-made from gate_mode", str(report.routers_checked), ok if report.routers_checked else bad
    )
    for forced in report.forced:
        status = ok if forced.worst_relative <= forced.tolerance else bad
        table.add_row(
            f"routing forced to {forced.expert} = {escape(forced.source)}'s MLP",
            f"{forced.worst_relative:.1e}",
            f"{status} (tol {forced.tolerance:g}, {forced.layers} layers)",
        )
    for distance in report.distances:
        table.add_row(
            f"whole model vs {distance.model} {escape(distance.source)}",
            f"{distance.logits_relative:.3g}",
            f"logits relative; top-1 agrees on {distance.top1_agreement:.0%}",
        )
    table.add_row("text", f"{report.tokens} tokens", report.text_source)
    console.print(table)
    verdict = "[green]parts proven[/]" if report.parts_proven else "[red]parts NOT proven[/]"
    console.print(f"{verdict}: a merge computes no single source; the distances above are measured, not bounded.")
