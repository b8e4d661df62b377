"""The routed experts' shape, checked before any tensor is planned: the neurons must split evenly beside the
shared expert, and transformers must be able to run the experts' rows."""

from __future__ import annotations

from upcycle.convert import budget
from upcycle.convert.exactness import DTYPE_NAMES
from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets.base import expert_width
from upcycle.errors import SourceError, UnsupportedModelError


def check_granularity(dense: DenseModel, opts: UpcycleOptions) -> None:
    inter, shared = dense.intermediate_size, opts.shared_width
    if shared >= inter:
        raise SourceError(
            f"--shared-width {shared} leaves none of the {inter} intermediate neurons for the routed experts.",
            f"choose a --shared-width below {inter}.",
        )
    if (inter - shared) % opts.granularity:
        left = f"the {inter - shared} neurons beside the shared expert" if shared else f"the intermediate size {inter}"
        raise SourceError(
            f"{left} does not split into {opts.granularity} equal shards.",
            f"choose a --granularity that divides {inter - shared}.",
        )


GROUPED_MM_ROW_BYTES = 16  # torch's grouped_mm (transformers' default experts, on any device) needs such rows


def check_expert_rows(dense: DenseModel, opts: UpcycleOptions, dtype: str) -> str | None:
    """Refuse experts whose rows transformers' default experts cannot run in the dtype they are stored in; say
    so when only a narrower dtype a user may load them in would fail (the eager experts run any shape)."""
    width = expert_width(dense, opts)
    stored = budget.CODE_BYTES[DTYPE_NAMES[dtype]]
    for what, size in (("routed expert width", width), ("hidden size", dense.hidden_size)):
        if size * stored % GROUPED_MM_ROW_BYTES:
            raise UnsupportedModelError(
                f"transformers' grouped_mm experts need rows of a multiple of {GROUPED_MM_ROW_BYTES} bytes, and a "
                f"{what} of {size} in {dtype} is {size * stored} bytes (the forward pass fails).",
                f"choose options that make it a multiple of {GROUPED_MM_ROW_BYTES // stored}.",
            )
    if any(size * 2 % GROUPED_MM_ROW_BYTES for size in (width, dense.hidden_size)):
        return (
            f"loaded in bf16 or fp16, its experts' rows ({width} values) are too short for transformers' default "
            "grouped_mm experts: load it with experts_implementation='eager' there"
        )
    return None
