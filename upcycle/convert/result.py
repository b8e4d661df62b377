"""What writing a plan returns (a conversion or a growth): importable without torch, for callers that only report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from upcycle.convert.written_plan import WrittenPlan

P = TypeVar("P", bound="WrittenPlan")


@dataclass
class Written(Generic[P]):
    plan: P
    out: Path | None  # None for a dry run
    bytes_written: int
    seconds: float
