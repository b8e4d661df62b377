"""`verify CONFIG.yaml MERGED`: prove a merge's parts and measure the whole.

A merge computes no single source model, so there is no equivalence to prove; its parts are proven instead:
- every tensor the merged folder shares a name with the base is the base's (in the merged dtype), and every base
  tensor it lacks is an MLP tensor the experts replace;
- in every MoE layer, routing forced to expert i (weight 1, through the class's own experts module in
  transformers) gives source model i's MLP output, and the shared expert gives the shared model's;
- the router rows are the rows this config's gate_mode makes from this base (re-made when not cached);
- the config computes what the base's computes outside the MLPs (the config probe), and the tokenizer and
  generation files load as the base's do;
then the whole model's logits on real text are compared with the base's and each source's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from upcycle.errors import SourceError

if TYPE_CHECKING:
    from upcycle.convert.merge.spec import MergeSpec

FORCED_TOLERANCE = 1e-5  # relative: the same weights through the experts module and the dense MLP, in fp32
# a residual_scale multiplies a down projection in fp32 before it is stored: its rounding, at most half a unit
SCALED_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


@dataclass
class ForcedRouting:
    expert: str  # "experts[i]" or "shared_experts[i]"
    source: str
    worst_relative: float  # over the MoE layers
    layers: int
    tolerance: float = FORCED_TOLERANCE


@dataclass
class SourceDistance:
    model: str  # "base_model", "experts[i]", ...
    source: str
    logits_relative: float
    top1_agreement: float


@dataclass
class MergeReport:
    tensors_from_base: int = 0
    base_tensors_replaced: int = 0
    weight_problems: list[str] = field(default_factory=list)
    routers_checked: int = 0
    config_equivalent: bool = False
    config_problem: str = ""
    file_problems: list[str] = field(default_factory=list)
    forced: list[ForcedRouting] = field(default_factory=list)
    distances: list[SourceDistance] = field(default_factory=list)
    tokens: int = 0
    text_source: str = ""
    dtype: str = ""

    @property
    def parts_proven(self) -> bool:
        return (
            not self.weight_problems
            and self.config_equivalent
            and not self.file_problems
            and self.routers_checked > 0
            and bool(self.forced)
            and all(f.worst_relative <= f.tolerance for f in self.forced)
        )

    def to_json(self) -> dict:
        return {"parts_proven": self.parts_proven, **asdict(self)}


def verify_merge(config: Path, merged: Path, tokens: int = 256, text: str | None = None) -> MergeReport:
    from upcycle.convert.merge.sources import open_merge_sources
    from upcycle.convert.merge.spec import read_merge_spec
    from upcycle.convert.source import DenseSource
    from upcycle.hf.config_check import check_config_equivalence
    from upcycle.verify.files import check_files

    spec = read_merge_spec(config)
    base, experts, shared, names = open_merge_sources(spec)
    moe = DenseSource.open(merged)
    record = _record(merged)
    report = MergeReport(dtype=record.get("dtype", ""))
    _check_tensors(report, base, moe, record)
    _check_routers(report, record, moe, spec, base)
    check = check_config_equivalence(base.config, moe.config)
    report.config_equivalent, report.config_problem = check.equivalent, check.first_problem or ""
    report.file_problems = check_files(base.folder, merged, record.get("copied_files"), byte_equal=True).differences
    _check_forced_routing(report, merged, spec, experts + shared, names)
    _measure_distances(report, merged, base, experts, shared, names, tokens, text)
    return report


def _record(merged: Path) -> dict:
    try:
        record = json.loads((merged / "upcycle.json").read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("kind") != "merge":
        raise SourceError(f"{merged} holds no merge record (upcycle.json).", "pass the OUT folder of `upcycle merge`.")
    return record


def _check_tensors(report: MergeReport, base, moe, record: dict) -> None:
    """Each tensor copied from the base (by name, or by its rows of a fused base tensor) equals it; every other base
    tensor is an MLP tensor the experts replace (or a head tied to the embeddings)."""
    recipes = {r["name"]: r for shard in record.get("shards", {}).values() for r in shard}
    carried = set()
    for name in sorted(moe.tensors):
        recipe = recipes.get(name)
        if recipe is None or recipe["op"] != "copy":
            continue  # experts and routers: checked by function and by re-making the rows
        source, rows = recipe.get("source") or name, recipe.get("source_rows")
        carried.add(source)
        if source not in base.tensors:
            report.weight_problems.append(f"{name} is made from {source}, which the base lacks")
            continue
        want, kept = base.read(source), moe.read(name)
        want = want[rows[0] : rows[1]] if rows else want
        if not torch.equal(want.to(kept.dtype), kept):
            report.weight_problems.append(f"{name} differs from the base's")
        report.tensors_from_base += 1
    tied = bool(base.config.get("tie_word_embeddings"))
    for name in sorted(set(base.tensors) - carried):
        if ".mlp." in name and name.rsplit(".", 2)[-2] in MLP_NAMES:
            report.base_tensors_replaced += 1
        elif not (name == "lm_head.weight" and tied) and not name.endswith("rotary_emb.inv_freq"):
            report.weight_problems.append(f"the base's {name} is not in the merge")


def _check_routers(report: MergeReport, record: dict, moe, spec: MergeSpec, base) -> None:
    """The router rows are the rows this config's gate_mode makes from this base (re-made when not cached)."""
    from upcycle.convert.materialize import materialize
    from upcycle.convert.merge.plan import gate_run
    from upcycle.convert.tensor_recipe import TensorRecipe

    routers = [
        TensorRecipe.from_json(r)
        for shard in record.get("shards", {}).values()
        for r in shard
        if r.get("router_init") == "given"
    ]
    layers = tuple(record.get("moe_layers", ()))
    run = gate_run(spec, base, layers, int(record["merge"].get("seed", 0)))
    keys = {recipe.calibration for recipe in routers}
    if keys != {run.calibration.key}:
        report.weight_problems.append(
            "the routers were not made by this config's gate_mode and prompts from this base (another config, "
            "seed or base model)"
        )
        return
    run.ensure(base.folder)  # re-made here when this machine lacks them (gate_mode hidden runs the base)
    for recipe in routers:
        made = materialize(recipe, lambda name, dtype=None: None)  # a router reads no source tensor
        if not torch.equal(made, moe.read(recipe.name)):
            report.weight_problems.append(f"{recipe.name} is not the gate rows gate_mode made")
        report.routers_checked += 1


