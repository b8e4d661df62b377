"""Which runs a comparison makes, each one complete enough to be executed in another process.

Every arm runs at seed 0. The control and the MoE that was best at seed 0 then run with the other seeds too, so
seed noise is measured where the comparison's verdict is decided, at the cost of two arms rather than all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.compare.recipes import sized, with_model
from upcycle.compare.sizes import Size
from upcycle.compare.variants import Variant
from upcycle.train.recipe import TrainRecipe, recipe_from_dict


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: its recipe, and the upcycle to convert before it (if any)."""

    variant: str
    label: str
    seed: int
    recipe: TrainRecipe  # complete, paths absolute; run.output_dir is the run folder
    convert_from: str | None = None  # dense folder to upcycle into recipe.model.path first
    convert_options: dict[str, Any] | None = None  # UpcycleOptions fields
    keep_model: bool = False  # keep the converted model folder after the run
    sweep: dict[str, Any] | None = None  # a sweep's run: {"point": {key: value}, "control": bool}
    resumable: bool = False  # checkpoints kept until the run finishes, so a killed run continues from them

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data; :meth:`from_json` rebuilds the same spec (in the worker process).

        The sweep's fields appear only when set, so a comparison's spec (and the finished runs matched against
        it) reads as it always did.
        """
        data = {
            "variant": self.variant,
            "label": self.label,
            "seed": self.seed,
            "recipe": self.recipe.to_dict(),
            "convert_from": self.convert_from,
            "convert_options": self.convert_options,
            "keep_model": self.keep_model,
        }
        if self.sweep is not None:
            data["sweep"] = self.sweep
        if self.resumable:
            data["resumable"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{**data, "recipe": recipe_from_dict(data["recipe"], Path.cwd())})  # its paths are absolute


@dataclass(frozen=True)
class Plan:
    """The runs of one comparison: arms x seeds, each in ``out/runs/ARM-sSEED``."""

    size: Size
    out: Path
    arms: tuple[Variant, ...]
    control: Variant  # the arm the others are measured against (see variants.control_arm)
    seeds: int
    paper: TrainRecipe | None = None  # the paper arms' base recipe; None when every arm is a user recipe
    dense_model: Path | None = None  # the folder the paper's upcycles are converted from
    keep_models: bool = False

    @property
    def total(self) -> int:
        """Runs in all: every arm once, then the other seeds of the control and of the best other arm."""
        return len(self.arms) + (self.seeds - 1) * (2 if len(self.arms) > 1 else 1)

    def describe(self, isolate: bool) -> str:
        if not isolate:
            return f"plan: {self.total} runs, in this process"
        return (
            f"plan: {self.total} runs ({len(self.arms)} arms at seed 0, then {self.seeds - 1} more seed(s) of the "
            f"dense control and of the best MoE), one process each"
        )

    def first(self) -> list[RunSpec]:
        """Every arm at seed 0, then the control's other seeds."""
        return [self.spec(arm, 0) for arm in self.arms] + self.more_seeds(self.control)

    def more_seeds(self, arm: Variant) -> list[RunSpec]:
        return [self.spec(arm, seed) for seed in range(1, self.seeds)]

    def spec(self, arm: Variant, seed: int) -> RunSpec:
        run_dir = self.out / "runs" / f"{arm.name}-s{seed}"
        if arm.recipe is not None:
            return RunSpec(arm.name, arm.label, seed, sized(arm.recipe, self.size, run_dir, seed))
        if self.paper is None or self.dense_model is None:
            raise ValueError(f"arm {arm.name} needs the paper's base recipe and dense model")  # a programming error
        if arm.is_dense:
            return RunSpec(arm.name, arm.label, seed, sized(self.paper, self.size, run_dir, seed))
        model_dir = self.out / "models" / f"{arm.name}-s{seed}"
        options = {**(arm.options or {}), "seed": seed, "dtype": "float32"}
        if self.size.moe_layers != "all":
            options["layers"] = self.size.moe_layers
        recipe = sized(with_model(self.paper, model_dir), self.size, run_dir, seed)
        return RunSpec(arm.name, arm.label, seed, recipe, str(self.dense_model), options, self.keep_models)
