"""No conversion writes a non-finite number: a NaN copied from the source or an overflow of a down-cast is refused.

A model whose weights hold NaN or inf computes NaN or inf, which no check can call equal to anything. Every
tensor is checked as it is made; on the first non-finite one the cause is found (the source holds it, or the
output dtype cannot hold the source's values) and named, with every source tensor that has the same problem.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from upcycle.convert.exactness import CODE_NAMES, leaf_recipes
from upcycle.convert.materialize import CachedReader
from upcycle.convert.source import DTYPE_CODES, SAFETENSORS_DTYPES, DenseSource
from upcycle.convert.tensor_recipe import TensorRecipe
from upcycle.errors import OptionError, SourceError, UpcycleError


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many values are NaN or infinite (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(
    recipe: TensorRecipe, tensor: torch.Tensor, recipes: Iterable[TensorRecipe], source: DenseSource
) -> None:
    """Raise the error that names why `tensor` (made from `recipe`) holds NaN or inf; nothing when it does not.

    A sum is NaN or infinite whenever one value is, and costs a fiftieth of testing each value: only a sum that
    is not finite (a non-finite value, or an overflow of the sum itself) has its values counted."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()).item() or non_finite_count(tensor) == 0:
        return
    raise _diagnose(recipe, list(recipes), source)


def _diagnose(failed: TensorRecipe, recipes: list[TensorRecipe], source: DenseSource) -> UpcycleError:
    read = CachedReader(source.read)
    leaves = [leaf for recipe in recipes for leaf in leaf_recipes(recipe)]
    bad_sources = sorted({leaf.source for leaf in leaves if non_finite_count(read(leaf.source)) > 0})
    if bad_sources:
        counts = {name: non_finite_count(read(name)) for name in bad_sources}
        listed = ", ".join(f"{name} ({counts[name]} NaN/inf)" for name in bad_sources[:4])
        more = f" and {len(bad_sources) - 4} more" if len(bad_sources) > 4 else ""
        return SourceError(
            f"the source holds non-finite values in {len(bad_sources)} tensor(s): {listed}{more}; a model that "
            "computes NaN or inf cannot be proven equal to anything, so nothing was written.",
            "repair or re-download the source checkpoint.",
        )
    overflowing: dict[str, tuple[float, str]] = {}
    scaled_over = False  # a tensor kept in its own dtype overflowed: the router's scale did it, not the cast
    for leaf in leaves:
        limit = torch.finfo(SAFETENSORS_DTYPES[leaf.dtype]).max
        largest = read(leaf.source).abs().max().item() * abs(leaf.scale)
        if largest > limit and largest > overflowing.get(leaf.source, (0.0, ""))[0]:
            overflowing[leaf.source] = (largest, leaf.dtype)
            scaled_over |= DTYPE_CODES.get(source.tensors[leaf.source].dtype) == leaf.dtype
    if not overflowing:  # a recipe's own arithmetic (re-drawn neurons, noise) left the range
        return OptionError(
            f"{failed.name} came out non-finite ({failed.op} of {failed.source}); nothing was written.",
            "convert with --dtype float32, or without Drop-Upcycling / noise.",
        )
    worst = max(overflowing, key=lambda name: overflowing[name][0])
    largest, code = overflowing[worst]
    dtype = CODE_NAMES[code]
    names = ", ".join(sorted(overflowing)[:4]) + (f" and {len(overflowing) - 4} more" if len(overflowing) > 4 else "")
    return OptionError(
        f"{dtype} cannot hold the values of {len(overflowing)} source tensor(s) ({names}): the largest, "
        f"{largest:.3g} in {worst}, is beyond {dtype}'s maximum {torch.finfo(SAFETENSORS_DTYPES[code]).max:.5g}"
        f"{' once scaled for the experts' if scaled_over else ''}, so the cast would write inf; nothing was written.",
        "convert with --dtype float32." if scaled_over else "convert with --dtype auto, float32 or bfloat16.",
    )
