"""The dense control of a sweep (``--with-dense``): the recipe's dense ``model.source`` trained as it is.

The control answers "does the upcycle pay, at this setting?": the same data, tokens, optimiser and seed as the MoE
runs, on the dense model they are converted from (``model.path`` = ``model.source``, no ``model.upcycle``). It
follows the grid along the keys that change how a dense model trains (optimiser, data, batch, run, the source
itself) and stays fixed along keys only an MoE has (``model.upcycle.*``, ``moe.*``, ``parallel.ep``,
``model.experts_implementation``): one control run then serves every value of those keys, as the reference line
of their plots. Keys that would make the control something else than the source trained as it is
(``model.path``, the whole ``model.upcycle`` section) are refused with ``--with-dense``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from upcycle.errors import OptionError
from upcycle.train.recipe import TrainRecipe

MOE_ONLY_PREFIXES = ("model.upcycle.", "moe.")
MOE_ONLY_KEYS = ("parallel.ep", "model.experts_implementation")
REFUSED_WITH_DENSE = {
    "model.path": "the dense control trains model.source, and an upcycling recipe sets no model.path",
    "model.upcycle": "the dense control has no model.upcycle; sweep its keys instead (model.upcycle.experts=...)",
}


def applies_to_dense(key: str) -> bool:
    """Whether a recipe key changes how the dense control trains (router, expert and conversion keys do not)."""
    return not (key.startswith(MOE_ONLY_PREFIXES) or key in MOE_ONLY_KEYS)


def follows(point: Mapping[str, Any], control: Mapping[str, Any]) -> bool:
    """Whether a dense control (its values) is the control of a point: equal on every key the control follows."""
    return all(point.get(key) == value for key, value in control.items())


def check_control_keys(keys: Iterable[str]) -> None:
    """Refuse, with ``--with-dense``, grid keys that would make the control something else than the source."""
    for key in keys:
        if key in REFUSED_WITH_DENSE:
            raise OptionError(
                f"--with-dense cannot sweep {key}: {REFUSED_WITH_DENSE[key]}.",
                f"drop --with-dense, or sweep other keys than {key}.",
            )


def dense_recipe(recipe: TrainRecipe) -> TrainRecipe:
    """The control of an upcycling recipe: its ``model.source`` as ``model.path``, nothing converted."""
    model = recipe.model
    if model.source is None or model.upcycle is None:
        raise OptionError(
            f"--with-dense needs a recipe that upcycles a dense model.source; this one trains model.path "
            f"{model.path} as it is.",
            "give the recipe model.source and model.upcycle (see `upcycle recipes show cpu-quickstart`), or sweep "
            "the dense recipe on its own.",
        )
    dense = dataclasses.replace(model, path=model.source, source=None, upcycle=None)
    return dataclasses.replace(recipe, model=dense)
