"""`upcycle grow`: m times the experts of an MoE, computing what it computed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from upcycle.cli.app import ReplaceOutput, ShardSize, app, failing, quiet_transformers
from upcycle.cli.convert import print_written, print_written_json, writing_progress
from upcycle.spans import layer_spans
from upcycle.units import parse_size


@app.command("grow")
def grow_cmd(
    src: Annotated[str, typer.Argument(help="An MoE folder or Hub id (Mixtral, Qwen2/3-MoE, OLMoE, GLM-4-MoE ...).")],
    out: Annotated[Path, typer.Argument(help="Where the grown checkpoint goes (must not exist unless --force).")],
    factor: Annotated[int, typer.Option(min=2, help="m: every expert becomes m copies; top-k m times as many.")] = 2,
    shard_size: ShardSize = "2GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and prove, and write nothing.")] = False,
    force: ReplaceOutput = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print what grew as JSON.")] = False,
    revision: Annotated[str | None, typer.Option(help="For a Hub id: the branch, tag or commit.")] = None,
) -> None:
    """Grow an MoE from E to m*E experts exactly (top-k to m*k), to train on from there."""
    from upcycle.growing import grow

    quiet_transformers()
    with failing():
        size = parse_size(shard_size, "--shard-size")
        with writing_progress(disable=dry_run) as progress:
            result = grow(
                src, out, factor, shard_size=size, force=force, dry_run=dry_run, progress=progress, revision=revision
            )
    plan = result.plan
    if json_out:
        print_written_json(result)
        return
    growth = plan.growth
    table = Table(title="upcycle grow", show_header=False)
    table.add_row("class", plan.architecture)
    table.add_row("experts", f"{growth['experts'][0]} -> {growth['experts'][1]}")
    table.add_row("top-k", f"{growth['top_k'][0]} -> {growth['top_k'][1]}")
    table.add_row("MoE layers", layer_spans(list(plan.moe_layers)))
    block = plan.config_check["block"]
    table.add_row("proof", f"config probe equal; {block['class']} equal ({block['relative_difference']:.1e} relative)")
    table.add_row("exactness", plan.exactness.label)
    print_written(result, table, f"prove it with: upcycle verify {src} {result.out}")
