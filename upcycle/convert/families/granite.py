"""Granite: Llama-form layers scaled by multipliers (embeddings, residual branches, attention, logits).

GraniteMoe shares the layer and its multipliers exactly. MLP biases (mlp_bias) are refused: experts have none.
"""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="granite",
    title="Granite",
    example="ibm-granite/granite-3.3-8b-base",
    targets=("granitemoe",),
    traits=lambda c: llama_traits(c, block="granite"),
)
