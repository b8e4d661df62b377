"""The MergePlan: a conversion plan of the base model whose experts are read from other models.

The base is planned as `upcycle convert` plans it (E copies, the target proven to compute what the base computes
outside the MLPs); then each expert's recipes read expert i's model instead of the base, the routers take the rows
gate_mode makes, and a shared expert (Qwen2-MoE) is the shared model's whole MLP behind its sigmoid gate. Every
source must have the base's family and shapes, so expert i's MLP drops into the base's layers unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.convert.calibration import Calibration, CalibrationRun
from upcycle.convert.families import DenseModel, describe_dense
from upcycle.convert.merge.spec import MergeSpec
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.plan import UpcyclePlan, build_plan
from upcycle.convert.source import DenseSource
from upcycle.convert.tensor_recipe import TensorRecipe
from upcycle.convert.written_plan import split_into_shards
from upcycle.errors import UnsupportedModelError


def expert_prefix(index: int, shared: bool = False) -> str:
    """How a merge's recipe names a tensor of expert `index`'s model (the base's tensors keep their names)."""
    return f"{'shared_experts' if shared else 'experts'}[{index}]/"


@dataclass
class MergePlan(UpcyclePlan):
    merge: dict = field(default_factory=dict)  # the merge config as read, and each source's name

    def to_json(self) -> dict:
        return self.record_head(kind="merge", family=self.family, merge=self.merge) | self.record_tail()


class MergedSource(DenseSource):
    """The base's tensors, and every expert model's under its prefix; its weight files (which the writer hashes
    into upcycle.json's `source`) are the base's: each expert model's are hashed into the merge record."""

    def __init__(self, base: DenseSource, tensors: dict) -> None:
        super().__init__(base.folder, base.config, tensors)
        self._base_files = base.weight_files

    @property
    def weight_files(self) -> list[Path]:
        return self._base_files


def merged_source(base: DenseSource, experts: list[DenseSource], shared: list[DenseSource]) -> MergedSource:
    tensors = dict(base.tensors)
    for models, is_shared in ((experts, False), (shared, True)):
        for index, model in enumerate(models):
            prefix = expert_prefix(index, is_shared)
            tensors |= {prefix + name: info for name, info in model.tensors.items()}
    return MergedSource(base, tensors)


def build_merge_plan(
    spec: MergeSpec,
    base: DenseSource,
    experts: list[DenseSource],
    shared: list[DenseSource],
    names: dict[str, str],
    seed: int = 0,
    shard_size: int = 2 * 1000**3,
) -> tuple[MergePlan, DenseSource]:
    """The plan and the source it reads (the base, and each expert model under its prefix)."""
    dense = describe_dense(base.config, base.tensors)
    for index, model in enumerate(experts):
        _check_same_shape(dense, model, f"experts[{index}] ({names[f'experts[{index}]']})")
    for index, model in enumerate(shared):
        _check_same_shape(dense, model, f"shared_experts[{index}] ({names[f'shared_experts[{index}]']})")
    target = spec.target or "auto"
    if shared and target == "auto":
        target = "qwen2_moe"
    opts = UpcycleOptions(
        experts=len(spec.experts),
        top_k=spec.experts_per_token,
        router_init="zero",  # replaced below by the rows gate_mode makes
        target=target,
        dtype=spec.dtype or "auto",
        seed=seed,
        shard_size=shard_size,
    )
    plan = build_plan(base, opts)
    if shared and plan.target != "qwen2_moe":
        raise UnsupportedModelError(
            f"shared_experts: the {plan.architecture} class has no shared expert.",
            "remove shared_experts, or set architecture: qwen (Qwen2-MoE).",
        )
    run = gate_run(spec, base, plan.moe_layers, seed)
    recipes = [_from_models(recipe, spec, run.calibration.key) for recipe in plan.recipes]
    if shared:
        recipes = _with_shared_expert(recipes, dense, run.calibration.key, spec)
        plan.config["shared_expert_intermediate_size"] = dense.intermediate_size
        plan.config_check = _recheck(base.config, plan.config)
    plan.exactness.exact = False
    plan.exactness.exact_up_to_rounding = False
    plan.exactness.method = f"merge of {len(spec.experts)} models' MLPs (gate_mode {spec.gate_mode})"
    plan.exactness.notes = [
        "a merge computes no single source model: verify proves its parts (each expert is its model's MLP, every "
        "other tensor the base's) and measures its distance from each source",
        run.calibration.describe(),
    ]
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(UpcyclePlan)}
    fields |= {"shards": split_into_shards(recipes, shard_size), "calibrations": [run]}
    merge = {"config": spec.to_json(), "config_sha256": spec.sha256, "sources": names, "seed": seed}
    return MergePlan(**fields, merge=merge), merged_source(base, experts, shared)


