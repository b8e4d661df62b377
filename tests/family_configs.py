"""One hub-style tiny config per registered dense family (the smallest real example of each), shared by the family
tests and the fuzzer. Windows are short so a 40-token probe runs past every one."""

from __future__ import annotations

from typing import Any

from tiny_models import COMMON

DIMS: dict[str, Any] = dict(COMMON)  # the tiny sizes every test model shares
YARN_NO_QUERY_SCALING = {
    "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.0,
}  # fmt: skip
SLIDING = ["sliding_attention"] * 3

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=500000.0),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(head_dim=16),
    "olmo2": dict(rope_theta=500000.0, attention_bias=True),
    "ernie4_5": dict(head_dim=24, rope_theta=500000.0),
    "hunyuan_v1_dense": dict(head_dim=16, attention_bias=True),
    "seed_oss": dict(head_dim=16, attention_bias=True),
    "internlm3": dict(head_dim=16),
    "iquestcoder": dict(head_dim=16),
    "ministral": dict(head_dim=16, sliding_window=8, layer_types=SLIDING),
    "ministral3": dict(head_dim=16, rope_parameters=YARN_NO_QUERY_SCALING),
    "cwm": dict(head_dim=16, sliding_window=8, layer_types=SLIDING, rope_theta=1000000.0),
    "smollm3": dict(no_rope_layers=[1, 1, 1], pad_token_id=0),
    "phi3": dict(sliding_window=9, pad_token_id=0, eos_token_id=1),
    "granite": dict(
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        logits_scaling=8.0,
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    ),
    "granite_swa": dict(
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        residual_multiplier=0.22,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    ),
    "lfm2": dict(
        num_hidden_layers=4,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        block_ff_dim=200,
        block_ffn_dim_multiplier=1.5,
        block_multiple_of=32,
    ),
    "exaone": dict(head_dim=16, layer_norm_epsilon=1e-5, activation_function="silu", pad_token_id=0, eos_token_id=2),
    "cohere2": dict(
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        logit_scale=0.25,
        rope_theta=10000.0,
    ),
}


# Options a family's only home needs to be exact (Lfm2-MoE: a zero router; see its target).
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {"lfm2": {"router_init": "zero"}}


def family_config(family: str, **overrides: Any) -> dict[str, Any]:
    return {"model_type": family, **DIMS, **FAMILY_CONFIGS[family], **overrides}
