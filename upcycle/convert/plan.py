"""The UpcyclePlan: every output tensor's recipe, the target config and the exactness claim, as data.

`--dry-run` prints it, the writer executes it, `upcycle.json` stores it and `verify` re-reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.convert import budget
from upcycle.convert.calibration import CalibrationRun, plan_calibrations
from upcycle.convert.exactness import (
    CODE_NAMES,
    DTYPE_NAMES,
    Exactness,
    expert_scales,
    mark_rounding,
    rounded_sources,
)
from upcycle.convert.expert_shape import check_expert_rows, check_granularity
from upcycle.convert.families import MLP_PROJECTIONS, DenseModel, SourceRef, describe_dense
from upcycle.convert.options import UpcycleOptions, parse_layers
from upcycle.convert.shared_expert import shared_expert_recipes
from upcycle.convert.source import DTYPE_CODES, DenseSource
from upcycle.convert.targets import TARGETS, Layout, Target, candidate_targets, check_options
from upcycle.convert.targets.base import expert_width
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


def build_plan(source: DenseSource, opts: UpcycleOptions, disk: tuple[int, Path] | None = None) -> UpcyclePlan:
    """Decide every output tensor; reads headers and config only, never weights (a `--router-init cluster` router
    also hashes the dense files and the calibration text, to name the centroids it will be made of).

    Before any recipe is made, the plan's size is estimated and refused when it exceeds the memory available or
    `disk` (free bytes, and where), so an absurd request fails in a moment rather than after minutes.
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
    target, config, config_check = _proven_target(source.config, dense, opts, layout, candidates, dtype)
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
    recipes = _recipes(source, dense, opts, layout, target, _tensor_dtypes(source, opts, dtype), keys)
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
    from upcycle.hf.config_check import check_config_equivalence

    failures = []
    for target in candidates:
        config = target.config(dense, opts, layout, dtype)
        report = check_config_equivalence(source_config, config)
        if report.equivalent:
            return target, config, _config_check_record(report)
        failures.append((target, report.first_problem))
    target, problem = failures[0]
    raise UnsupportedModelError(
        f"the {target.architecture} config upcycle would write does not compute what this {dense.title} model "
        f"computes ({problem}).",
        "nothing was written; choose another --target or other options. upcycle refuses rather than write an "
        "inexact model.",
    )


def _config_check_record(report) -> dict:
    import transformers

    return {
        "equivalent": report.equivalent,
        "transformers": transformers.__version__,
        "smallest_window": report.smallest_window,
        "moe_layers": report.moe_layers,
        "generation_points": report.generation_points,
    }


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


def _recipes(
    source: DenseSource,
    dense: DenseModel,
    opts: UpcycleOptions,
    layout: Layout,
    target: Target,
    dtype_of: DtypeOf,
    calibrated: dict[str, str],
) -> list[TensorRecipe]:
    """Every output tensor in the order a reader wants: embeddings, then layer by layer (MLP last), then the rest.

    `dtype_of(source tensor)` is the output dtype code of what is made from it."""
    moe = set(layout.moe_layers)
    mlp_names = dense.mlp_tensor_names()
    outer: list[TensorRecipe] = []
    per_layer: list[list[TensorRecipe]] = [[] for _ in range(dense.num_layers)]
    for name in sorted(source.tensors):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer transformers recomputes; an lm_head stored beside tied embeddings is kept: transformers
            # ties only when the two are equal, so the MoE must hold it to load as the dense model does
        if name in mlp_names:
            continue
        layer = dense.layer_of(name)
        for out_name, ref in dense.copies(name):
            recipe = _copy(target.rename(out_name), source, ref, dtype_of, -1 if layer is None else layer)
            (outer if layer is None else per_layer[layer]).append(recipe)
    for layer in range(dense.num_layers):
        if layer in moe:
            per_layer[layer] += _moe_block(layer, dense, opts, target, dtype_of, calibrated)
            continue
        for projection, ref in dense.mlp_sources(layer).items():
            per_layer[layer].append(_copy(target.dense_mlp_key(layer, projection), source, ref, dtype_of, layer))
    embeddings = [r for r in outer if "embed" in r.name]
    rest = [r for r in outer if "embed" not in r.name]
    return embeddings + [r for recipes in per_layer for r in recipes] + rest


def _copy(out_name: str, source: DenseSource, ref: SourceRef, dtype_of: DtypeOf, layer: int) -> TensorRecipe:
    """A tensor written as it is stored (or a block of its rows); layer -1 is outside the decoder layers."""
    shape = _shape(source, ref)
    return TensorRecipe(out_name, shape, dtype_of(ref.name), "copy", source=ref.name, source_rows=ref.rows, layer=layer)


