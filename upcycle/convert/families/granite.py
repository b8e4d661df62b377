"""Granite: Llama-form layers scaled by multipliers (embeddings, residual branches, attention, logits).

GraniteMoe shares the layer and its multipliers exactly. MLP biases (mlp_bias) are refused: experts have none.
"""

from upcycle.convert.families.base import Family, Traits

FAMILY = Family(
    model_type="granite",
    title="Granite",
    example="ibm-granite/granite-3.3-8b-base",
    targets=("granitemoe",),
    traits=lambda c: Traits(
        block="granite", qkv_bias=bool(c.get("attention_bias")), o_bias=bool(c.get("attention_bias"))
    ),
)
