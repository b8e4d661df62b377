"""Sizes checked before work: what a conversion will write and hold, estimated from the config and the headers.

A plan is one recipe per output tensor, so an absurd option (a hundred million experts) would otherwise spend
minutes and gigabytes before anything could say no (an absurd layer count is refused earlier, by the family
check). The estimate takes microseconds; beyond the machine's free disk or memory, the conversion is refused with
it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.source import DenseSource
from upcycle.errors import OptionError
from upcycle.units import format_bytes

# Measured: a recipe takes about 0.5 KB in memory and 0.85 KB with its upcycle.json record; the writer's headers
# and weight map add to that. 2 KB each leaves room.
RECIPE_BYTES = 2048
CODE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}  # bytes per value of each output dtype
READ_CACHE = 4  # source tensors the writer keeps (CachedReader): a layer's gate, up and down, and one more


@dataclass(frozen=True)
class Estimate:
    output_bytes: int  # tensor data written
    tensors: int  # recipes in the plan
    peak_bytes: int  # memory while writing: the plan, the largest output tensor and the cached source tensors

    def describe(self) -> str:
        return (
            f"{self.tensors:,} tensors, {format_bytes(self.output_bytes)} on disk, about "
            f"{format_bytes(self.peak_bytes)} of memory while writing"
        )


def estimate(
    source: DenseSource, dense: DenseModel, opts: UpcycleOptions, moe_layers: int, code: str, stacked: bool
) -> Estimate:
    """What the plan would write and hold, from shapes only (no recipe is made); `stacked`: the target stores a
    layer's experts as one [E, 2F, H] tensor, made whole in memory."""
    width = CODE_BYTES[code]
    mlp_names = dense.mlp_tensor_names()
    copied = [info for name, info in source.tensors.items() if name not in mlp_names]
    copied_bytes = sum(math.prod(info.shape) * width for info in copied)
    mlp_values = 3 * dense.hidden_size * dense.intermediate_size  # one dense MLP: gate, up and down
    experts = opts.num_experts
    moe_layer_bytes = experts * mlp_values // opts.granularity * width + experts * dense.hidden_size * 4  # + router
    dense_layers = dense.num_layers - moe_layers
    output = copied_bytes + moe_layers * moe_layer_bytes + dense_layers * mlp_values * width
    tensors = len(copied) + moe_layers * (1 + 3 * experts) + 3 * dense_layers
    largest_source = max((math.prod(info.shape) for info in source.tensors.values()), default=0)
    mlp_tensor = dense.hidden_size * dense.intermediate_size
    stack = experts * 2 * mlp_tensor // opts.granularity if stacked else 0  # [E, 2F, H] in one piece
    cached = largest_source + (READ_CACHE - 1) * mlp_tensor  # the largest tensor read, then a layer's MLP
    made = max(largest_source, stack)  # the output tensor being made, and the cast it is made from
    peak = tensors * RECIPE_BYTES + cached * 4 + 2 * made * 4
    return Estimate(output, tensors, peak)


def check_fits(needed: Estimate, memory: int | None, disk: int | None, where: Path | None) -> None:
    """Refuse, with the estimate, a conversion the machine cannot hold (None: that budget is unknown)."""
    if memory is not None and needed.peak_bytes > memory:
        raise OptionError(
            f"this conversion needs {needed.describe()}, beyond the {format_bytes(memory)} of memory available.",
            "choose fewer --experts (or a larger machine).",
        )
    if disk is not None and needed.output_bytes > disk:
        raise OptionError(
            f"not enough disk space: this conversion needs {needed.describe()}, beyond the {format_bytes(disk)} "
            f"free at {where}.",
            "free some space, choose another OUT, or choose fewer --experts.",
        )
