"""What a training run tells the outside world: the CLI draws it, a sweep's worker prints it, a test keeps it."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI draws it); every method is called on rank 0 only."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def evaluated(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def working(self, what: str, done: int | None = None, total: int | None = None) -> None:
        """A wait before training starts (converting, tokenising, loading), with its count when it has one."""


class SilentReporter:
    """The reporter of every rank but the first, and of a run started without one."""

    def start(self, info: dict[str, Any]) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def evaluated(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def working(self, what: str, done: int | None = None, total: int | None = None) -> None:
        pass


def announce(reporter: Reporter, what: str, done: int | None = None, total: int | None = None) -> None:
    """Tell the reporter what the run waits for, when it listens (reporters written before `working` do not)."""
    working = getattr(reporter, "working", None)
    if working is not None:
        working(what, done, total)
