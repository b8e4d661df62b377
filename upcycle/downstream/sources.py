"""Where a task's items come from: the item source's ready-made requests, or MMLU's prompts built by upcycle."""

from __future__ import annotations

from pathlib import Path

from upcycle.downstream.items import Item, load_items
from upcycle.downstream.mmlu import load_mmlu_items
from upcycle.downstream.tasks import TaskSpec


def load_task_items(folder: Path, spec: TaskSpec, shots: int, limit: int | None) -> list[Item]:
    """The first ``limit`` items of ``spec`` (all when None) with ``shots`` examples, in the source's fixed order."""
    loader = load_items if spec.prompt == "olmes" else load_mmlu_items
    return loader(folder, spec, shots, limit)
