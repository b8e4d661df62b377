"""The UpcyclePlan: every output tensor's recipe, the target config and the exactness claim, as data.

`--dry-run` prints it, the writer executes it, `upcycle.json` stores it and `verify` re-reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from upcycle.convert import budget
from upcycle.convert.calibration import CalibrationRun, plan_calibrations
from upcycle.convert.config_memo import remembered
from upcycle.convert.exactness import (
    CODE_NAMES,
    DTYPE_NAMES,
    Exactness,
    expert_scales,
    mark_rounding,
    rounded_sources,
)
from upcycle.convert.expert_shape import check_expert_rows, check_granularity
from upcycle.convert.families import DenseModel, describe_dense
from upcycle.convert.layer_recipes import RecipeMaker
from upcycle.convert.options import UpcycleOptions, parse_layers
from upcycle.convert.source import DTYPE_CODES, DenseSource
from upcycle.convert.targets import TARGETS, Layout, Target, candidate_targets, check_options
from upcycle.convert.tensor_recipe import DtypeOf, TensorRecipe
from upcycle.convert.written_plan import WrittenPlan, recorded_fields, split_into_shards
from upcycle.errors import UnsupportedModelError
from upcycle.memory import available_memory


@dataclass
class UpcyclePlan(WrittenPlan):
    options: UpcycleOptions
    family: str
    target: str
    architecture: str
    dtype: str  # output dtype name, e.g. "bfloat16"
    moe_layers: tuple[int, ...]
    config: dict  # the target's config.json
    shards: list[list[TensorRecipe]]  # one list per output safetensors file, in write order
    exactness: Exactness
    config_check: dict = field(default_factory=dict)  # the config-equivalence check convert ran (summary)
    source: dict = field(default_factory=dict)  # path and file hashes, filled in by the writer
    copied_files: dict | None = None  # tokenizer/generation files copied, with sha256 (the writer; None: unrecorded)
    calibrations: list[CalibrationRun] = field(default_factory=list)  # run before writing; not in upcycle.json

    def to_json(self) -> dict:
        return self.record_head(family=self.family, options=self.options.to_json()) | self.record_tail()

    @classmethod
    def from_json(cls, data: dict, config: dict) -> UpcyclePlan:
        fields = recorded_fields(data, config)
        return cls(options=UpcycleOptions(**data["options"]), family=data["family"], **fields)


def build_plan(
    source: DenseSource, opts: UpcycleOptions, disk: tuple[int, Path] | None = None, *, prove: bool = True
) -> UpcyclePlan:
    """Decide every output tensor; reads headers and config only, never weights (a `--router-init cluster` router
    also hashes the dense files and the calibration text, to name the centroids it will be made of).

    Before any recipe is made, the plan's size is estimated and refused when it exceeds the memory available or
    `disk` (free bytes, and where), so an absurd request fails in a moment rather than after minutes.

    The target is the first candidate whose config the config check proves. Without `prove`, it is the first
    candidate, unproven: `prove_plan` must then admit the plan before anything made from it is published (the
    check and the writing can run side by side), and a refusal means planning again with `prove`.
    """
    check_options(opts)
    dense = describe_dense(source.config, source.tensors)
    layout = Layout(parse_layers(opts.layers, dense.num_layers), dense.num_layers)
    candidates = candidate_targets(dense, opts, layout)
    check_granularity(dense, opts)
    dtype = _output_dtype(source, dense, opts)
    stacked = all(target.stacked_experts for target in candidates)
    needed = budget.estimate(source, dense, opts, len(layout.moe_layers), DTYPE_NAMES[dtype], stacked)
    budget.check_fits(needed, available_memory(), *(disk if disk is not None else (None, None)))
    row_note = check_expert_rows(dense, opts, dtype)
    if prove:
        target, config, config_check = _proven_target(source.config, dense, opts, layout, candidates, dtype)
    else:
        target, config_check = candidates[0], {}
        config = target.config(dense, opts, layout, dtype)
    _, exactness = expert_scales(opts)
    if row_note:
        exactness.notes.append(row_note)
    if opts.shared_width:
        exactness.method += f", shared expert of {opts.shared_width} neurons"
        if target.shared_expert == "gated":
            exactness.notes.append("the shared expert's gate is zero (sigmoid 1/2) and its down projection doubled")
    if opts.drop_upcycling:
        exactness.exact = False
        exactness.notes.append(f"Drop-Upcycling re-draws {opts.drop_upcycling:.0%} of each expert's neurons")
    if opts.noise:
        exactness.exact = False
        exactness.notes.append(f"Gaussian noise of {opts.noise:g} x each tensor's std added to every expert")
    runs = plan_calibrations(source, dense, opts, layout.moe_layers)
    exactness.notes += [run.calibration.describe() for run in runs.values()]
    keys = {purpose: run.calibration.key for purpose, run in runs.items()}
    maker = RecipeMaker(source, dense, opts, target, _tensor_dtypes(source, opts, dtype), keys)
    recipes = maker.all(layout)
    mark_rounding(exactness, rounded_sources(source, recipes))
    return UpcyclePlan(
        options=opts,
        family=dense.family,
        target=target.name,
        architecture=target.architecture,
        dtype=dtype,
        moe_layers=layout.moe_layers,
        config=config,
        shards=split_into_shards(recipes, opts.shard_size),
        exactness=exactness,
        config_check=config_check,
        calibrations=list(runs.values()),
    )


class NotProven(Exception):
    """The config check refused the target of a plan built without `prove` (another candidate may pass)."""


def prove_plan(plan: UpcyclePlan, source_config: dict) -> None:
    """The config check a plan built without `prove` still owes: record it, or raise NotProven."""
    record, problem = config_verdict(source_config, plan.config)
    if record is None:
        raise NotProven(problem)
    plan.config_check = record


def config_verdict(source_config: dict, config: dict) -> tuple[dict | None, str | None]:
    """(the check's record, None) when the MoE config computes what the dense one does, else (None, why not);
    a passing verdict is remembered for the pair (`config_memo`)."""

    def check() -> tuple[dict | None, str | None]:
        from upcycle.hf.config_check import check_config_equivalence

        report = check_config_equivalence(source_config, config)
        return (report.record(), None) if report.equivalent else (None, report.first_problem)

    return remembered("config check", [source_config, config], check, encode=list, decode=tuple, keep=_passed)


def _passed(verdict: tuple[dict | None, str | None]) -> bool:
    record, _ = verdict
    return isinstance(record, dict) and record.get("equivalent") is True


def _proven_target(
    source_config: dict,
    dense: DenseModel,
    opts: UpcycleOptions,
    layout: Layout,
    candidates: list[Target],
    dtype: str,
) -> tuple[Target, dict, dict]:
    """The first candidate whose config makes transformers compute what the dense config does, checked
    independently of this module's mapping; refuse when none does (nothing is written)."""
    failures = []
    for target in candidates:
        config = target.config(dense, opts, layout, dtype)
        record, problem = config_verdict(source_config, config)
        if record is not None:
            return target, config, record
        failures.append((target, problem))
    target, problem = failures[0]
    raise UnsupportedModelError(
        f"the {target.architecture} config upcycle would write does not compute what this {dense.title} model "
        f"computes ({problem}).",
        "nothing was written; choose another --target or other options. upcycle refuses rather than write an "
        "inexact model.",
    )


def _tensor_dtypes(source: DenseSource, opts: UpcycleOptions, dtype: str) -> DtypeOf:
    """The output dtype code of a tensor made from a source tensor: as that tensor (--dtype auto), or as asked."""
    model_code = DTYPE_NAMES[dtype]
    if opts.dtype != "auto":
        return lambda name: model_code

    def as_stored(name: str) -> str:
        code = DTYPE_CODES.get(source.tensors[name].dtype)
        return code if code in CODE_NAMES else "F32"  # float64 has no output dtype: rounded, and said so

    return as_stored


def _output_dtype(source: DenseSource, dense: DenseModel, opts: UpcycleOptions) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    declared = dense.config.get("dtype") or dense.config.get("torch_dtype")  # as written: absent means unknown
    if declared in DTYPE_NAMES:
        return declared
    code = DTYPE_CODES.get(source.tensors[dense.mlp_sources(0)["gate"].name].dtype, "F32")
    return CODE_NAMES.get(code, "float32")


__all__ = ["TARGETS", "UpcyclePlan", "build_plan"]
