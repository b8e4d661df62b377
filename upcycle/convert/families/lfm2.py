"""LFM2: short causal convolutions on most layers, attention (per-head q/k norms) on the others, a SwiGLU MLP
(w1 gate, w3 up, w2 down) whose width the class derives from the config. Lfm2-MoE shares those layers exactly."""

from upcycle.convert.families.base import DenseModel, Family, MlpLayout, Traits


def _no_attention(dense: DenseModel) -> str | None:
    if "full_attention" not in (dense.resolved.get("layer_types") or []):
        return "every layer is a convolution, and transformers cannot run an LFM2 model without an attention layer"
    return None


FAMILY = Family(
    model_type="lfm2",
    title="LFM2",
    example="LiquidAI/LFM2-1.2B",
    targets=("lfm2_moe",),
    traits=lambda c: Traits(block="lfm2", qk_norm="head"),
    mlp=MlpLayout(gate="feed_forward.w1.weight", up="feed_forward.w3.weight", down="feed_forward.w2.weight"),
    layer_kinds=frozenset({"full_attention", "conv"}),
    refusals=(_no_attention,),
)
