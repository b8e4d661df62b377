"""`evaluate`: score a model on downstream tasks and gather per-task figures, per-item outcomes and a macro average."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.assets import EVAL_WHEEL_PACKAGE, eval_tasks_dir
from upcycle.downstream.loglikelihood import score
from upcycle.downstream.metrics import Outcome, mean_and_stderr, outcome
from upcycle.downstream.sources import load_task_items
from upcycle.downstream.tasks import DEFAULT_TASKS, TASKS, parse_request
from upcycle.errors import OptionError, SourceError

# (benchmark, requests scored so far in it, its requests in all): enough for a progress bar per benchmark.
TaskProgress = Callable[[str, int, int], None]


@dataclass
class TaskResult:
    task: str
    title: str
    kind: str
    shots: int
    items: int
    primary: str
    acc: float
    acc_stderr: float | None  # None for a single item
    acc_norm: float | None  # None where the task's choices share their continuation (WinoGrande)
    acc_norm_stderr: float | None
    bits_per_byte: float
    bits_per_byte_stderr: float | None
    seconds: float
    outcomes: list[Outcome] = field(repr=False)

    @property
    def score(self) -> float:
        """The task's leading figure (acc or acc_norm), the one the macro average takes."""
        return self.acc_norm if self.primary == "acc_norm" else self.acc

    def summary(self) -> dict[str, Any]:
        figures = {k: v for k, v in asdict(self).items() if k != "outcomes"}
        return {**figures, "score": self.score}


@dataclass
class EvalReport:
    model: str
    dtype: str
    batch_size: int
    limit: int | None
    source: str
    tasks: list[TaskResult]

    @property
    def macro_average(self) -> float:
        return sum(t.score for t in self.tasks) / len(self.tasks)

    def compact(self) -> dict[str, Any]:
        """The figures a training record, a comparison table and a model card keep: per benchmark and the average."""
        keep = ("title", "score", "primary", "acc", "acc_norm", "bits_per_byte", "items", "shots")
        tasks = {t.task: {k: v for k, v in t.summary().items() if k in keep} for t in self.tasks}
        return {"tasks": tasks, "macro_average": self.macro_average, "limit": self.limit, "source": self.source}

    def to_json(self, per_item: bool = False) -> dict[str, Any]:
        tasks = []
        for t in self.tasks:
            entry = t.summary()
            if per_item:
                entry["predictions"] = [asdict(o) for o in t.outcomes]
            tasks.append(entry)
        meta = {k: getattr(self, k) for k in ("model", "dtype", "batch_size", "limit", "source")}
        return {**meta, "macro_average": self.macro_average, "tasks": tasks}


def evaluate_model(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: TaskProgress | None = None,
    name: str = "model",
    device: torch.device | None = None,
) -> EvalReport:
    """Score an already loaded model (training evaluates its live model this way), in eval mode while it runs.

    ``shots`` None gives each task the count papers report it with (5 for MMLU, 0 for the rest).

    Under FSDP or expert parallelism every rank calls this with the same arguments: each forward is collective.
    """
    if batch_size < 1:
        raise OptionError(f"batch size must be at least 1, got {batch_size}.", "Use e.g. --batch-size 16.")
    if limit is not None and limit < 1:
        raise OptionError(f"limit must be at least 1, got {limit}.", "Use e.g. --limit 100, or leave it out.")
    names = parse_request(list(tasks), shots)
    folder = eval_tasks_dir()
    was_training = model.training
    model.eval()
    results = []
    try:
        for task in names:
            spec = TASKS[task]
            task_shots = spec.check_shots(shots)
            items = load_task_items(folder, spec, task_shots, limit)
            requests = [request for item in items for request in item.choices]
            start, done = time.perf_counter(), 0

            def advance(n: int, task: str = task, total: int = len(requests)) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(task, done, total)

            scored = score(model, tokenizer, requests, batch_size, advance, device)
            outcomes, at = [], 0
            for item in items:
                outcomes.append(outcome(spec, item, scored[at : at + len(item.choices)]))
                at += len(item.choices)
            results.append(_task_result(spec.name, task_shots, outcomes, time.perf_counter() - start))
    finally:
        model.train(was_training)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return EvalReport(name, dtype, batch_size, limit, EVAL_WHEEL_PACKAGE, results)


def _task_result(task: str, shots: int, outcomes: list[Outcome], seconds: float) -> TaskResult:
    spec = TASKS[task]
    acc = mean_and_stderr([o.acc for o in outcomes])
    normalised = spec.kind == "choice" and spec.length_normalised
    acc_norm = mean_and_stderr([o.acc_norm for o in outcomes]) if normalised else (None, None)
    bpb = mean_and_stderr([o.gold_bits_per_byte for o in outcomes])
    return TaskResult(
        task, spec.title, spec.kind, shots, len(outcomes), spec.primary, *acc, *acc_norm, *bpb, seconds, outcomes
    )


def evaluate(
    model_folder: Path | str,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: TaskProgress | None = None,
) -> EvalReport:
    """Load a causal LM (a folder or a Hub id; dense or MoE, no remote code) and score it on ``tasks``."""
    from transformers import AutoTokenizer

    from upcycle.hf.loading import load_causal_lm_strict
    from upcycle.hub import resolve_model

    names = parse_request(list(tasks), shots)  # a bad task name is refused before the model loads
    name = str(model_folder)
    model_folder = resolve_model(model_folder).folder
    model = load_causal_lm_strict(model_folder, dtype).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
    except (OSError, ValueError) as e:
        raise SourceError(
            f"{model_folder} has no tokenizer transformers can load ({str(e).splitlines()[0]}).",
            "copy the tokenizer files of the model it came from into the folder.",
        ) from None
    return evaluate_model(
        model,
        tokenizer,
        names,
        shots=shots,
        limit=limit,
        batch_size=batch_size,
        progress=progress,
        name=name,
    )