def _check_same_shape(dense: DenseModel, model: DenseSource, what: str) -> None:
    other = describe_dense(model.config, model.tensors)
    mine = (dense.family, dense.num_layers, dense.hidden_size, dense.intermediate_size)
    theirs = (other.family, other.num_layers, other.hidden_size, other.intermediate_size)
    if mine != theirs:
        shape = "{} with {} layers, hidden {}, intermediate {}"
        raise UnsupportedModelError(
            f"{what} is a {shape.format(*theirs)}; the base is a {shape.format(*mine)}.",
            "merge fine-tunes of the base model (one family and shape).",
        )
    for layer in range(dense.num_layers):
        for projection, ref in dense.mlp_sources(layer).items():
            theirs_ref = other.mlp_sources(layer)[projection]
            if (ref.name, ref.rows) != (theirs_ref.name, theirs_ref.rows):
                raise UnsupportedModelError(
                    f"{what} stores layer {layer}'s {projection} projection as {theirs_ref.name}, the base as "
                    f"{ref.name}.",
                    "save both models with the same transformers version (save_pretrained), then merge.",
                )


def gate_run(spec: MergeSpec, base: DenseSource, layers: tuple[int, ...], seed: int) -> CalibrationRun:
    """The gate rows a merge's routers are made of, named by a key of everything they depend on."""
    from upcycle.hashing import file_sha256

    prompts = [[list(e.positive_prompts), list(e.negative_prompts)] for e in spec.gated]
    if spec.gate_mode in ("random", "uniform_random"):  # drawn from the seed and the shapes the config gives
        config_sha = hashlib.sha256(json.dumps(base.config, sort_keys=True).encode()).hexdigest()
        digests: tuple = (("config.json", config_sha),)
        seed_used = seed
    else:
        digests = tuple(sorted((f.name, file_sha256(f)) for f in [*base.weight_files, base.folder / "config.json"]))
        seed_used = 0
    data_sha = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()
    calibration = Calibration(
        f"gates:{spec.gate_mode}", digests, data_sha, "the merge config", 0, layers, len(prompts), seed_used
    )
    return CalibrationRun(calibration, prompts, {})


def _from_models(recipe: TensorRecipe, spec: MergeSpec, key: str) -> TensorRecipe:
    """A base recipe turned into the merge's: an expert reads its model, a router takes the gate rows."""
    if recipe.op == "router":
        return dataclasses.replace(
            recipe, router_init="given", calibration=key, rows=(0, len(spec.experts)), router_std=0.0
        )
    if recipe.op == "stack":
        return dataclasses.replace(recipe, parts=tuple(_from_models(part, spec, key) for part in recipe.parts))
    if recipe.op != "expert" or recipe.expert < 0:
        return recipe
    scale = spec.experts[recipe.expert].residual_scale
    return dataclasses.replace(
        recipe,
        source=expert_prefix(recipe.expert) + str(recipe.source),
        scale=scale if scale is not None and recipe.projection == "down" else recipe.scale,
    )


def _with_shared_expert(
    recipes: list[TensorRecipe], dense: DenseModel, key: str, spec: MergeSpec
) -> list[TensorRecipe]:
    """Qwen2-MoE's zero-wide shared expert replaced by the shared model's MLP, its gate by that expert's row."""
    out, routed, scale = [], len(spec.experts), spec.shared_experts[0].residual_scale
    for recipe in recipes:
        name, layer = recipe.name, recipe.layer
        if name.endswith(".shared_expert_gate.weight"):
            out.append(
                dataclasses.replace(
                    recipe, op="router", router_init="given", calibration=key, rows=(routed, routed + 1)
                )
            )
        elif ".shared_expert." in name:
            projection = name.rsplit(".", 2)[-2].removesuffix("_proj")
            ref = dense.mlp_sources(layer)[projection]
            full = dense.intermediate_size
            out.append(
                dataclasses.replace(
                    recipe,
                    op="expert",
                    shape=(dense.hidden_size, full) if projection == "down" else (full, dense.hidden_size),
                    source=expert_prefix(0, shared=True) + ref.name,
                    source_rows=ref.rows,
                    projection=projection,
                    scale=scale if scale is not None and projection == "down" else 1.0,
                )
            )
        else:
            out.append(recipe)
    return out


def _recheck(base_config: dict, config: dict) -> dict:
    from upcycle.hf.config_check import check_config_equivalence

    report = check_config_equivalence(base_config, config)
    if not report.equivalent:
        raise UnsupportedModelError(
            f"the Qwen2-MoE config with a shared expert does not compute what the base does outside its MLPs "
            f"({report.first_problem}).",
            "remove shared_experts.",
        )
    return report.record()


__all__ = ["MergePlan", "MergedSource", "build_merge_plan", "expert_prefix", "gate_run", "merged_source"]
