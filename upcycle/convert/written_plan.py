"""What every plan upcycle writes shares, whatever made it (a conversion, a growth): tensor recipes in shard files,
a config, an exactness claim and a record of its source. The writer and `verify` read plans through this."""

from __future__ import annotations

import math

from upcycle import __version__
from upcycle.convert import budget
from upcycle.convert.exactness import Exactness
from upcycle.convert.tensor_recipe import TensorRecipe
from upcycle.errors import SourceError

PLAN_FORMAT = 1


class WrittenPlan:
    """A plan as the writer and `verify` see it; the subclasses are dataclasses holding these fields."""

    target: str  # the written class's model_type
    architecture: str
    dtype: str
    moe_layers: tuple[int, ...]
    config: dict
    shards: list[list[TensorRecipe]]  # one list per output safetensors file, in write order
    exactness: Exactness
    config_check: dict
    source: dict
    copied_files: dict | None

    @property
    def recipes(self) -> list[TensorRecipe]:
        return [recipe for shard in self.shards for recipe in shard]

    def shard_names(self) -> list[str]:
        total = len(self.shards)
        return [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]

    @property
    def total_bytes(self) -> int:
        return sum(nbytes(recipe) for recipe in self.recipes)

    def record_head(self, **own: object) -> dict:
        """upcycle.json's first fields; the plan's `own` ones (its kind, family, options) where they belong."""
        return {
            "format": PLAN_FORMAT,
            **({"kind": own.pop("kind")} if "kind" in own else {}),
            "tool": {"name": "upcycle", "version": __version__},
            "source": self.source,
            "family": own.pop("family", self.target),
            "target": self.target,
            "architecture": self.architecture,
            "dtype": self.dtype,
            **own,
        }

    def record_tail(self) -> dict:
        """upcycle.json's last fields: the layers, config, checks, files, exactness and every tensor's recipe."""
        return {
            "moe_layers": list(self.moe_layers),
            "config": self.config,
            "config_check": self.config_check,
            "copied_files": self.copied_files,
            "exactness": self.exactness.to_json(),
            "shards": {
                name: [r.to_json() for r in shard] for name, shard in zip(self.shard_names(), self.shards, strict=True)
            },
        }

    def to_json(self) -> dict:
        raise NotImplementedError


def recorded_fields(data: dict, config: dict) -> dict:
    """The fields every plan reads back from its upcycle.json record (config.json given beside it)."""
    if data.get("format") != PLAN_FORMAT:
        raise SourceError(
            f"upcycle.json has plan format {data.get('format')!r}; this upcycle reads format {PLAN_FORMAT}.",
            "convert again with this version of upcycle.",
        )
    return dict(
        target=data["target"],
        architecture=data["architecture"],
        dtype=data["dtype"],
        moe_layers=tuple(data["moe_layers"]),
        config=config,
        shards=[[TensorRecipe.from_json(r) for r in shard] for shard in data["shards"].values()],
        exactness=Exactness.from_json(data["exactness"]),
        config_check=data.get("config_check", {}),
        source=data.get("source", {}),
        copied_files=data.get("copied_files"),
    )


def nbytes(recipe: TensorRecipe) -> int:
    return math.prod(recipe.shape) * budget.CODE_BYTES[recipe.dtype]


def split_into_shards(recipes: list[TensorRecipe], shard_size: int) -> list[list[TensorRecipe]]:
    """Consecutive recipes in files of at most `shard_size` bytes (a larger tensor gets a file of its own)."""
    shards: list[list[TensorRecipe]] = [[]]
    size = 0
    for recipe in recipes:
        size_of = nbytes(recipe)
        if shards[-1] and size + size_of > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(recipe)
        size += size_of
    return shards
