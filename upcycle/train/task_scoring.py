"""Downstream tasks scored during training: when, on what, in which precision, and the record each one leaves.

The items and the tokenizer are fetched before the first step (rank 0 first: a first use downloads the items), so
no rank fails on them mid-run while the others wait in a collective. Every rank runs the same forwards (under FSDP
and expert parallelism each is collective); the router taps are cleared after every batch, so they never hold more
than one batch's routing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import nn

from upcycle.train import moe_losses
from upcycle.train.distributed import Dist, barrier
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe_sections import EvalSection

KIND = "tasks"  # the metrics.jsonl record kind


class TaskScoring:
    def __init__(self, settings: EvalSection, tokenizer: Any, info: Dist, last_step: int, precision: str) -> None:
        from upcycle.downstream import parse_tasks

        self.settings, self.tokenizer, self.info = settings, tokenizer, info
        self.tasks = parse_tasks(settings.tasks)
        self.last_step, self.precision = last_step, precision
        self.latest: dict[str, Any] | None = None  # the last evaluation's record (the export's card lists it)

    @classmethod
    def prepare(cls, settings: EvalSection, model_path: str, info: Dist, last_step: int, precision: str):  # noqa: ANN206
        """None when the recipe names no task; else the items fetched and the tokenizer loaded, on every rank."""
        if not settings.tasks:
            return None
        from transformers import AutoTokenizer

        from upcycle.assets import eval_tasks_dir

        if info.is_main:
            eval_tasks_dir()
        barrier(info)
        eval_tasks_dir()  # cached by now: every rank checks it is there
        return cls(settings, AutoTokenizer.from_pretrained(model_path), info, last_step, precision)

    def due(self, step: int, held_out_due: bool) -> bool:
        """Step 0 and the last step always; between them every eval.interval steps (null: with the held-out loss)."""
        interval = self.settings.interval
        if step in (0, self.last_step):
            return True
        if interval is None:
            return held_out_due
        return interval > 0 and step % interval == 0

    def run(
        self, step: int, model: nn.Module, autocast: contextlib.AbstractContextManager, taps: moe_losses.RouterTaps
    ) -> dict[str, Any]:
        """Score the tasks on the live model; the record, also kept as `latest`."""
        from upcycle.downstream.run import evaluate_model

        s = self.settings
        with autocast:
            report = evaluate_model(
                model,
                self.tokenizer,
                self.tasks,
                shots=s.shots,
                limit=s.limit,
                batch_size=s.batch_size,
                device=self.info.device,
                progress=lambda _task, _done, _total: taps.clear(),  # per batch: no training step reads them
            )
        taps.clear()
        self.latest = {"kind": KIND, "step": step, "precision": self.precision, **report.compact()}
        return self.latest

    def restore(self, run_dir: Path, step: int) -> None:
        """A resumed run's last task record up to its checkpoint, so an export at once still lists the scores."""
        records = [r for r in read_metrics(run_dir) if r.get("kind") == KIND and r.get("step", 0) <= step]
        self.latest = records[-1] if records else None

    @staticmethod
    def summary(record: dict[str, Any]) -> str:
        scores = ", ".join(f"{task} {100 * t['score']:.1f}" for task, t in record["tasks"].items())
        items = "every item" if record["limit"] is None else f"{record['limit']} items each"
        return f"step {record['step']}: {scores} (macro {100 * record['macro_average']:.1f}; {items})"
