"""Hypothesis strategies for hub-style dense configs: legacy and v5 rope formats, windows, absent fields.

One strategy per family (`FAMILIES`); each draws a config.json as it appears on the hub (fields missing, the
pre-v5 `rope_theta`/`rope_scaling` form or the v5 `rope_parameters` form) that transformers accepts for the
family's dense class. Sizes stay tiny so a case converts and runs in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

ABSENT = object()  # a field left out of config.json


@st.composite
def dims(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    hidden = draw(st.sampled_from([32, 48, 64]))
    return {
        "vocab_size": draw(st.sampled_from([64, 96])),
        "hidden_size": hidden,
        "intermediate_size": draw(st.sampled_from([24, 48, 72])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        # absent: Llama's default equals the heads; Mistral's (8) and Qwen's (32) rarely divide tiny head counts
        "num_key_value_heads": draw(st.sampled_from([kv_heads] * 7 + [ABSENT])),
        "head_dim": draw(st.sampled_from([ABSENT, hidden // heads, 8, 24])),
    }


@st.composite
def rope(draw: st.DrawFn, head_dim: int) -> dict[str, Any]:
    """Rotary settings in the legacy (rope_theta + rope_scaling) or the v5 (rope_parameters) form."""
    theta = draw(st.sampled_from([ABSENT, 10000.0, 100000.0, 500000.0]))
    kind = draw(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope"]))
    original = draw(st.sampled_from([8, 16]))
    scaling: dict[str, Any] = {}
    if kind in ("linear", "dynamic"):
        scaling = {"factor": draw(st.sampled_from([2.0, 4.0]))}
    elif kind == "yarn":
        scaling = {"factor": 4.0, "original_max_position_embeddings": original}
        if draw(st.booleans()):
            scaling |= {"beta_fast": 16.0, "beta_slow": 2.0}
    elif kind == "llama3":
        scaling = {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
    elif kind == "longrope":
        half = head_dim // 2
        scaling = {
            "short_factor": [1.0 + 0.01 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": original,
            "factor": 4.0,
        }
    legacy = draw(st.booleans())
    if legacy:
        out: dict[str, Any] = {} if theta is ABSENT else {"rope_theta": theta}
        if kind != "default":
            key = draw(st.sampled_from(["rope_type", "type"]))
            out["rope_scaling"] = {key: kind, **scaling}
        return out
    parameters = {"rope_type": kind, **scaling}
    if theta is not ABSENT:
        parameters["rope_theta"] = theta
    return {"rope_parameters": parameters}


def _common(draw: st.DrawFn) -> dict[str, Any]:
    config = draw(dims())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    config["rms_norm_eps"] = draw(st.sampled_from([ABSENT, 1e-6, 1e-5]))
    config["tie_word_embeddings"] = draw(st.sampled_from([ABSENT, True, False]))
    config["max_position_embeddings"] = draw(st.sampled_from([ABSENT, 64, 256]))
    config["bos_token_id"] = draw(st.sampled_from([ABSENT, 1, None]))
    config["eos_token_id"] = draw(st.sampled_from([ABSENT, 2, [2, 3]]))
    config["hidden_act"] = draw(st.sampled_from([ABSENT, "silu", "gelu"]))
    return config | {"_head_dim_hint": config["head_dim"] if config["head_dim"] is not ABSENT else hidden // heads}


@st.composite
def llama(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["attention_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))
    config["mlp_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))
    return _finish("llama", config, draw)


@st.composite
def mistral(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["sliding_window"] = draw(st.sampled_from([ABSENT, None, 4, 4, 7, 7, 12, 12]))  # absent: 4096
    return _finish("mistral", config, draw)


def _qwen_windows(draw: st.DrawFn, config: dict[str, Any]) -> None:
    layers = config["num_hidden_layers"]
    config["use_sliding_window"] = draw(st.sampled_from([ABSENT, False, True]))
    config["sliding_window"] = draw(st.sampled_from([ABSENT, None, 5, 9]))
    config["max_window_layers"] = draw(st.sampled_from([ABSENT, 0, layers // 2, layers]))
    if draw(st.integers(0, 3)) == 0:  # hub configs rarely carry layer_types; v5 ones may
        config["layer_types"] = draw(
            st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=layers, max_size=layers)
        )


@st.composite
def qwen2(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _qwen_windows(draw, config)
    return _finish("qwen2", config, draw)


@st.composite
def qwen3(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _qwen_windows(draw, config)
    config["attention_bias"] = draw(st.sampled_from([ABSENT, False]))
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128  # Qwen3Config's default, whatever hidden / heads is
    return _finish("qwen3", config, draw)


def _finish(model_type: str, config: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    head_dim = config.pop("_head_dim_hint")
    config.update(draw(rope(head_dim)))
    return {"model_type": model_type, **{k: v for k, v in config.items() if v is not ABSENT}}


def _layer_windows(draw: st.DrawFn, config: dict[str, Any], allow_none: bool = True) -> None:
    """A window and per-layer types, as v5 configs write them (some mixed, some uniform)."""
    layers = config["num_hidden_layers"]
    config["sliding_window"] = draw(st.sampled_from([5, 9] + ([ABSENT] if allow_none else [])))
    if draw(st.booleans()):
        config["layer_types"] = draw(
            st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=layers, max_size=layers)
        )


def _llama_biases(draw: st.DrawFn, config: dict[str, Any]) -> None:
    config["attention_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))
    config["mlp_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))


@st.composite
def olmo2(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["attention_bias"] = draw(st.sampled_from([ABSENT, False, True]))
    return _finish("olmo2", config, draw)


@st.composite
def ernie4_5(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["use_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128  # Ernie4_5Config's default, whatever hidden / heads is
    return _finish("ernie4_5", config, draw)


@st.composite
def hunyuan_v1_dense(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["attention_bias"] = draw(st.sampled_from([ABSENT, False, True]))
    return _finish("hunyuan_v1_dense", config, draw)


@st.composite
def seed_oss(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _llama_biases(draw, config)
    config["attention_out_bias"] = draw(st.sampled_from([ABSENT, ABSENT, False, True]))
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128
    return _finish("seed_oss", config, draw)


def _llama_alias(model_type: str) -> Callable[[], st.SearchStrategy[dict[str, Any]]]:
    @st.composite
    def strategy(draw: st.DrawFn) -> dict[str, Any]:
        config = _common(draw)
        _llama_biases(draw, config)
        if config["head_dim"] is ABSENT:
            config["_head_dim_hint"] = 128
        return _finish(model_type, config, draw)

    return strategy


@st.composite
def ministral(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _layer_windows(draw, config, allow_none=False)
    return _finish("ministral", config, draw)


@st.composite
def ministral3(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config["sliding_window"] = draw(st.sampled_from([ABSENT, None, 5, 9]))
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128
    config = _finish("ministral3", config, draw)
    parameters = dict(config.pop("rope_parameters", None) or {"rope_type": "default"})
    parameters.setdefault("rope_theta", config.pop("rope_theta", 1000000.0))
    if "rope_scaling" in config:
        scaling = config.pop("rope_scaling")
        parameters.update(
            {k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling.get("type", scaling.get("rope_type"))
        )
    parameters["original_max_position_embeddings"] = parameters.get("original_max_position_embeddings", 16)
    parameters["llama_4_scaling_beta"] = draw(st.sampled_from([0.0, 0.0, 0.1]))
    config["rope_parameters"] = parameters
    return config


@st.composite
def cwm(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _layer_windows(draw, config, allow_none=False)
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128
    return _finish("cwm", config, draw)


@st.composite
def smollm3(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    layers = config["num_hidden_layers"]
    config["no_rope_layers"] = draw(
        st.sampled_from([[1] * layers, [1] * layers, [int(i % 2 == 0) for i in range(layers)]])
    )
    config["pad_token_id"] = 0  # the class default (128004) lies outside a tiny vocabulary
    return _finish("smollm3", config, draw)


@st.composite
def cohere2(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    config.pop("rms_norm_eps")
    config["layer_norm_eps"] = draw(st.sampled_from([ABSENT, 1e-5, 1e-6]))
    config["logit_scale"] = draw(st.sampled_from([ABSENT, 0.25, 1.0]))
    config["attention_bias"] = draw(st.sampled_from([ABSENT, False, True]))
    config["pad_token_id"] = draw(st.sampled_from([0, 1]))
    layers = config["num_hidden_layers"]
    config["sliding_window"] = draw(st.sampled_from([5, 9]))
    config["layer_types"] = draw(
        st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=layers, max_size=layers)
    )
    return _finish("cohere2", config, draw)


@st.composite
def phi3(draw: st.DrawFn) -> dict[str, Any]:
    """Phi-3 rotates hidden/heads x partial_rotary_factor dimensions with default or LongRoPE (legacy "su")
    tables, and names the original context at the top level."""
    config = _common(draw)
    config["head_dim"] = ABSENT
    config.pop("_head_dim_hint")
    config["sliding_window"] = draw(st.sampled_from([ABSENT, None, 5, 9]))
    factor = draw(st.sampled_from([ABSENT, ABSENT, 1.0, 0.5]))
    config["partial_rotary_factor"] = factor
    config["pad_token_id"] = 0  # the class defaults (32000) lie outside a tiny vocabulary
    config["eos_token_id"] = draw(st.sampled_from([1, [1, 2]]))
    theta = draw(st.sampled_from([ABSENT, 10000.0, 500000.0]))
    if theta is not ABSENT:
        config["rope_theta"] = theta
    if draw(st.booleans()):
        half = int(config["hidden_size"] // config["num_attention_heads"] * (1.0 if factor is ABSENT else factor)) // 2
        config["original_max_position_embeddings"] = draw(st.sampled_from([8, 16]))
        config["rope_scaling"] = {
            "type": draw(st.sampled_from(["longrope", "su"])),
            "short_factor": [1.0 + 0.01 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
        }
    return {"model_type": "phi3", **{k: v for k, v in config.items() if v is not ABSENT}}


def _granite_multipliers(draw: st.DrawFn, config: dict[str, Any]) -> None:
    config["embedding_multiplier"] = draw(st.sampled_from([ABSENT, 1.0, 12.0]))
    config["residual_multiplier"] = draw(st.sampled_from([ABSENT, 1.0, 0.22]))
    config["attention_multiplier"] = draw(st.sampled_from([ABSENT, 1.0, 0.0078125]))
    config["logits_scaling"] = draw(st.sampled_from([ABSENT, 1.0, 8.0]))
    _llama_biases(draw, config)
    config["pad_token_id"] = draw(st.sampled_from([0, ABSENT]))


@st.composite
def granite(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _granite_multipliers(draw, config)
    return _finish("granite", config, draw)


@st.composite
def granite_swa(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    _granite_multipliers(draw, config)
    _layer_windows(draw, config, allow_none=False)
    return _finish("granite_swa", config, draw)


@st.composite
def lfm2(draw: st.DrawFn) -> dict[str, Any]:
    config = _common(draw)
    for key in ("rms_norm_eps", "hidden_act", "head_dim"):
        config.pop(key)
    config["_head_dim_hint"] = config["hidden_size"] // config["num_attention_heads"]
    config["norm_eps"] = draw(st.sampled_from([ABSENT, 1e-5, 1e-6]))
    layers = config["num_hidden_layers"]
    config["layer_types"] = draw(
        st.lists(st.sampled_from(["conv", "full_attention"]), min_size=layers, max_size=layers)
    )
    if draw(st.integers(0, 4)):  # mostly runnable: transformers needs at least one attention layer
        config["layer_types"][-1] = "full_attention"
    config["conv_bias"] = draw(st.sampled_from([ABSENT, False, True]))
    config["conv_L_cache"] = draw(st.sampled_from([ABSENT, 2, 3]))
    config["block_auto_adjust_ff_dim"] = draw(st.sampled_from([ABSENT, False]))
    config["pad_token_id"] = 0
    return _finish("lfm2", config, draw)


@st.composite
def exaone(draw: st.DrawFn) -> dict[str, Any]:
    """EXAONE 3.x configs name some fields the GPT-2 way (num_layers, layer_norm_epsilon, activation_function)."""
    config = _common(draw)
    _llama_biases(draw, config)
    if config["head_dim"] is ABSENT:
        config["_head_dim_hint"] = 128
    for legacy, field in (("num_layers", "num_hidden_layers"), ("layer_norm_epsilon", "rms_norm_eps")):
        if draw(st.booleans()) and config[field] is not ABSENT:
            config[legacy] = config.pop(field)
    config["pad_token_id"] = 0
    config["eos_token_id"] = 2
    return _finish("exaone", config, draw)


FAMILIES: dict[str, Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "olmo2": olmo2,
    "ernie4_5": ernie4_5,
    "hunyuan_v1_dense": hunyuan_v1_dense,
    "seed_oss": seed_oss,
    "internlm3": _llama_alias("internlm3"),
    "iquestcoder": _llama_alias("iquestcoder"),
    "ministral": ministral,
    "ministral3": ministral3,
    "cwm": cwm,
    "smollm3": smollm3,
    "cohere2": cohere2,
    "phi3": phi3,
    "granite": granite,
    "granite_swa": granite_swa,
    "lfm2": lfm2,
    "exaone": exaone,
}


@st.composite
def dense_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A config of any family, or of those UPCYCLE_FUZZ_FAMILIES names (comma-separated: fuzz a new family alone)."""
    chosen = [f for f in os.environ.get("UPCYCLE_FUZZ_FAMILIES", "").split(",") if f] or sorted(FAMILIES)
    return draw(FAMILIES[draw(st.sampled_from(chosen))]())


