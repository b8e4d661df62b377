"""One run of a comparison or sweep, complete enough to be executed in another process.

Which runs there are, and at which seeds, is the sweep's plan (:class:`upcycle.experiments.sweep_plan.SweepPlan`): a
comparison is a sweep over named arms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.train.recipe import TrainRecipe, recipe_from_dict


@dataclass(frozen=True)
class RunSpec:
    """One training run: its recipe (an upcycle of ``model.source`` is converted, cached, first) and its place."""

    variant: str
    label: str
    seed: int
    recipe: TrainRecipe  # complete, paths absolute; run.output_dir is the run folder
    sweep: dict[str, Any] | None = None  # {"point": {key: value}, "control": bool}: its setting and role
    resumable: bool = False  # checkpoints kept until the run finishes, so a killed run continues from them

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data; :meth:`from_json` rebuilds the same spec (in the worker process)."""
        data = {"variant": self.variant, "label": self.label, "seed": self.seed, "recipe": self.recipe.to_dict()}
        if self.sweep is not None:
            data["sweep"] = self.sweep
        if self.resumable:
            data["resumable"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{**data, "recipe": recipe_from_dict(data["recipe"], Path.cwd())})  # its paths are absolute
