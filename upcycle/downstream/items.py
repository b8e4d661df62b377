"""Task items from the cached request files: one item per document, one (context, continuation) per choice."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from upcycle.downstream.tasks import TaskSpec
from upcycle.errors import SourceError

# The request files also score each choice without its question (for calibrated metrics); those documents are
# numbered from here on, and upcycle's metrics do not use them.
UNCONDITIONED_FROM = 1_000_000


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    doc_id: int
    native_id: str
    choices: tuple[Request, ...]  # for a last-word task: the one gold continuation
    gold: int


def load_items(folder: Path, spec: TaskSpec, shots: int, limit: int | None) -> list[Item]:
    """The first ``limit`` items (all when None) in the source's fixed order, so every run scores the same ones."""
    path = folder / spec.name / spec.variant(shots) / "requests.jsonl.gz"
    if not path.is_file():
        raise SourceError(f"the task data has no {path.relative_to(folder)}.", f"Delete {folder} and run again.")
    by_doc: dict[int, list[dict]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                if record["doc_id"] < UNCONDITIONED_FROM:
                    by_doc.setdefault(record["doc_id"], []).append(record)
    except (OSError, EOFError, json.JSONDecodeError, KeyError) as e:
        raise SourceError(f"{path} is damaged ({e}).", f"Delete {folder} and run again.") from e
    items = [_item(spec, doc_id, sorted(records, key=lambda r: r["idx"])) for doc_id, records in sorted(by_doc.items())]
    return items if limit is None else items[:limit]


def _item(spec: TaskSpec, doc_id: int, records: list[dict]) -> Item:
    first = records[0]
    choices = tuple(Request(r["request"]["context"], r["request"]["continuation"]) for r in records)
    gold = 0 if spec.kind == "last_word" else int(first["label"])
    if not 0 <= gold < len(choices) or (spec.kind == "last_word" and len(choices) != 1):
        raise SourceError(f"{spec.name} document {doc_id} is malformed.", "Delete the task data cache and run again.")
    return Item(doc_id, str(first.get("native_id", doc_id)), choices, gold)
