"""`upcycle verify`: the report, section by section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from upcycle.cli.app import EXIT_NOT_EQUIVALENT, app, console, err_console, failing
from upcycle.errors import UpcycleError


@app.command("verify")
def verify_cmd(
    dense: Annotated[
        str,
        typer.Argument(
            help="The dense source: the folder, .gguf file or Hub id it was converted from (for a merge: its YAML)."
        ),
    ],
    moe: Annotated[str, typer.Argument(help="The folder written by `upcycle convert` (or its Hub id).")],
    dtype: Annotated[str, typer.Option(help="Compute dtype for the function check.")] = "float32",
    tol: Annotated[
        float | None, typer.Option(help="Relative logits tolerance (required for approximate methods).")
    ] = None,
    text: Annotated[Path | None, typer.Option(help="A text file to run both models on.")] = None,
    min_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens of text to run at least; raised to 2x the smallest attention window when that is at most "
            "4096 (sliding-window models)."
        ),
    ] = 256,
    weights_only: Annotated[
        bool, typer.Option("--weights-only", help="Skip the function check (the config check always runs).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a dense model with custom code.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Whole-model function check (both models in memory).")] = False,
    streaming: Annotated[
        bool, typer.Option("--streaming", help="Layer-by-layer function check (memory of about one layer).")
    ] = False,
) -> None:
    """Prove that MOE equals DENSE (config, weights and function), or measure how far an approximate method is.

    The function check runs both whole models when they fit in memory, else streams them layer by layer
    (--full / --streaming choose).
    """
    with failing():
        if text is not None and not text.is_file():
            raise UpcycleError(f"--text {text} does not exist.", "pass an existing UTF-8 text file.")
        if full and streaming:
            raise UpcycleError("--full and --streaming exclude each other.", "pass one of them, or neither.")
        content = text.read_text(errors="replace") if text is not None else None
        if dense.endswith((".yaml", ".yml")):  # a merge: its parts are proven, its distance from each source measured
            from upcycle.cli.merge import verify_merge_and_report

            verify_merge_and_report(Path(dense), Path(moe), min_tokens, content, json_out)
        check_local_paths(dense, moe)
        from upcycle.verify import verify

        with err_console.status("verify", spinner="dots") as status:
            report = verify(
                dense,
                moe,
                dtype=dtype,
                tol=tol,
                text=content,
                min_tokens=min_tokens,
                function=not weights_only,
                trust_remote_code=trust_remote_code,
                mode="full" if full else "streaming" if streaming else "auto",
                stage=lambda what: status.update(f"verify: {what}"),
            )
    if json_out:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_verify_report(report)
    raise typer.Exit(0 if report.equivalent else EXIT_NOT_EQUIVALENT)


def check_local_paths(dense: str, moe: str) -> None:
    """What the file system alone can tell of DENSE and MOE, before torch loads (Hub ids are resolved later)."""
    from upcycle.hub import is_hub_id
    from upcycle.model_files import check_converted_folder, check_source_path

    if not is_hub_id(moe):
        check_converted_folder(Path(moe))
    if not is_hub_id(dense):
        check_source_path(Path(dense))


def _layer_label(index: int) -> str:
    return "embeddings" if index == 0 else f"after layer {index - 1}"


def print_verify_report(report: Any) -> None:
    table = Table(title=f"verify: {report.method}", title_justify="left")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("status")
    ok, bad = "[green]ok[/]", "[red]FAIL[/]"
    c = report.config
    if c.error:
        table.add_row("config: what transformers computes", "", f"[red]{c.error}[/]")
    else:
        windows = "full attention" if c.smallest_window is None else f"smallest window {c.smallest_window}"
        table.add_row(f"config: {len(c.layers)} layers compute the same", windows, ok if c.equivalent else bad)
        for d in c.differences[:4]:
            table.add_row(f"  {d.where}", "", f"[red]{d.line()}[/]")
    if report.config_matches_plan is not None:
        table.add_row("config.json as recorded in upcycle.json", "", ok if report.config_matches_plan else bad)
    files = report.files
    table.add_row("tokenizer and generation settings", f"{len(files.compared)} checks", ok if files.ok else bad)
    for difference in files.differences[:4]:
        table.add_row("", "", f"[red]{escape(difference)}[/]")
    w = report.weights
    if w is not None:
        provenance = {True: ok, False: bad, None: "[yellow]not comparable (pass the source .gguf)[/]"}
        table.add_row("source sha256 matches upcycle.json", "", provenance[w.source_matches_provenance])
        table.add_row("tensors re-made from the plan", f"{w.tensors_checked}", ok if not w.mismatches else bad)
        for m in w.mismatches[:8]:
            diff = f"{m.max_abs_diff:.3g}" if m.max_abs_diff == m.max_abs_diff else ""
            table.add_row(f"  {m.tensor}", diff, f"[red]{m.problem}[/]")
        if w.not_remade:
            table.add_row(
                "  routers made from calibration data",
                f"{len(w.not_remade)}",
                "[yellow]not re-made: their centroids are not in this machine's cache (the function check carries "
                "them)[/]",
            )
    if report.function_mode != "none":
        table.add_row("function check", report.function_mode, report.function_mode_reason)
    _streaming_rows(table, report, ok, bad)
    f = report.function
    if f is not None:
        within = f.logits_rel_diff <= report.tolerance
        table.add_row("text", f"{f.tokens} tokens", f"{f.text_source}; {f.window_coverage}")
        table.add_row("loads with no missing/unexpected keys", "", ok if not f.loading_problems else bad)
        table.add_row("logits max |Δ|", f"{f.logits_max_abs_diff:.3g}", "")
        table.add_row(
            f"logits relative Δ ({f.dtype}, tol {report.tolerance:g})",
            f"{f.logits_rel_diff:.3g}",
            ok if within else ("[yellow]deviation[/]" if not report.exact_by_design else bad),
        )
        for where, count in f.non_finite.items():
            table.add_row(f"NaN/inf in the {where}", f"{count}", bad)
        if not f.non_finite:
            table.add_row("mean KL(dense ‖ moe)", f"{f.mean_kl:.3g}", "")
            table.add_row("top-1 agreement", f"{f.top1_agreement:.2%}", "")
        worst = max(f.layers, key=lambda d: d.rel_diff)
        table.add_row(
            f"hidden states, worst of {len(f.layers)} ({_layer_label(worst.layer)})", f"{worst.rel_diff:.3g}", ""
        )
        diverging = [d for d in f.layers if d.rel_diff > report.tolerance]
        for d in diverging[:6]:
            table.add_row(f"  hidden {_layer_label(d.layer)}", f"{d.rel_diff:.3g}", "[yellow]above tolerance[/]")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    style = "green" if report.equivalent else "red"
    console.print(
        Panel(f"[bold {style}]{'EQUIVALENT' if report.equivalent else 'NOT EQUIVALENT'}[/]: {report.verdict}")
    )


def _streaming_rows(table: Table, report: Any, ok: str, bad: str) -> None:
    s = report.streaming
    if s is None:
        return
    table.add_row("text", f"{s.tokens} tokens", f"{s.text_source}; {s.window_coverage}")
    worst = max(s.layers, key=lambda layer: layer.rel_diff)
    status = ok if s.rel_diff <= report.tolerance else ("[yellow]deviation[/]" if not report.exact_by_design else bad)
    table.add_row(
        f"{len(s.layers)} layers streamed ({s.dtype}, {s.device}, tol {report.tolerance:g}): worst output Δ",
        f"{worst.rel_diff:.3g}",
        f"{status} (layer {worst.layer})",
    )
    for layer in [layer for layer in s.layers if layer.rel_diff > report.tolerance][:6]:
        table.add_row(f"  layer {layer.layer} ({layer.mlp})", f"{layer.rel_diff:.3g}", "[yellow]above tolerance[/]")
    for where, count in s.non_finite.items():
        table.add_row(f"NaN/inf in the {where}", f"{count}", bad)
    shared = sum(layer.shared_identical for layer in s.layers) + sum(s.outer_tensors.values())
    table.add_row("shared tensors byte-identical", f"{shared}", ok if not s.shared_differing else bad)
    for name in s.shared_differing[:4]:
        table.add_row(f"  {name}", "", "[red]differs[/]")
    table.add_row("embedding rows Δ (tokens used)", f"{s.embedding_rel_diff:.3g}", "")
    table.add_row("final norm output Δ", f"{s.final_norm_rel_diff:.3g}", "")
    table.add_row("LM head logits Δ (same final hidden states)", f"{s.lm_head_rel_diff:.3g}", "")
    table.add_row("streaming time", f"{s.seconds:.1f} s", "")
