"""The `upcycle` command line: parsing and presentation only; the work happens in the library."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from upcycle.errors import OptionError, SourceError, UpcycleError
from upcycle.spans import layer_spans
from upcycle.units import parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    help="Turn a dense Hugging Face model into an exact Mixture-of-Experts model, verify it, train it.",
)
console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}
EXIT_NOT_EQUIVALENT = 1
EXIT_BAD_INPUT = 2


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from upcycle import __version__

        console.print(f"upcycle {__version__}")
        raise typer.Exit(0)
    STATE["debug"] = debug
    _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' per-tensor loading bars and advisory warnings drown the report; errors still show."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def fail(error: BaseException) -> typer.Exit:
    """One line naming the problem and the fix; the traceback only with --debug."""
    if STATE["debug"]:
        console.print_exception()
    if isinstance(error, UpcycleError):
        err_console.print(f"[bold red]error:[/] {escape(error.line())}", highlight=False)  # 'upcycle[gguf]' stays
        return typer.Exit(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        err_console.print("[bold red]interrupted:[/] nothing was written. Fix: run the command again.")
        return typer.Exit(EXIT_BAD_INPUT)
    raise error


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Dense model: a local Hugging Face folder or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="Output folder for the MoE checkpoint (must not exist).")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Expansion rate E: copies of each MLP.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts per token.")] = 2,
    granularity: Annotated[int, typer.Option("--granularity", "-g", help="Shards per copy (virtual groups).")] = 1,
    router: Annotated[str, typer.Option(help="renorm (exact) or softmax-topk (the paper's router).")] = "renorm",
    router_init: Annotated[str, typer.Option(help="random, zero or tied.")] = "random",
    weight_scale: Annotated[str, typer.Option(help="auto (the paper's factor), none, or a number.")] = "auto",
    drop_upcycling: Annotated[float, typer.Option(help="Drop-Upcycling ratio r (0 = off).")] = 0.0,
    noise: Annotated[float, typer.Option(help="Gaussian noise std relative to each tensor's std.")] = 0.0,
    layers: Annotated[str, typer.Option(help="Layers that become MoE: all, 0-11, 0,2,4 ...")] = "all",
    target: Annotated[str, typer.Option(help="auto, or a target class from `upcycle families`.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (as the source), float32, bfloat16, float16.")] = "auto",
    shard_size: Annotated[
        str, typer.Option(help="Maximum size of one safetensors file: 2GB (powers of 1000) or 2GiB (of 1024).")
    ] = "2GB",
    seed: Annotated[int, typer.Option(help="Seed for routers, Drop-Upcycling and noise.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Accept a source that declares custom code.")] = False,
    show_plan: Annotated[bool, typer.Option("--show-plan", help="With --dry-run: list every tensor.")] = False,
) -> None:
    """Upcycle a dense model into a native transformers MoE checkpoint (exact by default: E=8, top-2)."""
    from upcycle.convert import UpcycleOptions, convert

    try:
        options = UpcycleOptions(
            experts=experts,
            top_k=top_k,
            granularity=granularity,
            router=router,
            router_init=router_init,
            weight_scale=weight_scale,
            drop_upcycling=drop_upcycling,
            noise=noise,
            layers=layers,
            target=target,
            dtype=dtype,
            shard_size=parse_size(shard_size, "--shard-size"),
            seed=seed,
        )
        with _transfer_progress(disable=dry_run) as progress:
            task = progress.add_task("writing", total=None)
            result = convert(
                src,
                out,
                options,
                force=force,
                dry_run=dry_run,
                trust_remote_code=trust_remote_code,
                progress=lambda done, total, name: progress.update(task, completed=done, total=total),
            )
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None
    _print_plan(result.plan, show_plan)
    if dry_run:
        console.print("[yellow]dry run:[/] nothing was written.")
        return
    rate = result.bytes_written / result.seconds / 1e6 if result.seconds else 0.0
    console.print(
        f"[green]wrote[/] {result.out} ({result.bytes_written / 1e9:.2f} GB in {result.seconds:.1f} s, {rate:.0f} MB/s)"
    )


def _transfer_progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=disable,
    )


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
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown (the README's).")] = False,
) -> None:
    """Every dense family: its exact native MoE targets and the methods they hold, or why it is refused."""
    from upcycle.convert.families.table import METHODS, family_rows
    from upcycle.convert.families.table import markdown as markdown_table

    _quiet_transformers()
    if markdown:
        typer.echo(markdown_table(), nl=False)
        return
    rows = family_rows()
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


@app.command("verify")
def verify_cmd(
    dense: Annotated[Path, typer.Argument(help="The dense source: the folder or .gguf file it was converted from.")],
    moe: Annotated[Path, typer.Argument(help="The folder written by `upcycle convert`.")],
    dtype: Annotated[str, typer.Option(help="Compute dtype for the function check.")] = "float32",
    tol: Annotated[
        float | None, typer.Option(help="Relative logits tolerance (required for approximate methods).")
    ] = None,
    text: Annotated[Path | None, typer.Option(help="A text file to run both models on.")] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Tokens of text (at least 2x the smallest attention window up to 4096).")
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
    from upcycle.verify import verify

    try:
        if text is not None and not text.is_file():
            raise UpcycleError(f"--text {text} does not exist.", "pass an existing UTF-8 text file.")
        if full and streaming:
            raise UpcycleError("--full and --streaming exclude each other.", "pass one of them, or neither.")
        content = text.read_text(errors="replace") if text is not None else None
        report = verify(
            dense,
            moe,
            dtype=dtype,
            tol=tol,
            text=content,
            max_tokens=max_tokens,
            function=not weights_only,
            trust_remote_code=trust_remote_code,
            mode="full" if full else "streaming" if streaming else "auto",
        )
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None
    if json_out:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_verify_report(report)
    raise typer.Exit(0 if report.equivalent else EXIT_NOT_EQUIVALENT)


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
        typer.Option(help="With --dry-run: one rank's device memory, e.g. 80GiB (default: the one seen)."),
    ] = None,
) -> None:
    """Continue training an upcycled model from a recipe (1 CPU, 1 GPU, or many GPUs and nodes under torchrun)."""
    from upcycle.train.loop import train
    from upcycle.train.recipe import load_recipe
    from upcycle.train.shipped_recipes import find_recipe

    try:
        loaded = load_recipe(find_recipe(recipe), list(set_ or []))
        if dry_run or world_size is not None or device_memory is not None:
            if not dry_run:
                raise OptionError("--world-size and --device-memory only plan a run.", "add --dry-run.")
            from upcycle.train.dry_run import dry_run as plan_run

            budget = parse_size(device_memory, "--device-memory") if device_memory is not None else None
            for line in plan_run(loaded, world_size, budget).lines():
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        allowed = {name.strip() for name in allow_changes.split(",") if name.strip()}
        with RichTrainReporter() as reporter:
            summary = train(
                loaded, reporter, resume=resume, allow_changes=allowed, force=force, resume_from=resume_from
            )
    except (UpcycleError, KeyboardInterrupt) as error:
        first_on_host = int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not first_on_host and isinstance(error, OptionError | SourceError):  # the ranks share their input
            raise typer.Exit(error.exit_code) from None
        raise fail(error) from None
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
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

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


recipes_app = typer.Typer(help="The recipes that ship with upcycle: list them, show one, copy one to edit.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_cmd(ctx: typer.Context) -> None:
    """List the recipes that ship with upcycle (run one with `upcycle train NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from upcycle.train.shipped_recipes import shipped_recipes, summary

    try:
        recipes = shipped_recipes()
    except UpcycleError as error:
        raise fail(error) from None
    table = Table("recipe", "what it trains", box=None, pad_edge=False)
    for name, path in recipes.items():
        table.add_row(f"[bold]{name}[/]", summary(path))
    console.print(table)
    console.print(
        "run one: upcycle train NAME   read it: upcycle recipes show NAME   edit a copy: upcycle recipes copy NAME ."
    )


@recipes_app.command("show")
def recipes_show_cmd(name: Annotated[str, typer.Argument(help="A recipe name from `upcycle recipes`.")]) -> None:
    """Print a shipped recipe."""
    from upcycle.train.shipped_recipes import shipped_recipe

    try:
        path = shipped_recipe(name)
    except UpcycleError as error:
        raise fail(error) from None
    print(path.read_text(encoding="utf-8"), end="")


@recipes_app.command("copy")
def recipes_copy_cmd(
    name: Annotated[str, typer.Argument(help="A recipe name from `upcycle recipes`.")],
    dest: Annotated[Path, typer.Argument(help="A .yaml file, or a folder to write NAME.yaml into.")],
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists (atomically).")] = False,
) -> None:
    """Write an editable copy of a shipped recipe."""
    from upcycle.train.shipped_recipes import copy_recipe

    try:
        path = copy_recipe(name, dest, force=force)
    except UpcycleError as error:
        raise fail(error) from None
    console.print(f"wrote {path}; run it with: upcycle train {path}", markup=False, highlight=False)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder of `upcycle train` (or one checkpoint folder in it).")],
    out: Annotated[Path, typer.Argument(help="Where the HF-native checkpoint goes (must not exist unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (atomically).")] = False,
) -> None:
    """Export a training checkpoint (the latest in RUN_DIR, or the one given) as an HF-native MoE folder."""
    from upcycle.train.export import export_checkpoint, find_checkpoint

    try:
        checkpoint = find_checkpoint(run_dir)
        path = export_checkpoint(checkpoint, out, force=force)
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None
    console.print(f"[green]exported[/] {checkpoint.name} → {path}")


@app.command("compare")
def compare_cmd(
    recipes: Annotated[
        list[Path] | None,
        typer.Argument(help="Recipes to compare, one arm each (default: the dense control and the paper's upcycles)."),
    ] = None,
    size: Annotated[str, typer.Option(help="cpu (under 30 min on 2 cores) or gpu (~10 min on one GPU).")] = "cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the runs, compare.md/.png/.json.")] = Path(
        "runs/compare"
    ),
    seeds: Annotated[int, typer.Option(help="Seeds for the dense control and the best MoE (others: 1).")] = 2,
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="Repeatable: dense, e8g1t2-renorm, e8g1t2-softmax, e8g8t8, drop-upcycling."),
    ] = None,
    parallel: Annotated[int, typer.Option(min=1, help=PARALLEL_HELP)] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Write into an --out folder that also holds other files (left untouched).")
    ] = False,
) -> None:
    """Train the dense control and its upcycled MoEs on the same tokens; held-out loss table, plot and JSON.

    The sweep preset of named arms (upcycle sweep --preset compare): finished runs reused, a killed one resumed.
    """
    from upcycle.experiments.compare import compare_main

    try:
        compare_main(
            list(recipes or []),
            size=size,
            out=out,
            seeds=seeds,
            variants=variant,
            parallel=parallel,
            force=force,
            echo=lambda text: console.print(text, markup=False, highlight=False),
        )
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None


PARALLEL_HELP = "Runs at once, each in its own process with one GPU of its own (the i-th visible GPU)."


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
    parallel: Annotated[int, typer.Option(min=1, help=PARALLEL_HELP)] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Write into an --out folder that also holds other files (left untouched).")
    ] = False,
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
    echo = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    try:
        if preset == COMPARE:
            from upcycle.experiments.compare import compare_main

            refuse_for_compare(recipe, grid, zip_, seeds_for, with_dense, set_)
            compare_main(
                size=size or "cpu",
                out=out or Path("runs/compare"),
                seeds=seeds or 2,
                parallel=parallel,
                force=force,
                echo=echo,
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
            force=force,
            parallel=parallel,
            echo=echo,
        )
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None


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
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists (atomically).")] = False,
) -> None:
    """Plot held-out loss against training tokens and training FLOPs for any set of runs."""
    from upcycle.experiments.compare import plot_main
    from upcycle.routing_plot import plot_expert_load

    try:
        written = [plot_main(run_dirs, out, title, force=force)]
        if experts:
            for run_dir in run_dirs:
                beside = out.with_name(f"{out.stem}-{run_dir.resolve().name}-expert-load.png")
                written.append(plot_expert_load(run_dir, beside, force=force))
    except UpcycleError as error:
        raise fail(error) from None
    for path in written:
        console.print(f"wrote {path}", markup=False, highlight=False)


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
    """Upcycle the real SmolLM2-135M on this CPU, verify it, and compare generations."""
    from upcycle.demo import DemoSteps, run_demo

    start = time.perf_counter()
    status = console.status("")

    def started(message: str) -> None:
        status.update(f"[bold]{message}…")
        console.print(f"[bold cyan]›[/] {message}")

    try:
        with status:
            ok = run_demo(DemoSteps(started, show_demo_step), out, train_steps=train_steps)
    except (UpcycleError, KeyboardInterrupt) as error:
        raise fail(error) from None
    console.print(
        f"demo finished in {time.perf_counter() - start:.0f} s: "
        + ("[green]the MoE model is the dense model, now with experts.[/]" if ok else "[red]mismatch[/]")
    )
    raise typer.Exit(0 if ok else EXIT_NOT_EQUIVALENT)


if __name__ == "__main__":
    sys.exit(app())