def _shape(source: DenseSource, ref: SourceRef) -> tuple[int, ...]:
    """The shape of a source tensor, or of its block of rows."""
    full = tuple(source.tensors[ref.name].shape)
    return full if ref.rows is None else (ref.rows[1] - ref.rows[0], *full[1:])


def _moe_block(
    layer: int,
    dense: DenseModel,
    opts: UpcycleOptions,
    target: Target,
    dtype_of: DtypeOf,
    calibrated: dict[str, str],
) -> list[TensorRecipe]:
    """A layer's router, experts and extra tensors; `calibrated` holds the cache keys of data-made parts ("router",
    "split")."""
    scales, _ = expert_scales(opts)
    hidden, groups, shared = dense.hidden_size, opts.granularity, opts.shared_width
    sources = dense.mlp_sources(layer)
    dtype = dtype_of(sources["gate"].name)  # the MLP's dtype: the router's and any extra tensor's
    shard = expert_width(dense, opts)
    std = opts.router_std if opts.router_std is not None else float(dense.resolved.get("initializer_range") or 0.02)
    recipes = [
        TensorRecipe(
            target.router_key(layer),
            (opts.num_experts, hidden),
            "F32" if target.router_fp32 else dtype,
            "router",
            router_init=opts.router_init if opts.router_init in ("zero", "cluster", "hidden") else "random",
            router_std=std,
            calibration=calibrated.get("router", ""),
            group_size=groups,
            seed=opts.seed,
            layer=layer,
        )
    ]
    for expert in range(opts.num_experts):
        g = expert % groups  # expert e = n*G + g holds shard g of copy n; the shared expert's neurons come first
        span = (shared + g * shard, shared + (g + 1) * shard)
        sliced = groups > 1 or shared > 0
        common = dict(
            op="expert",
            drop_ratio=opts.drop_upcycling,
            drop_key=f"{layer}.{expert}",
            neuron_order=calibrated.get("split", ""),
            noise=opts.noise,
            seed=opts.seed,
            layer=layer,
            expert=expert,
        )
        for projection, scale in zip(MLP_PROJECTIONS, scales, strict=True):
            is_down = projection == "down"
            recipes.append(
                TensorRecipe(
                    target.expert_key(layer, expert, projection),
                    (hidden, shard) if is_down else (shard, hidden),
                    dtype=dtype_of(sources[projection].name),
                    source=sources[projection].name,
                    source_rows=sources[projection].rows,
                    rows=span if sliced and not is_down else None,
                    cols=span if sliced and is_down else None,
                    scale=scale,
                    drop_axis=1 if is_down else 0,
                    projection=projection,
                    **common,
                )
            )
    if target.stacked_experts:
        recipes = recipes[:1] + _stacked(layer, opts, target, recipes[1:], hidden, shard)
    if shared:
        recipes += shared_expert_recipes(layer, dense, opts, target, dtype_of)
    recipes += target.extra_tensors(layer, dense, opts, dtype)
    return recipes


def _stacked(
    layer: int, opts: UpcycleOptions, target: Target, experts: list[TensorRecipe], hidden: int, shard: int
) -> list[TensorRecipe]:
    """The per-expert recipes folded into the class's two stacked tensors: [E, 2F, H] (gate rows, then up) and
    [E, H, F]; a stack takes its parts' dtype, fp32 when they differ (a gate and up stored apart may)."""
    gate_up = tuple(r for r in experts if r.projection in ("gate", "up"))
    down = tuple(r for r in experts if r.projection == "down")
    return [
        _stack(target.stacked_key(layer, "gate_up"), (opts.num_experts, 2 * shard, hidden), gate_up, layer),
        _stack(target.stacked_key(layer, "down"), (opts.num_experts, hidden, shard), down, layer),
    ]


def _stack(name: str, shape: tuple[int, ...], parts: tuple[TensorRecipe, ...], layer: int) -> TensorRecipe:
    codes = {part.dtype for part in parts}
    code = codes.pop() if len(codes) == 1 else "F32"  # bf16 and fp16 hold each other's values only in fp32
    return TensorRecipe(
        name, shape, code, "stack", parts=tuple(dataclasses.replace(p, dtype=code) for p in parts), layer=layer
    )


__all__ = ["TARGETS", "UpcyclePlan", "build_plan"]
