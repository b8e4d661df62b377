"""Errors a user can act on: each carries the problem, the fix and a distinct exit code."""

from __future__ import annotations


class UpcycleError(Exception):
    """A failure caused by the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} Fix: {self.fix}" if self.fix else self.problem


class SourceError(UpcycleError):
    """The dense source checkpoint is missing, malformed or incomplete."""


class UnsupportedModelError(UpcycleError):
    """No exact native MoE target exists for this family or config."""


class OptionError(UpcycleError):
    """Conversion options are inconsistent with each other or with the model."""


class OutputError(UpcycleError):
    """The output location cannot be written (exists, disk full, interrupted)."""
