"""EXAONE 3.x: Llama's computation under GPT-2-style tensor names (transformer.h.i.attn.attention.q_proj, c_fc_0
for the gate, c_fc_1 for up, c_proj for down), which transformers renames on load; upcycle reads them the same way
and writes the target's names."""

from upcycle.convert.families.base import Family, llama_traits

FAMILY = Family(
    model_type="exaone",
    title="EXAONE 3",
    example="LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct",
    targets=("mixtral", "qwen2_moe", "glm4_moe"),
    traits=llama_traits,
    checkpoint_renames=(
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.h\.", "model.layers."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"\.attn\.attention\.", ".self_attn."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
        (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ),
    min_transformers="5.24",
)
