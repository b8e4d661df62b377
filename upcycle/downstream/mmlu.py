"""MMLU items with lm-evaluation-harness' prompts, built from the question tables (the item source has no requests).

Two formats, as the harness names them: ``mmlu`` (the question, its four options lettered A-D, and "Answer:";
the continuations are the letters, scored by acc, as papers report MMLU) and ``mmlu_continuation`` (the
question and "Answer:"; the continuations are the options' texts, so bits per byte of the gold answer means
something at sizes where letter accuracy is at chance). Few-shot examples are the subject's first ``dev``
questions, each followed by its answer, as the harness' ``first_n`` sampler takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.downstream.items import Item, Request
from upcycle.downstream.tasks import TaskSpec
from upcycle.errors import OptionError, SourceError

LETTERS = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
SUBJECTS_IN_ALL = 57


def _question_text(spec: TaskSpec, question: dict[str, Any]) -> str:
    if spec.prompt == "mmlu_letters":
        options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, question["choices"], strict=True))
        return f"{question['question'].strip()}{options}\nAnswer:"
    return f"Question: {question['question'].strip()}\nAnswer:"


def _answers(spec: TaskSpec, question: dict[str, Any]) -> tuple[str, ...]:
    return LETTERS if spec.prompt == "mmlu_letters" else tuple(question["choices"])


def _description(spec: TaskSpec, subject: str) -> str:
    kind = "multiple choice questions" if spec.prompt == "mmlu_letters" else "questions"
    return f"The following are {kind} (with answers) about {subject.replace('_', ' ')}.{FEWSHOT_DELIMITER}"


def prompt_item(spec: TaskSpec, subject: str, examples: Sequence[dict], question: dict, doc_id: int) -> Item:
    """One test question as the harness' MMLU task prompts it, after ``examples`` (already cut to the shots)."""
    shown = "".join(
        _question_text(spec, e) + TARGET_DELIMITER + _answers(spec, e)[e["answer"]] + FEWSHOT_DELIMITER
        for e in examples
    )
    context = _description(spec, subject) + shown + _question_text(spec, question)
    choices = tuple(Request(context, TARGET_DELIMITER + answer) for answer in _answers(spec, question))
    return Item(doc_id, f"{subject}/{question['index']}", choices, int(question["answer"]))


def _read_table(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa
    except ImportError:
        raise OptionError(
            "MMLU's questions are Arrow tables, and pyarrow is not installed.", "pip install 'upcycle[eval]'."
        ) from None
    try:
        with pa.memory_map(str(path)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        raise SourceError(f"{path} is damaged ({e}).", f"Delete {path.parents[2]} and run again.") from e
    if not rows or any(len(r.get("choices") or ()) != len(LETTERS) or r.get("answer") not in range(4) for r in rows):
        raise SourceError(f"{path} is not an MMLU table.", f"Delete {path.parents[2]} and run again.")
    return [{**r, "index": i} for i, r in enumerate(rows)]


def load_mmlu_items(folder: Path, spec: TaskSpec, shots: int, limit: int | None) -> list[Item]:
    """Every subject's test questions, taken in turn (the first of each subject, then the second, ...), so the first
    ``limit`` items spread over all 57 subjects; doc ids number the questions subject by subject, alphabetically."""
    spec.variant(shots)  # checks the count
    root = folder / "mmlu"
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(subjects) != SUBJECTS_IN_ALL:
        raise SourceError(
            f"the task data has {len(subjects)} MMLU subjects, not 57.", f"Delete {folder} and run again."
        )
    per_subject, first_id = [], 0
    for subject in subjects:
        examples = _read_table(root / subject / "dev.arrow")[:shots] if shots else []
        questions = _read_table(root / subject / "test.arrow")
        per_subject.append([prompt_item(spec, subject, examples, q, first_id + q["index"]) for q in questions])
        first_id += len(questions)
    interleaved = [
        items[turn] for turn in range(max(len(s) for s in per_subject)) for items in per_subject if turn < len(items)
    ]
    return interleaved if limit is None else interleaved[:limit]
