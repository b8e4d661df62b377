"""Tiny random MoE checkpoints of the classes `upcycle grow` reads, saved by transformers in their own layouts."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_DEEPSEEK = dict(n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=0, n_shared_experts=1)
MOES = {
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen2_moe renormalised": dict(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16),
    "olmoe": dict(num_experts=4),
    "granitemoe": dict(num_local_experts=4),
    "granitemoe_swa": dict(num_local_experts=4),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "cohere2_moe": dict(num_experts=4),
    "cohere2_moe sigmoid": dict(num_experts=4, expert_selection_fn="sigmoid"),
    "glm4_moe": dict(_DEEPSEEK),
    "dots1": dict(_DEEPSEEK, norm_topk_prob=True),
    "deepseek_v3": dict(_DEEPSEEK, n_group=2, topk_group=2, num_key_value_heads=4, **_MLA),
}


def moe_config(case: str, **overrides) -> transformers.PretrainedConfig:
    """The config of a tiny MoE of `case` (a key of MOES), built by the class's own config class."""
    model_type = case.split()[0]
    return transformers.CONFIG_MAPPING[model_type](**{**SMALL, "num_experts_per_tok": 2, **MOES[case], **overrides})


def make_moe(case: str, folder, seed: int = 0, **overrides):
    """A tiny random MoE of `case`, saved by transformers itself; every weight random (routers included)."""
    config = moe_config(case, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.1)
    model.save_pretrained(folder)
    return folder