@st.composite
def upcycle_options(draw: st.DrawFn, num_layers: int, intermediate: int) -> dict[str, Any]:
    """Conversion options, mostly valid and exact; some invalid or approximate ones, which must be refused or
    labelled approximate."""
    granularity = draw(st.sampled_from([1, 1, 2, 3]))
    experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, max(1, experts * granularity)))
    if granularity > 1 and draw(st.integers(0, 4)):
        top_k = granularity * draw(st.integers(1, experts))  # a valid multiple, most of the time
    options: dict[str, Any] = {"experts": experts, "top_k": top_k, "granularity": granularity}
    routers = ["renorm", "renorm", "softmax-topk"] if granularity == 1 else ["renorm"] * 7 + ["softmax-topk"]
    options["router"] = draw(st.sampled_from(routers))
    inits = ["random", "zero", "zero"] if options["router"] != "renorm" else ["random", "random", "zero"]
    options["router_init"] = draw(st.sampled_from([*inits, "cluster"]))
    if granularity > 1 and draw(st.integers(0, 3)) == 0:  # shards of neurons that fire together
        options["split"] = "activation"
    if options["router_init"] == "cluster" or "split" in options:  # real text through the dense model, briefly
        options["calibration_tokens"] = 64
    if num_layers > 1 and draw(st.booleans()):
        first = draw(st.integers(0, num_layers - 1))
        options["layers"] = f"{first}-{num_layers - 1}" if draw(st.booleans()) else str(first)
    extra = draw(st.sampled_from(["none"] * 8 + ["drop", "noise", "scale"]))
    if extra == "drop":
        options["drop_upcycling"] = 0.5
    elif extra == "noise":
        options["noise"] = 0.01
    elif extra == "scale":
        options["weight_scale"] = draw(st.sampled_from(["none", "2", "4"]))
    shared = draw(st.sampled_from(["none"] * 3 + ["whole experts", "aligned", "any width"]))
    if shared == "whole experts":  # S = n x (F - S) / G: what a class adding its shared expert as it is can hold
        n = draw(st.integers(1, 3))
        if (n * intermediate) % (granularity + n) == 0:
            options["shared_width"] = n * intermediate // (granularity + n)
    elif shared == "aligned" and intermediate >= 16:  # routed experts of whole 16-byte bf16 rows: a gated class's
        options["shared_width"] = intermediate - 8 * granularity * draw(
            st.integers(1, intermediate // 8 // granularity - 1 or 1)
        )
    elif shared == "any width":  # most widths must be refused: misaligned rows, or a width no class holds
        options["shared_width"] = draw(st.integers(1, intermediate))
    return options
