"""`upcycle demo`: each step of the story as it happens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from upcycle.cli.app import EXIT_NOT_EQUIVALENT, app, console, failing
from upcycle.cli.verify import print_verify_report


def show_demo_step(step: str, value: Any) -> None:
    """Print what one demo step produced (the demo logic lives in upcycle.demo)."""
    if step == "model":
        console.print(f"  dense model: {value}")
    elif step == "convert":
        console.print(
            f"  {value.plan.architecture}, {len(value.plan.recipes)} tensors, "
            f"{value.bytes_written / 1e9:.2f} GB in {value.seconds:.1f} s → {value.out}"
        )
    elif step == "verify":
        print_verify_report(value)
    elif step == "generate":
        table = Table("prompt", "dense SmolLM2", "upcycled MoE", "same", title="Greedy continuations")
        for c in value:
            table.add_row(c.prompt, c.dense, c.moe, "[green]yes[/]" if c.identical else "[red]no[/]")
        console.print(table)
    elif step == "train":
        table = Table(
            "model",
            "held-out loss before",
            f"after {value.steps} steps",
            "change",
            "seconds",
            title=f"Short training run ({value.tokens_per_step} tokens per step)",
        )
        for name, (before, after) in value.losses.items():
            label = "dense SmolLM2" if name == "dense" else "upcycled MoE"
            table.add_row(
                label, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}", f"{value.seconds[name]:.0f}"
            )
        console.print(table)
    elif step == "routing":
        console.print(f"  expert load per layer over the MoE's training: {value}", highlight=False)
    elif step == "train-skipped":
        console.print(
            f"[yellow]Skipped the training run:[/] it needs about {value.needed_bytes / 1e9:.1f} GB of free memory "
            f"(fp32 AdamW) and {value.available_bytes / 1e9:.1f} GB is available. Close other programs and run "
            "`upcycle demo` again, or pass --train-steps 0 to leave it out."
        )


@app.command("demo")
def demo_cmd(
    out: Annotated[Path | None, typer.Option(help="Where the MoE checkpoint goes (default: the cache).")] = None,
    train_steps: Annotated[int, typer.Option(help="Training steps for each model at the end (0 = skip).")] = 4,
) -> None:
    """Upcycle SmolLM2-135M-Instruct (its Q4_1 GGUF, de-quantised) on this CPU, verify it, compare generations."""
    from upcycle.demo import DemoSteps, run_demo

    start = time.perf_counter()
    status = console.status("")

    def started(message: str) -> None:
        status.update(f"[bold]{message}…")
        console.print(f"[bold cyan]›[/] {message}")

    with failing(), status:
        ok = run_demo(DemoSteps(started, show_demo_step), out, train_steps=train_steps)
    console.print(
        f"demo finished in {time.perf_counter() - start:.0f} s: "
        + ("[green]the MoE model is the dense model, now with experts.[/]" if ok else "[red]mismatch[/]")
    )
    raise typer.Exit(0 if ok else EXIT_NOT_EQUIVALENT)
