"""Greedy `generate()` with the cache, probed: does a config make transformers generate what another one does?

Two classes can agree on every forward pass and still generate differently: generation runs through class hooks
(`prepare_inputs_for_generation` and the other `GenerationMixin` methods a class may override) and a cache built
from the config. Phi-3 overrides one: it drops the cache when a sequence crosses `original_max_position_embeddings`
and recomputes it (with LongRoPE's long factors), which Mixtral does not. No single forward pass shows that.

So each config is built as transformers builds it, narrowed to one attention head of the same head size (the
probe's cost then grows with positions, not width), with the probe's stand-in embedding, MLP and head, and
generates greedily across every point where generation may switch behaviour: each attention window and chunk, the
original context of a long-context rotary type, and a short run for every config. What is compared: the class's own
generation hooks, the cache transformers builds for the config, and the tokens and logits of each run. Switch points
past GENERATE_LIMIT are not run; they are proven only when neither class has generation hooks of its own.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from upcycle.hf.probe import (
    ProbeError,
    _fused_spans,
    _materialize,
    _ProbeEmbedding,
    _ProbeHead,
    _split_layer,
    load_config,
)
from upcycle.hf.skeleton import SkeletonError, decoder_layers, meta_model, rebuild_rotary

GENERATE_LIMIT = 4160  # positions a probe generates across (a 4096 window or original context, and a margin)
NEW_TOKENS = 8  # tokens generated past each switch point's prompt
SHORT_PROMPT = 12  # the run every config gets: a short prompt, NEW_TOKENS greedy tokens
LENGTH_SWITCHING_ROPE = {"dynamic", "longrope"}  # rotary types whose tables change with the sequence length
TOLERANCE = 1e-5  # relative, on each step's logits: both runs do the same fp32 operations


@dataclass
class GenerationSpec:
    architecture: str
    hooks: dict[str, str]  # GenerationMixin methods the class (or a model base of it) defines: name -> its owner
    cache: list[str]  # the cache transformers builds for the config, one entry per layer
    runs: dict[int, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # prompt length -> ids, logits


def class_hooks(model_class: type) -> dict[str, str]:
    """The generation methods a model class does not take from GenerationMixin itself, with their owner."""
    from transformers import GenerationMixin

    hooks = {}
    for name, value in inspect.getmembers(GenerationMixin):
        if name.startswith("__") or not callable(value):
            continue
        owner = next((klass for klass in model_class.__mro__ if name in klass.__dict__), None)
        if owner is not None and owner is not GenerationMixin and owner.__module__.startswith("transformers.models."):
            hooks[name] = owner.__qualname__
    return hooks


def causal_lm_class(cfg: Any) -> type:
    """The class `AutoModelForCausalLM` builds for a config (without building it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    except KeyError:
        raise ProbeError(f"transformers has no causal LM class for {type(cfg).__name__}") from None


def switch_points(configs: list[Any], hooks_differ: bool) -> list[int]:
    """Sequence lengths where generation may change behaviour: windows, chunks, and an original context (when the
    rotary tables switch there, or when a class has generation hooks of its own, which may read it)."""
    points = set()
    for cfg in configs:
        for key, value in cfg.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                continue
            if ("window" in key and "layers" not in key) or "chunk" in key:
                points.add(value)
        rope = getattr(cfg, "rope_parameters", None) or {}
        original = rope.get("original_max_position_embeddings") or getattr(
            cfg, "original_max_position_embeddings", None
        )
        if original and (hooks_differ or rope.get("rope_type") in LENGTH_SWITCHING_ROPE):
            points.add(int(original))
    return sorted(points)


def generation_spec(config: dict, points: list[int]) -> GenerationSpec:
    """Build the narrowed probe model of `config` and generate across each switch point up to GENERATE_LIMIT."""
    cfg = load_config(config)
    model = _probe_model(_narrowed(cfg))
    spec = GenerationSpec(type(model).__name__, class_hooks(type(model)), _cache_layout(model))
    for prompt in sorted({SHORT_PROMPT} | {max(1, p - NEW_TOKENS // 2) for p in points if p <= GENERATE_LIMIT}):
        spec.runs[prompt] = _generate(model, prompt)
    return spec


def compare_generation(dense: GenerationSpec, moe: GenerationSpec, points: list[int]) -> list[tuple[str, Any, Any]]:
    """What differs, as (what, dense, moe): hooks, cache, then the first run whose tokens or logits differ."""
    found: list[tuple[str, Any, Any]] = []
    if dense.cache != moe.cache:
        found.append(("the cache generate() builds (per layer)", _summary(dense.cache), _summary(moe.cache)))
    for prompt in sorted(set(dense.runs) & set(moe.runs)):
        ids_a, logits_a = dense.runs[prompt]
        ids_b, logits_b = moe.runs[prompt]
        errors = [_relative(a, b) for a, b in zip(logits_a, logits_b, strict=True)]
        differing = (i for i, (a, b, e) in enumerate(zip(ids_a, ids_b, errors, strict=True)) if a != b or e > TOLERANCE)
        step = next(differing, None)
        if step is not None:
            what = (
                f"the class that runs greedy generate() with the cache (from a {prompt}-token prompt, new token "
                f"{step + 1} at position {prompt + step} differs: logits {errors[step]:.3g} apart"
                + (", another token" if ids_a[step] != ids_b[step] else "")
                + ")"
            )
            found.append((what, _hooks_text(dense), _hooks_text(moe)))
            break
    unrun = [p for p in points if p > GENERATE_LIMIT]
    if unrun and dense.hooks != moe.hooks:
        what = (
            f"the class that generates past {unrun[0]} tokens (beyond the {GENERATE_LIMIT} the probe generates "
            "across, so only identical generation hooks prove it)"
        )
        found.append((what, _hooks_text(dense), _hooks_text(moe)))
    return found


def _narrowed(cfg: Any) -> Any:
    """The same config with one query and one key/value head of the same head size: what generation does with
    positions, windows and the cache does not depend on the width."""
    cfg = copy.deepcopy(cfg)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    try:
        cfg.num_attention_heads = 1
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = 1
        if getattr(cfg, "head_dim", None) is not None:
            cfg.head_dim = head_dim
        cfg.hidden_size = head_dim
    except Exception as error:  # a config class that validates its fields on assignment
        raise ProbeError(f"the config cannot be narrowed for the generation probe ({error})") from None
    return cfg


def _probe_model(cfg: Any) -> nn.Module:
    try:
        model = meta_model(cfg, "sdpa")
    except SkeletonError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise ProbeError(str(error)) from None
        model = meta_model(cfg, "eager")
    try:
        for index, layer in enumerate(decoder_layers(model)):
            _split_layer(index, layer)
        hidden = model.get_input_embeddings().weight.shape[1]
        model.set_input_embeddings(_ProbeEmbedding(hidden))
        if model.get_output_embeddings() is not None:
            model.set_output_embeddings(_ProbeHead(hidden))
        rebuild_rotary(model)
    except SkeletonError as error:
        raise ProbeError(str(error)) from None
    _materialize(model, _fused_spans(cfg))
    return model


def _cache_layout(model: nn.Module) -> list[str]:
    """The cache `generate()` would build for this model, layer by layer (kind and window)."""
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    except Exception as error:
        return [f"cannot be built ({type(error).__name__})"]
    layers = getattr(cache, "layers", [])
    windows = [getattr(layer, "sliding_window", None) for layer in layers]
    return [type(layer).__name__ + (f"(window {w})" if w else "") for layer, w in zip(layers, windows, strict=True)]


def _generate(model: nn.Module, prompt: int) -> tuple[list[int], torch.Tensor]:
    from transformers import GenerationConfig

    settings = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
        bos_token_id=None, use_cache=True, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    model.generation_config = settings
    ids = (torch.arange(prompt) * 7 % 16)[None]  # ids the stand-in head can produce too
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings)
    except Exception as error:
        raise ProbeError(
            f"{type(model).__name__} does not generate on the probe ({type(error).__name__}: {error})"
        ) from None
    return out.sequences[0, prompt:].tolist(), torch.stack([step[0] for step in out.logits])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    diff = (a.double() - b.double()).abs().max().item()
    scale = a.double().abs().max().item()
    return diff / scale if scale else diff


def _hooks_text(spec: GenerationSpec) -> str:
    own = ", ".join(f"{owner}.{name}" for name, owner in sorted(spec.hooks.items()))
    return f"{spec.architecture} ({'its own ' + own if own else 'GenerationMixin only'})"


def _summary(cache: list[str]) -> str:
    kinds = sorted(set(cache))
    return ", ".join(f"{cache.count(kind)} x {kind}" for kind in kinds)
