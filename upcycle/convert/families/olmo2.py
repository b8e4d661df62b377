"""OLMo 2: norms after attention and after the MLP (not before), q/k RMSNorms over the whole projection.

FlexOlmo shares that decoder layer exactly. OLMoE does not: its norms sit before each block.
"""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="olmo2",
    title="OLMo 2",
    example="allenai/OLMo-2-1124-7B",
    targets=("flex_olmo",),
    traits=lambda c: llama_traits(c, block="olmo2", qk_norm="projection"),
)
