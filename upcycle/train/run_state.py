"""Where a run stands (what a checkpoint saves and a resumed run starts from), and what a finished run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from upcycle.train.conversion import Conversion
from upcycle.train.resume import ResumePoint


@dataclass
class Progress:
    """The run's position in its data stream and its optimizer, after the steps taken so far."""

    position: int = 0  # sequences of the training stream consumed
    tokens: int = 0  # tokens trained
    bad_steps: int = 0  # consecutive non-finite steps
    stepped: bool = False  # the optimizer took a real step, so it has state to save
    last_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the evaluations (without their expert loads)

    @classmethod
    def resumed(cls, point: ResumePoint, saved: dict[str, Any]) -> Progress:
        """Where a checkpoint's run stood (`saved`: its trainer state, as `trainer_state` wrote it)."""
        return cls(
            position=point.position,
            tokens=point.tokens,
            bad_steps=point.bad_steps,
            stepped=bool(saved.get("optimizer_stepped", True)),  # older checkpoints always saved the optimizer
            last_loss=saved.get("last_loss"),  # a finished run resumed trains nothing: its record still has it
            history=list(point.history),
        )

    def trainer_state(
        self, step: int, global_batch_sequences: int, world_size: int, recipe: dict[str, Any], tokens_sha256: str | None
    ) -> dict[str, Any]:
        """The checkpoint's record of the run after `step` steps (read back by `upcycle.train.resume`)."""
        return {
            "step": step,
            "tokens": self.tokens,
            "data_position": self.position,
            "global_batch_sequences": global_batch_sequences,
            "world_size": world_size,
            "bad_steps": self.bad_steps,
            "optimizer_stepped": self.stepped,  # before the first real step there is no optimizer state to save
            "eval_history": self.history,
            "recipe": recipe,
            "last_loss": self.last_loss,
            "train_tokens_sha256": tokens_sha256,  # what was trained on, whatever produced it
        }


@dataclass
class TrainSummary:
    """What `upcycle.train.loop.train` returns: the run's totals, its evaluations and where its export went."""

    steps: int
    tokens: int
    final_loss: float | None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    export_dir: str | None = None
    resumed_from: int | None = None
    seconds: float = 0.0
    conversion: Conversion | None = None  # the recipe's upcycle (model.source), converted or reused
