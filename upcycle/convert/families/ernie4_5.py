"""Ernie 4.5: Llama-like layers with interleaved rotary pairs; Ernie4_5_Moe shares the layer exactly.

use_bias puts biases on every linear layer, MLP included, which experts cannot hold.
"""

from upcycle.convert.families.base import DenseModel, Family, Traits


def _biases(dense: DenseModel) -> str | None:
    if dense.resolved.get("use_bias"):
        return "use_bias puts biases on the MLP, and Ernie4_5_Moe experts have none"
    return None


FAMILY = Family(
    model_type="ernie4_5",
    title="Ernie 4.5",
    example="baidu/ERNIE-4.5-0.3B-PT",
    targets=("ernie4_5_moe",),
    traits=lambda c: Traits(block="ernie4_5"),
    refusals=(_biases,),
)
