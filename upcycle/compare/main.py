"""``upcycle compare`` and ``upcycle plot``: the steps of a comparison in order, and what it writes at the end.

Choose the arms and the size, check OUT against what compare reads, plan the runs, execute them (the best MoE at
seed 0 earns the extra seeds), then summarise, render and write ``compare.json``, ``compare.md`` and
``compare.png``. Each step is its own module; this one only sequences them and talks to the user.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.compare.analysis import summarise
from upcycle.compare.flops import FLOPS_FORMULA
from upcycle.compare.output import check_compare_out, compare_inputs
from upcycle.compare.plan import Plan, RunSpec
from upcycle.compare.recipes import DataEntries, paper_recipe
from upcycle.compare.render import markdown_table, plot_runs
from upcycle.compare.run_data import load_run
from upcycle.compare.runner import Runner
from upcycle.compare.sizes import Size, get_size
from upcycle.compare.variants import choose_arms, control_arm
from upcycle.errors import OptionError
from upcycle.output_safety import refuse_existing, refuse_overlap


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
    keep_models: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """``upcycle compare [RECIPE...] --size cpu|gpu --out DIR --seeds N``.

    With no recipe, trains the dense control and the paper's upcycles (``variants``, default
    :data:`~upcycle.compare.variants.DEFAULT_VARIANTS`) of ``base`` (SmolLM2-135M by default) on the fixed
    Shakespeare split. With recipes, each recipe is one arm (its model, data and optimiser; the size sets batch,
    sequence length and evaluation so every arm sees the same tokens); the dense control is the arm whose model
    has no experts. The dense control and the best MoE (lowest held-out loss at seed 0) run with ``seeds``
    seeds, the others with seed 0. Writes ``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare.png``.

    OUT is compare's own folder (see :func:`~upcycle.compare.output.check_compare_out`): it resumes the finished
    runs there, refuses a folder holding other files unless ``force``, and never lies over or inside what it
    reads (recipes, model folders, data files).
    """
    started = time.perf_counter()
    size = get_size(size)
    if seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {seeds}.", "use 2 to measure seed noise.")
    out = Path(out).absolute()
    arms = choose_arms(recipes, variants)
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
    check_compare_out(out, force)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if dense_model is not None:
        echo(f"dense model: {dense_model}")
    echo(f"text: train {train}, held out {heldout} (fixed split)")
    echo(f"{FLOPS_FORMULA}")

    plan = Plan(
        size=size,
        out=out,
        arms=tuple(arms),
        control=control_arm(arms),
        seeds=seeds,
        paper=paper_recipe(size, dense_model, train, heldout, out / "runs") if dense_model is not None else None,
        dense_model=dense_model,
        keep_models=keep_models,
    )
    echo(plan.describe(isolate))
    runner = Runner(plan.total, isolate, echo)
    for spec in plan.first():
        runner.run(spec)
    others = [plan.spec(arm, 0) for arm in plan.arms if arm is not plan.control]
    if others and seeds > 1:
        best = _best(others)
        echo(f"best MoE at seed 0: {best.variant}; running it with {seeds - 1} more seed(s)")
        for spec in plan.more_seeds(next(a for a in plan.arms if a.name == best.variant)):
            runner.run(spec)

    runs = [load_run(d) for d in runner.results]
    summary = summarise(runs, plan.control.name)
    markdown = markdown_table(summary)
    plot_path = plot_runs(runs, out / "compare.png", f"upcycle compare, {size.name} size", force=True)
    seconds = time.perf_counter() - started
    model_note = str(dense_model or "the recipes' models")
    payload = {
        "size": dataclasses.asdict(size),
        "size_description": size.describe(),
        "budget": size.budget,
        "environment": environment(),
        "base_model": str(dense_model) if dense_model else None,
        "data": {"train": train, "heldout": heldout},
        "seconds": seconds,
        "summary": summary,
        "runs": [dataclasses.asdict(r) for r in runs],
        "markdown": markdown,
        "model_note": model_note,
    }
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    table_path = out / "compare.md"
    header = f"{size.describe()}; sized for {size.budget}.\nModel: {model_note}.\n\n"
    findings_text = "\n".join(f"- {line}" for line in summary["findings"])
    table_path.write_text(header + markdown + "\n" + findings_text + "\n")
    echo("")
    echo(markdown)
    for line in summary["findings"]:
        echo(f"- {line}")
    echo(f"wall time {seconds / 60:.1f} min ({size.budget})")
    echo(f"wrote {table_path}, {plot_path}, {json_path}")
    return CompareResult(out, summary, markdown, json_path, table_path, plot_path, seconds)


def _best(specs: Sequence[RunSpec]) -> RunSpec:
    """The run with the lowest final held-out loss."""
    return min(specs, key=lambda s: load_run(s.run_dir).evals[-1]["eval_loss"])


def environment() -> dict[str, Any]:
    """Where the numbers were measured: date, machine, library versions, device."""
    import torch
    import transformers

    from upcycle import __version__

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "upcycle": __version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


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
