"""Executing a comparison's runs: convert (for an upcycle), then train, each in its own Python process by default.

A run in a process of its own hands the memory of its model back before the next one loads. A finished run
(``result.json`` in its folder, written last and holding the spec it ran) is reused when the same spec comes
again, so an interrupted comparison continues where it stopped. The process's entry is
``python -m upcycle.compare --worker SPEC.json``; the spec crosses the process boundary as JSON
(:meth:`RunSpec.to_json`), its recipe rebuilt and checked again on the other side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upcycle.compare.flops import FLOPS_FORMULA, model_cost
from upcycle.compare.plan import RunSpec
from upcycle.compare.run_data import RESULT_FILE, RUN_INFO_FILE, load_run
from upcycle.errors import UpcycleError

Echo = Callable[[str], None]


class LineReporter:
    """The training loop's progress as plain lines (a worker's log)."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo

    def start(self, info: dict[str, Any]) -> None:
        self.echo(f"start: {json.dumps(info)}")

    def step(self, record: dict[str, Any]) -> None:
        self.echo(
            f"step {record['step']}: loss {record['loss']:.4f} aux {record['aux_loss']:.4f} "
            f"{record['tokens_per_s']:.0f} tok/s {record['step_seconds']:.1f} s"
        )

    def evaluated(self, record: dict[str, Any]) -> None:
        self.echo(f"eval step {record['step']}: held-out loss {record['eval_loss']:.4f}")

    def message(self, text: str) -> None:
        self.echo(text)


def execute_run(spec: RunSpec, echo: Echo = print) -> dict[str, Any]:
    """Convert (for an upcycle), train, and write ``result.json`` and ``run_info.json`` in the run folder."""
    from upcycle.train.loop import train

    started = time.perf_counter()
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    exact: bool | None = None
    convert_seconds = 0.0
    model_dir = Path(spec.recipe.model.path)
    if spec.convert_from is not None:
        from upcycle.convert import UpcycleOptions, convert

        echo(f"convert {spec.convert_from} -> {model_dir} {spec.convert_options}")
        result = convert(Path(spec.convert_from), model_dir, UpcycleOptions(**(spec.convert_options or {})), force=True)
        exact = bool(result.plan.exactness.exact)
        convert_seconds = result.seconds
    cost = model_cost(model_dir)
    seq_len = spec.recipe.data.seq_len
    info = {
        "variant": spec.variant,
        "label": spec.label,
        "seed": spec.seed,
        "model": str(model_dir),
        "architecture": cost.architecture,
        "experts": cost.experts,
        "top_k": cost.top_k,
        "total_params": cost.total_params,
        "active_params": cost.active_params,
        "seq_len": seq_len,
        "flops_per_token": cost.flops_per_token(seq_len),
        "flops_formula": FLOPS_FORMULA,
        "exact_at_init": exact,
        "convert_options": spec.convert_options,
    }
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    summary = train(spec.recipe, LineReporter(echo))
    if spec.convert_from is not None and not spec.keep_model:
        shutil.rmtree(model_dir, ignore_errors=True)
    result = {
        "spec": spec.to_json(),
        "steps": summary.steps,
        "tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "train_seconds": summary.seconds,
        "convert_seconds": convert_seconds,
        "seconds": time.perf_counter() - started,
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The result of an earlier run of exactly this spec, if its folder holds one."""
    path = spec.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("spec") == json.loads(json.dumps(spec.to_json())) else None


def run_isolated(spec: RunSpec, echo: Echo) -> dict[str, Any]:
    """One run in its own interpreter (its memory is freed when it exits); its output goes to run_dir/log.txt."""
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    log_path = run_dir / "log.txt"
    with log_path.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "upcycle.compare", "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise UpcycleError(
            f"run {run_dir.name} failed (exit code {code}): {' | '.join(tail)}", f"see the full log in {log_path}."
        )
    return json.loads((run_dir / RESULT_FILE).read_text())


class Runner:
    """Executes runs in order, numbered ``[i/total]``: reuses finished ones, reports each run's held-out losses."""

    def __init__(self, total: int, isolate: bool, echo: Echo) -> None:
        self.total, self.isolate, self.echo = total, isolate, echo
        self.started = time.perf_counter()
        self.results: dict[Path, dict[str, Any]] = {}  # run folder -> result.json, in the order they ran

    def run(self, spec: RunSpec) -> None:
        index = len(self.results) + 1
        what = f"[{index}/{self.total}] {spec.variant} seed {spec.seed}"
        previous = finished(spec)
        if previous is not None:
            self.echo(f"{what}: reusing the finished run in {spec.run_dir}")
            self.results[spec.run_dir] = previous
            return
        converting = "converting and " if spec.convert_from else ""
        self.echo(f"{what}: {converting}training ({time.perf_counter() - self.started:.0f} s elapsed)")
        result = run_isolated(spec, self.echo) if self.isolate else execute_run(spec, echo=lambda _text: None)
        self.results[spec.run_dir] = result
        losses = " -> ".join(f"{e['eval_loss']:.4f}" for e in load_run(spec.run_dir).evals)
        self.echo(f"    held-out loss {losses}; {result['seconds']:.0f} s")


def worker_main(argv: list[str]) -> int:
    """``python -m upcycle.compare --worker SPEC.json``: execute one run spec, its progress on stdout."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m upcycle.compare --worker SPEC.json (internal; use `upcycle compare`)", file=sys.stderr)
        return 0 if argv in (["--help"], ["-h"]) else 2
    spec = RunSpec.from_json(json.loads(Path(argv[1]).read_text()))
    execute_run(spec, echo=lambda text: print(text, flush=True))
    return 0
