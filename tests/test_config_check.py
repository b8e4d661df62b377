"""The config-equivalence check on its own: pairs of configs, what transformers computes from each, no weights."""

from __future__ import annotations

import pytest
from family_configs import FAMILY_CONFIGS, family_config
from hub_models import LLAMA3_ROPE

from upcycle.hf.config_check import check_config_equivalence

DIMS = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA = {"model_type": "llama", **DIMS}
# Mixtral with Llama's defaults written out: the pair computes the same function.
MIXTRAL = {"model_type": "mixtral", **DIMS, "num_local_experts": 4, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def first_problem(dense: dict, moe: dict) -> str:
    report = check_config_equivalence(dense, moe)
    assert not report.equivalent
    return report.first_problem


def test_equal_computations_pass_and_report_their_layers():
    report = check_config_equivalence(LLAMA, MIXTRAL)
    assert report.equivalent and report.first_problem is None
    assert report.moe_layers == [0, 1, 2] and report.smallest_window is None
    assert [layer["attention"] for layer in report.layers] == ["full"] * 3
    assert report.layers[0]["heads"] == 4 and report.layers[0]["kv_heads"] == 2 and report.layers[0]["head_dim"] == 16


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"rope_theta": 1e6}, "rotary table"),
        ({"rms_norm_eps": 1e-5}, "norm epsilon"),
        ({"hidden_act": "gelu"}, "MLP activation"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"bos_token_id": 7}, "bos_token_id"),
        ({"head_dim": 8}, "rotary"),
        ({"num_key_value_heads": 4}, "key/value heads"),
        ({"vocab_size": 101}, "vocabulary size"),
        ({"sliding_window": 1000}, "attention"),
    ],
    ids=["theta", "eps", "activation", "tied", "bos", "head_dim", "kv_heads", "vocab", "window"],
)
def test_each_kind_of_difference_is_named(change, expected):
    assert expected in first_problem(LLAMA, {**MIXTRAL, **change})


def test_windows_far_beyond_the_probe_are_compared_on_the_mask():
    qwen2 = {"model_type": "qwen2", **DIMS, "use_sliding_window": True, "sliding_window": 512, "max_window_layers": 0}
    problem = first_problem(qwen2, {**qwen2, "sliding_window": 600})
    assert "512" in problem and "600" in problem


def test_qwen2_and_qwen2_moe_read_max_window_layers_differently():
    # Qwen2 slides layers i >= max_window_layers; Qwen2-MoE (transformers 5) slides even layers i < max_window_layers
    dense = {"model_type": "qwen2", **DIMS, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}
    moe = {"model_type": "qwen2_moe", **DIMS, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 3}
    problem = first_problem(dense, moe)
    assert problem.startswith("layer 0: the attention mask") and "sliding window of 6" in problem
    # with the same layer_types the masks agree, but Qwen2-MoE does not pass the window to the attention kernel
    same_masks = {**moe, "qkv_bias": True, "layer_types": ["full_attention"] + ["sliding_attention"] * 2}
    assert "window passed to the attention kernel" in first_problem(dense, same_masks)


def test_rope_types_that_switch_with_length_are_compared_beyond_the_context():
    scaled = {**LLAMA, "max_position_embeddings": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    assert "rotary table at sequence length" in first_problem(scaled, {**scaled, "rope_scaling": None})
    llama3 = {**LLAMA, **LLAMA3_ROPE}
    glm = {**MIXTRAL, "model_type": "glm4_moe", "head_dim": 16, "rope_theta": 500000.0, "bos_token_id": 1}
    glm |= {"eos_token_id": 2, "rope_scaling": llama3["rope_scaling"]}
    assert "rotated dimensions per head" in first_problem(llama3, glm)  # Glm4-MoE's default half-width rotary


def test_a_dense_config_with_moe_layers_is_flagged():
    assert "MoE layers" in first_problem(MIXTRAL, MIXTRAL)


def test_a_config_transformers_does_not_know_cannot_be_proven():
    report = check_config_equivalence({"model_type": "no-such-model"}, MIXTRAL)
    assert not report.equivalent and "cannot be checked" in report.first_problem and "no-such-model" in report.error


def test_a_computation_that_depends_on_the_position_itself_is_caught_far_out():
    """Ministral 3's query scaling acts only beyond original_max_position_embeddings: the probe's second run, at
    positions past every context, sees it (Mixtral has none)."""
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    rope = FAMILY_CONFIGS["ministral3"]["rope_parameters"]
    mixtral = family_config("ministral3", **tokens) | {
        "model_type": "mixtral",
        "rope_parameters": {k: v for k, v in rope.items() if k != "llama_4_scaling_beta"},
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    scaled = family_config("ministral3", rope_parameters={**rope, "llama_4_scaling_beta": 0.1}, **tokens)
    report = check_config_equivalence(scaled, mixtral)
    assert not report.equivalent and "depends on the position itself" in report.first_problem
    assert check_config_equivalence(family_config("ministral3", **tokens), mixtral).equivalent
