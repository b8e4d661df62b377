"""The tensor recipes of a conversion: every output tensor, layer by layer, as data (`plan.py` decides the target,
the exactness and the files; this module decides what each tensor is made of)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from upcycle.convert.exactness import expert_scales
from upcycle.convert.families import MLP_PROJECTIONS, DenseModel, SourceRef
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.shared_expert import shared_expert_recipes
from upcycle.convert.source import DenseSource
from upcycle.convert.targets import Layout, Target
from upcycle.convert.targets.base import expert_width
from upcycle.convert.tensor_recipe import DtypeOf, TensorRecipe


@dataclass(frozen=True)
class RecipeMaker:
    """What every tensor recipe of one conversion is made with."""

    source: DenseSource
    dense: DenseModel
    opts: UpcycleOptions
    target: Target
    dtype_of: DtypeOf  # a source tensor's name -> the output dtype code of what is made from it
    calibrated: dict[str, str] = field(default_factory=dict)  # cache keys of data-made parts: "router", "split"

    def all(self, layout: Layout) -> list[TensorRecipe]:
        """Every output tensor in the order a reader wants: embeddings, then layer by layer (MLP last), then the
        rest."""
        return _recipes(self, layout)

    def moe_block(self, layer: int) -> list[TensorRecipe]:
        return _moe_block(self, layer)


def _recipes(maker: RecipeMaker, layout: Layout) -> list[TensorRecipe]:
    source, dense, target, dtype_of = maker.source, maker.dense, maker.target, maker.dtype_of
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
            per_layer[layer] += maker.moe_block(layer)
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


def _moe_block(maker: RecipeMaker, layer: int) -> list[TensorRecipe]:
    """A layer's router, experts and extra tensors."""
    dense, opts, target, dtype_of, calibrated = maker.dense, maker.opts, maker.target, maker.dtype_of, maker.calibrated
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
