"""The plan of a growth: every tensor of the grown MoE as a recipe over the original's tensors, read from headers.

Per-expert tensors (`...experts.<e>.<rest>`) of new expert j copy old expert j // m. Tensors indexed by expert
along their first axis (routers, their score biases, experts stacked in one [E, ...] tensor) repeat each row m
times. Everything else is copied as stored. Nothing is rounded or re-drawn: the weight check can re-make every
tensor bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from upcycle.convert.exactness import Exactness
from upcycle.convert.grow.rules import RULES, limited_groups, read_growth
from upcycle.convert.source import DTYPE_CODES, DenseSource, TensorInfo
from upcycle.convert.tensor_recipe import TensorRecipe
from upcycle.convert.written_plan import WrittenPlan, recorded_fields, split_into_shards
from upcycle.errors import SourceError, UnsupportedModelError
from upcycle.model_card.growth import GROWN

_EXPERT = re.compile(r"^(?P<head>.*\.experts\.)(?P<index>\d+)(?P<tail>\..+)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_ROUTER = re.compile(r"\.(gate|router)(\.|$)")
_WHY = {
    "softmax": "a token takes all {m} copies of each of its experts; each copy scores p/{m}, so they sum to p",
    "sigmoid": "a token takes all {m} copies of each of its experts; the renormalised top-k gives each s/({m} x sum)",
}


@dataclass
class GrowPlan(WrittenPlan):
    growth: dict  # factor, experts and top-k before and after, scoring
    target: str  # the class's model_type: growing keeps the class
    architecture: str
    dtype: str  # "as stored": every tensor keeps its dtype
    moe_layers: tuple[int, ...]
    config: dict
    shards: list[list[TensorRecipe]]
    exactness: Exactness
    config_check: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    copied_files: dict | None = None

    def to_json(self) -> dict:
        return self.record_head(kind=GROWN, growth=self.growth) | self.record_tail()

    @classmethod
    def from_json(cls, data: dict, config: dict) -> GrowPlan:
        return cls(growth=data["growth"], **recorded_fields(data, config))


def build_grow_plan(source: DenseSource, factor: int, shard_size: int = 2 * 1000**3) -> GrowPlan:
    """Every tensor of the grown model; reads the config and the headers (and a group-limited class's router
    tensors, to see whether each group's rows are identical), never the experts."""
    growth = read_growth(source.config, factor, tied_groups=_groups_tied(source))
    experts, m = growth.experts, factor
    by_layer: dict[int, set[int]] = {}
    recipes: list[TensorRecipe] = []
    for name in sorted(source.tensors, key=_order):
        info = source.tensors[name]
        layer = _layer(name)
        dtype = DTYPE_CODES[info.dtype]
        expert = _EXPERT.match(name)
        if expert and "shared" not in expert["head"]:  # a shared expert is not routed: copied as it is
            index = int(expert["index"])
            by_layer.setdefault(layer, set()).add(index)
            for j in range(index * m, (index + 1) * m):
                new = f"{expert['head']}{j}{expert['tail']}"
                recipes.append(TensorRecipe(new, info.shape, dtype, "copy", source=name, layer=layer, expert=j))
        elif _indexed_by_expert(name, info, experts):
            by_layer.setdefault(layer, set())
            recipes.append(_repeated_rows(name, info, dtype, m, layer))
        else:
            recipes.append(TensorRecipe(name, info.shape, dtype, "copy", source=name, layer=layer))
    moe_layers = tuple(sorted(by_layer))
    if not moe_layers:
        raise UnsupportedModelError(
            f"{source.folder} holds no expert tensors upcycle can find (named `...experts.<index>...`, or indexed by "
            "expert along their first axis).",
            "grow a Mixture-of-Experts checkpoint in its class's own key layout.",
        )
    for layer, found in by_layer.items():
        if found and found != set(range(experts)):
            raise SourceError(
                f"layer {layer} of {source.folder} holds experts {sorted(found)[:8]}..., not 0 to {experts - 1} as its "
                "config states.",
                "grow a complete checkpoint.",
            )
    config = growth.grown_config(source.config)
    method = f"grown: each of {experts} experts copied {m} times, top-k {growth.top_k} -> {growth.grown_top_k}"
    exactness = Exactness(True, method, [_WHY[growth.scoring].format(m=m)])
    architecture = (config.get("architectures") or [growth.model_type])[0]
    return GrowPlan(
        growth=growth.to_json(),
        target=growth.model_type,
        architecture=architecture,
        dtype="as stored",
        moe_layers=moe_layers,
        config=config,
        shards=split_into_shards(recipes, shard_size),
        exactness=exactness,
    )


def _groups_tied(source: DenseSource) -> bool:
    """Whether every router (rows and score biases) is constant within each expert group of a group-limited class;
    reads only the router tensors."""
    rule = RULES.get(str(source.config.get("model_type")))
    groups = limited_groups(source.config, rule) if rule is not None else 0
    routers = [n for n in source.tensors if _layer(n) >= 0 and _ROUTER.search(n) and "shared" not in n]
    if not groups or not routers:
        return False
    for name in routers:
        grouped = source.read(name).reshape(groups, -1, *source.tensors[name].shape[1:])
        if not bool((grouped == grouped[:, :1]).all()):
            return False
    return True


def _order(name: str) -> tuple[int, str]:
    """Embeddings, then layer by layer, then the rest: the order a reader wants."""
    layer = _layer(name)
    if layer >= 0:
        return (1 + layer, name)
    return (0 if "embed" in name else 1 << 30, name)


def _layer(name: str) -> int:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else -1


def _indexed_by_expert(name: str, info: TensorInfo, experts: int) -> bool:
    """A router row per expert, a score bias per expert, or every expert stacked in one 3-D tensor."""
    if _layer(name) < 0 or "shared" in name or not info.shape or info.shape[0] != experts:
        return False
    return bool(_ROUTER.search(name)) or len(info.shape) == 3


def _repeated_rows(name: str, info: TensorInfo, dtype: str, m: int, layer: int) -> TensorRecipe:
    rows = info.shape[0]
    parts = tuple(
        TensorRecipe(name, (1, *info.shape[1:]), dtype, "copy", source=name, rows=(e, e + 1), layer=layer)
        for e in range(rows)
        for _ in range(m)
    )
    shape = (rows * m, *info.shape[1:])
    return TensorRecipe(name, shape, dtype, "stack", source=name, layer=layer, parts=parts)
