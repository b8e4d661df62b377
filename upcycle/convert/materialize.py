"""Executing a TensorRecipe: the upcycling math (copy, shard, scale, Drop-Upcycling, noise, router init)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from upcycle.convert.source import SAFETENSORS_DTYPES
from upcycle.convert.tensor_recipe import TensorRecipe, derive_seed

Reader = Callable[[str], torch.Tensor]


class CachedReader:
    """Keeps the last few source tensors: every expert of a layer re-reads the same three MLP tensors."""

    def __init__(self, read: Reader, capacity: int = 4) -> None:
        self._read = read
        self._cache: OrderedDict[tuple[str, torch.dtype | None], torch.Tensor] = OrderedDict()
        self._capacity = capacity

    def __call__(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (name, dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tensor = self._read(name)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        self._cache[key] = tensor
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return tensor


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, key))


def dropped_neurons(recipe: TensorRecipe, num_neurons: int) -> torch.Tensor:
    """Indices of the neurons an expert re-draws; the same for its gate, up and down (keyed by drop_key)."""
    count = round(recipe.drop_ratio * num_neurons)
    order = torch.randperm(num_neurons, generator=_generator(recipe.seed, "drop/" + recipe.drop_key))
    return order[:count].sort().values


def materialize(recipe: TensorRecipe, read: CachedReader) -> torch.Tensor:
    """The output tensor the recipe describes, in its output dtype."""
    out_dtype = SAFETENSORS_DTYPES[recipe.dtype]
    if recipe.op == "zeros":
        return torch.zeros(recipe.shape, dtype=out_dtype)
    if recipe.op == "router":
        return _router(recipe).to(out_dtype)
    if recipe.op == "stack":
        per_expert = len(recipe.parts) // recipe.shape[0]
        blocks = [recipe.parts[e * per_expert : (e + 1) * per_expert] for e in range(recipe.shape[0])]
        stacked = torch.stack([torch.cat([materialize(part, read) for part in block]) for block in blocks])
        return stacked.reshape(recipe.shape)  # parts that are rows of a source ([1, ...]) lose their unit axis
    assert recipe.source is not None
    if recipe.is_verbatim:
        return _slice(_reordered(_unfused(read(recipe.source, out_dtype), recipe), recipe), recipe)
    source = _reordered(_unfused(read(recipe.source, torch.float32), recipe), recipe)
    weight = _slice(source, recipe).clone()
    if recipe.drop_ratio:
        axis = recipe.drop_axis
        index = dropped_neurons(recipe, weight.shape[axis])
        shape = list(weight.shape)
        shape[axis] = len(index)
        fresh = torch.empty(shape, dtype=torch.float32).normal_(
            mean=source.mean().item(), std=source.std().item(), generator=_generator(recipe.seed, recipe.name)
        )
        weight.index_copy_(axis, index, fresh)
    if recipe.noise:
        noise = torch.empty(weight.shape, dtype=torch.float32).normal_(
            generator=_generator(recipe.seed, "noise/" + recipe.name)
        )
        weight += noise * (recipe.noise * source.std().item())
    if recipe.scale != 1.0:
        weight *= recipe.scale
    return weight.to(out_dtype)


def _unfused(tensor: torch.Tensor, recipe: TensorRecipe) -> torch.Tensor:
    """The dense tensor the recipe derives from: its block of rows when the source stores several fused."""
    if recipe.source_rows is None:
        return tensor
    return tensor[recipe.source_rows[0] : recipe.source_rows[1]]


def _reordered(tensor: torch.Tensor, recipe: TensorRecipe) -> torch.Tensor:
    """The dense tensor with its neurons in a split's order (rows of gate and up, columns of down)."""
    if not recipe.neuron_order:
        return tensor
    from upcycle.convert.calibration import calibrated

    return tensor.index_select(recipe.drop_axis, calibrated(recipe.neuron_order, recipe.layer))


def _slice(tensor: torch.Tensor, recipe: TensorRecipe) -> torch.Tensor:
    if recipe.rows is not None:
        tensor = tensor[recipe.rows[0] : recipe.rows[1]]
    if recipe.cols is not None:
        tensor = tensor[:, recipe.cols[0] : recipe.cols[1]]
    return tensor


def _router(recipe: TensorRecipe) -> torch.Tensor:
    """Router weights [num_experts, H]; rows of one virtual group are identical so its shards stay together."""
    num_experts, hidden = recipe.shape
    if recipe.router_init == "zero":
        return torch.zeros(recipe.shape, dtype=torch.float32)
    if recipe.router_init == "given":  # a merge's rows, as gate_mode made them (rows: which of them)
        from upcycle.convert.calibration import calibrated

        given = calibrated(recipe.calibration, recipe.layer)
        return given[recipe.rows[0] : recipe.rows[1]] if recipe.rows is not None else given
    rows = num_experts // recipe.group_size
    if recipe.router_init in ("cluster", "hidden"):  # unit rows from data at the norm a random row has: std*sqrt(H)
        from upcycle.convert.calibration import calibrated

        weight = calibrated(recipe.calibration, recipe.layer) * (recipe.router_std * hidden**0.5)
        return weight.repeat_interleave(recipe.group_size, dim=0)
    weight = torch.empty(rows, hidden, dtype=torch.float32).normal_(
        std=recipe.router_std, generator=_generator(recipe.seed, recipe.name)
    )
    return weight.repeat_interleave(recipe.group_size, dim=0)