def _check_forced_routing(report: MergeReport, merged: Path, spec: MergeSpec, models: list, names: dict) -> None:
    from upcycle.hf.loading import dtype_named, load_causal_lm_strict
    from upcycle.hf.moe_modules import decoder_layers, moe_block_of

    moe = load_causal_lm_strict(merged, dtype_named(report.dtype or "float32")).float().eval()
    found = [(i, moe_block_of(layer)) for i, layer in enumerate(decoder_layers(moe))]
    blocks = [(i, block) for i, block in found if block is not None]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, moe.config.hidden_size, generator=generator)
    routed = len(spec.experts)
    for position, (expert, source) in enumerate(zip(spec.gated, models, strict=True)):
        kind, index = ("experts", position) if position < routed else ("shared_experts", position - routed)
        dense = load_causal_lm_strict(source.folder, dtype_named(report.dtype or "float32")).float().eval()
        dense_layers = decoder_layers(dense)
        scale = expert.residual_scale if expert.residual_scale is not None else 1.0
        worst = 0.0
        with torch.no_grad():
            for layer, block in blocks:
                want = _dense_mlp(dense_layers[layer])(x) * scale
                if kind == "experts":
                    ids = torch.full((len(x), 1), index, dtype=torch.long)
                    got = block.experts(x, ids, torch.ones(len(x), 1))
                else:
                    got = block.shared_expert(x)
                size = want.norm().item()
                worst = max(worst, (got - want).norm().item() / (size if size else 1.0))
        key = f"{kind}[{index}]"
        tolerance = FORCED_TOLERANCE if scale == 1.0 else SCALED_TOLERANCE.get(report.dtype, FORCED_TOLERANCE)
        report.forced.append(ForcedRouting(key, names[key], worst, len(blocks), tolerance))


def _measure_distances(
    report: MergeReport, merged: Path, base, experts: list, shared: list, names: dict, tokens: int, text: str | None
) -> None:
    from upcycle.hf.loading import load_causal_lm_strict
    from upcycle.verify.function import load_text_tokens

    moe = load_causal_lm_strict(merged, torch.float32).eval()
    ids, report.text_source = load_text_tokens(merged, text, tokens, moe.config.vocab_size)
    report.tokens = len(ids)
    with torch.no_grad():
        merged_logits = moe(ids[None]).logits[0].double()
    models = [("base_model", base)] + [(f"experts[{i}]", m) for i, m in enumerate(experts)]
    models += [(f"shared_experts[{i}]", m) for i, m in enumerate(shared)]
    for key, source in models:
        dense = load_causal_lm_strict(source.folder, torch.float32).eval()
        with torch.no_grad():
            logits = dense(ids[None]).logits[0].double()
        relative = ((merged_logits - logits).norm() / logits.norm()).item()
        agreement = (merged_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
        report.distances.append(SourceDistance(key, names[key], relative, agreement))


def _dense_mlp(layer: torch.nn.Module) -> torch.nn.Module:
    """A dense decoder layer's MLP, under the name its class gives it."""
    return getattr(layer, "mlp", None) or layer.feed_forward


__all__ = ["MergeReport", "verify_merge"]
