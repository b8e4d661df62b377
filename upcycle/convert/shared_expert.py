"""The shared expert `--shared-width` asks for, as tensor recipes: the first neurons of the dense MLP, always on."""

from __future__ import annotations

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import Target
from upcycle.convert.tensor_recipe import DtypeOf, TensorRecipe


def shared_expert_recipes(
    layer: int, dense: DenseModel, opts: UpcycleOptions, target: Target, dtype_of: DtypeOf
) -> list[TensorRecipe]:
    """The first --shared-width neurons of the dense MLP, always on. A gated class multiplies the shared output by
    sigmoid(0) = 1/2 (its gate is written zero), so the down projection is doubled: both factors are powers of two,
    exact in every dtype."""
    span, hidden = (0, opts.shared_width), dense.hidden_size
    recipes = []
    for projection, ref in dense.mlp_sources(layer).items():
        is_down = projection == "down"
        recipes.append(
            TensorRecipe(
                target.shared_key(layer, projection),
                (hidden, opts.shared_width) if is_down else (opts.shared_width, hidden),
                dtype_of(ref.name),
                "expert",
                source=ref.name,
                source_rows=ref.rows,
                rows=None if is_down else span,
                cols=span if is_down else None,
                scale=2.0 if is_down and target.shared_expert == "gated" else 1.0,
                layer=layer,
                projection=projection,
            )
        )
    return recipes
