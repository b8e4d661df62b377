"""Executing runs: convert (for an upcycle), then train, each in its own Python process by default.

Runs go one after another, or ``parallel`` at a time, each process then given one GPU of its own (the i-th of
``CUDA_VISIBLE_DEVICES``, or GPU i) and its share of the CPU threads.

A run in a process of its own hands the memory of its model back before the next one loads. A finished run
(``result.json`` in its folder, written last and holding the spec it ran) is reused when the same spec comes
again, so an interrupted comparison or sweep continues where it stopped. A resumable spec (a sweep's) also keeps
checkpoints while it trains: a run killed midway continues from its latest checkpoint when the same spec comes
again, and its checkpoints are removed once it has finished. The process's entry is
``python -m upcycle.experiments --worker SPEC.json [--resume]``; the spec crosses the process boundary as JSON
(:meth:`RunSpec.to_json`), its recipe rebuilt and checked again on the other side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.experiments.flops import FLOPS_FORMULA, model_cost
from upcycle.experiments.run_data import RESULT_FILE, RUN_INFO_FILE, load_run
from upcycle.experiments.run_spec import RunSpec
from upcycle.output_safety import remove, write_json_atomically

Echo = Callable[[str], None]
SPEC_FILE = "spec.json"  # the spec the folder's checkpoints and log belong to
CHECKPOINTS = "checkpoints"  # the training loop's checkpoint folder in a run folder


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

    def working(self, what: str, done: int | None = None, total: int | None = None) -> None:
        if done is None:  # one line per wait, not one per file
            self.echo(f"{what} ...")


def execute_run(spec: RunSpec, echo: Echo = print, resume: bool = False) -> dict[str, Any]:
    """Convert (for an upcycle), train, and write ``result.json`` and ``run_info.json`` in the run folder.

    ``resume`` continues from the latest checkpoint in the run folder (see :func:`start_run_dir`).
    """
    from upcycle.train.conversion import prepare_model
    from upcycle.train.loop import train

    started = time.perf_counter()
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    exact: bool | None = None
    convert_seconds = 0.0
    recipe = spec.recipe
    if recipe.model.path is None:  # the recipe names model.source: its cached, verified upcycle
        recipe, conversion = prepare_model(recipe, echo)
        assert conversion is not None
        exact = conversion.record.get("exact") and recipe.model.init == "pretrained"  # fresh weights: nothing exact
        convert_seconds = conversion.seconds
    model_dir = Path(recipe.model.path)
    cost = model_cost(model_dir)
    seq_len = recipe.data.seq_len
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
        "upcycle": dataclasses.asdict(spec.recipe.model.upcycle) if spec.recipe.model.upcycle else None,
    }
    if spec.sweep is not None:
        info["sweep"] = spec.sweep
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if resume:
        from upcycle.train.checkpoint import latest_checkpoint

        echo(f"resuming from {latest_checkpoint(run_dir)}")
    summary = train(recipe, LineReporter(echo), resume=resume, force=not resume)  # the runner owns its run folders
    if summary.resumed_from is not None:
        echo(f"resumed from the checkpoint of step {summary.resumed_from}")
    result = {
        "spec": spec.to_json(),
        "steps": summary.steps,
        "tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "train_seconds": summary.seconds,
        "convert_seconds": convert_seconds,
        "seconds": time.perf_counter() - started,
    }
    if summary.resumed_from is not None:
        result["resumed_from"] = summary.resumed_from
    write_json_atomically(run_dir / RESULT_FILE, result)  # all of it or nothing: a kill never leaves half a result
    if spec.resumable:
        remove(run_dir / CHECKPOINTS)  # they only served a resume; the finished run is reused from now on
    return result


def start_run_dir(spec: RunSpec) -> int | None:
    """Ready the run folder for ``spec``: the step to resume from, or None to train from the start.

    Only a resumable spec resumes, and only from checkpoints that this very spec wrote (the folder's
    ``spec.json`` equals it): checkpoints of another spec (a changed recipe or grid) would continue a different
    run, so they are removed and the run starts over. The spec is then recorded in the folder.
    """
    from upcycle.train.checkpoint import list_checkpoints

    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / SPEC_FILE
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not (spec.resumable and _read_json(spec_path) == _plain(spec.to_json())):
        remove(run_dir / CHECKPOINTS)
        checkpoints = []
    write_json_atomically(spec_path, spec.to_json())
    return int(checkpoints[-1].name.split("-")[-1]) if checkpoints else None


def _plain(data: dict[str, Any]) -> Any:
    """``data`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(data))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The result of an earlier run of exactly this spec, if its folder holds one."""
    path = spec.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result = _read_json(path)
    return result if isinstance(result, dict) and result.get("spec") == _plain(spec.to_json()) else None


def start_isolated(spec: RunSpec, resume: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start one run in its own interpreter (its memory is freed when it exits); its output goes to log.txt.

    A resumed run adds to the log of the attempt it continues.
    """
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / SPEC_FILE
    write_json_atomically(spec_path, spec.to_json())
    with (run_dir / "log.txt").open("a" if resume else "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upcycle.experiments",
                "--worker",
                str(spec_path),
                *(["--resume"] if resume else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )


def isolated_result(spec: RunSpec, code: int) -> dict[str, Any]:
    """The result of a finished worker process, or its failure with the end of its log."""
    log_path = spec.run_dir / "log.txt"
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise UpcycleError(
            f"run {spec.run_dir.name} failed (exit code {code}): {' | '.join(tail)}", f"see the full log in {log_path}."
        )
    return json.loads((spec.run_dir / RESULT_FILE).read_text())


def run_isolated(spec: RunSpec, resume: bool = False) -> dict[str, Any]:
    """One run in its own interpreter, waited for."""
    return isolated_result(spec, start_isolated(spec, resume).wait())


def slot_environments(parallel: int) -> list[dict[str, str]]:
    """One environment per concurrent run: its own GPU (the i-th visible one) and its share of the CPU threads
    (unless OMP_NUM_THREADS is set already: then the user's)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible is not None else [str(i) for i in range(parallel)]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))
    return [
        {"CUDA_VISIBLE_DEVICES": devices[i] if i < len(devices) else "", "OMP_NUM_THREADS": threads}
        for i in range(parallel)
    ]


def check_parallel(parallel: int) -> None:
    """``--parallel N`` needs N >= 1 and, on a GPU machine, N GPUs (one per run)."""
    if parallel < 1:
        raise UpcycleError(f"--parallel must be at least 1, got {parallel}.", "use 1 (one run at a time) or more.")
    import torch

    if torch.cuda.is_available() and parallel > torch.cuda.device_count():
        raise UpcycleError(
            f"--parallel {parallel} needs {parallel} GPUs (one per run); {torch.cuda.device_count()} are visible.",
            f"use --parallel {torch.cuda.device_count()} or fewer.",
        )


class Runner:
    """Executes runs, numbered ``[i/total]``: reuses finished ones, reports each run's held-out losses.

    ``parallel`` > 1 runs that many worker processes at once (isolated runs only); results are kept in the order
    the runs were given, whatever order they finish in.
    """

    def __init__(self, total: int, isolate: bool, echo: Echo, parallel: int = 1) -> None:
        self.total, self.isolate, self.echo, self.parallel = total, isolate, echo, parallel
        self.started = time.perf_counter()
        self.results: dict[Path, dict[str, Any]] = {}  # run folder -> result.json, in the order given
        self.numbered = 0

    def run_all(self, specs: list[RunSpec]) -> None:
        """Run ``specs``, ``parallel`` at a time; a failure stops new starts, waits for the others, and raises."""
        todo: list[tuple[RunSpec, str, bool]] = []
        for spec in specs:
            self.numbered += 1
            what = f"[{self.numbered}/{self.total}] {spec.variant} seed {spec.seed}"
            previous = finished(spec)
            if previous is not None:
                self.echo(f"{what}: reusing the finished run in {spec.run_dir}")
                if spec.resumable:
                    remove(spec.run_dir / CHECKPOINTS)  # left by a kill between the result and their removal
                self.results[spec.run_dir] = previous
                continue
            self.results[spec.run_dir] = {}  # its place in the order; filled when it finishes
            todo.append((spec, what, False))
        if self.parallel > 1 and self.isolate:
            self._run_side_by_side(todo)
            return
        for spec, what, _ in todo:
            resume = self._start_message(spec, what)
            if self.isolate:
                result = run_isolated(spec, resume)
            else:
                result = execute_run(spec, echo=lambda _text: None, resume=resume)
            self._finished(spec, result)

    def _start_message(self, spec: RunSpec, what: str, where: str = "") -> bool:
        resume_step = start_run_dir(spec)
        doing = f"resuming from step {resume_step}" if resume_step is not None else "training"
        self.echo(f"{what}: {doing}{where} ({time.perf_counter() - self.started:.0f} s elapsed)")
        return resume_step is not None

    def _finished(self, spec: RunSpec, result: dict[str, Any]) -> None:
        self.results[spec.run_dir] = result
        losses = " -> ".join(f"{e['eval_loss']:.4f}" for e in load_run(spec.run_dir).evals)
        self.echo(f"    {spec.run_dir.name}: held-out loss {losses}; {result['seconds']:.0f} s")

    def _run_side_by_side(self, todo: list[tuple[RunSpec, str, bool]]) -> None:
        slots = slot_environments(self.parallel)
        free = list(range(self.parallel))
        running: dict[int, tuple[RunSpec, subprocess.Popen]] = {}
        queue = list(todo)
        failure: UpcycleError | None = None
        while queue or running:
            while queue and free and failure is None:
                spec, what, _ = queue.pop(0)
                slot = free.pop(0)
                device = slots[slot]["CUDA_VISIBLE_DEVICES"]
                resume = self._start_message(spec, what, f" on slot {slot}" + (f" (GPU {device})" if device else ""))
                running[slot] = (spec, start_isolated(spec, resume, slots[slot]))
            if failure is not None:
                queue.clear()
            done = [slot for slot, (_, process) in running.items() if process.poll() is not None]
            if not done:
                time.sleep(0.5)
                continue
            for slot in done:
                spec, process = running.pop(slot)
                free.append(slot)
                try:
                    self._finished(spec, isolated_result(spec, process.returncode))
                except UpcycleError as error:
                    failure = failure or error
        if failure is not None:
            raise failure


def worker_main(argv: list[str]) -> int:
    """``python -m upcycle.experiments --worker SPEC.json [--resume]``: execute one run spec, its progress on stdout."""
    resume = argv[2:] == ["--resume"]
    if len(argv) not in (2, 3) or argv[0] != "--worker" or (len(argv) == 3 and not resume):
        print(
            "usage: python -m upcycle.experiments --worker SPEC.json [--resume] (internal; use `upcycle compare` or "
            "`upcycle sweep`)",
            file=sys.stderr,
        )
        return 0 if argv in (["--help"], ["-h"]) else 2
    spec = RunSpec.from_json(json.loads(Path(argv[1]).read_text()))
    execute_run(spec, echo=lambda text: print(text, flush=True), resume=resume)
    return 0
