"""Dense source families: what their checkpoints hold and which of their configs can be upcycled exactly."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import SourceError, UnsupportedModelError
from upcycle.hf_config import UnknownConfigError, resolved_fields

MLP_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class DenseModel:
    """The facts about a dense source that conversion needs, as transformers reads its config.json.

    `resolved` holds every field the source class would default (Llama's rms_norm_eps 1e-6, Qwen3's head_dim 128,
    Mistral's window 4096), so a field absent from config.json never falls back to the target class's default.
    """

    family: str
    config: dict  # config.json as found
    resolved: dict  # config.json as transformers reads it, defaults filled in
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...]  # the attention window of each layer, None for full attention

    def mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.{projection}_proj.weight"

    @property
    def windows_uniform(self) -> bool:
        return len(set(self.layer_windows)) <= 1

    @property
    def sliding_window(self) -> int | None:
        """The one window every layer uses (None: full attention); only meaningful when windows_uniform."""
        return self.layer_windows[0] if self.layer_windows else None

    @property
    def has_windows(self) -> bool:
        return any(w is not None for w in self.layer_windows)

    def windowed_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.layer_windows) if w is not None]

    def rope_parameters(self) -> dict:
        """The rotary settings in transformers' v5 form (rope_type, rope_theta and the type's own fields)."""
        return dict(self.resolved.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The exact tensor set (and shapes) the family's transformers class saves; anything else is a wrong source."""
        hidden, inter, vocab = self.hidden_size, self.intermediate_size, int(self.resolved["vocab_size"])
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (vocab, hidden)
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}."
            shapes[prefix + "input_layernorm.weight"] = (hidden,)
            shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
            attn = prefix + "self_attn."
            shapes |= {attn + "q_proj.weight": (q_out, hidden), attn + "k_proj.weight": (kv_out, hidden)}
            shapes |= {attn + "v_proj.weight": (kv_out, hidden), attn + "o_proj.weight": (hidden, q_out)}
            if self.qkv_bias:
                shapes |= {
                    attn + "q_proj.bias": (q_out,),
                    attn + "k_proj.bias": (kv_out,),
                    attn + "v_proj.bias": (kv_out,),
                }
            if self.qk_norm:
                shapes |= {attn + "q_norm.weight": (self.head_dim,), attn + "k_norm.weight": (self.head_dim,)}
            shapes |= {self.mlp_key(i, "gate"): (inter, hidden), self.mlp_key(i, "up"): (inter, hidden)}
            shapes[self.mlp_key(i, "down")] = (hidden, inter)
        return shapes


SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
WHY_NOT: dict[str, str] = {
    "gemma2": "Gemma 2 has sandwich norms and logit soft-capping that no native MoE class reproduces",
    "gemma3": "Gemma 3 has sandwich norms and per-layer sliding/global attention that no native MoE class reproduces",
    "gemma3_text": "Gemma 3 has sandwich norms and per-layer sliding/global attention that no native MoE class "
    "reproduces",
    "olmo2": "OLMo2's q/k norms act on the whole projection, unlike OLMoE's, so no native class is exact",
    "phi3": "Phi-3 stores fused qkv/gate_up projections and needs splitting into Mixtral (planned, not yet supported)",
    "gemma": "Gemma v1 needs its embedding scale and (1+w) norms folded into Mixtral (planned, not yet supported)",
    "granite": "Granite needs its multipliers carried into GraniteMoe (planned, not yet supported)",
    "ernie4_5": "Ernie 4.5 maps to Ernie4_5_Moe (planned, not yet supported)",
}


def describe_dense(config: dict, tensor_names: set[str] | dict) -> DenseModel:
    """Identify the family, refuse configs without an exact native target, and check the tensors against the config."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        reason = WHY_NOT.get(str(model_type), "it is not a family upcycle knows")
        raise UnsupportedModelError(
            f"model_type {model_type!r} cannot be upcycled exactly: {reason}.",
            f"upcycle supports {', '.join(SUPPORTED)} (dense decoder families whose MoE counterpart in "
            "transformers is exact at initialisation).",
        )
    try:
        resolved = resolved_fields(config)
    except UnknownConfigError as error:
        raise SourceError(f"config.json cannot be read: {error}.", "re-save the model with save_pretrained.") from None
    try:
        hidden = int(resolved["hidden_size"])
        heads = int(resolved["num_attention_heads"])
        num_layers = int(resolved["num_hidden_layers"])
        model = DenseModel(
            family=model_type,
            config=config,
            resolved=resolved,
            num_layers=num_layers,
            hidden_size=hidden,
            intermediate_size=int(resolved["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(resolved.get("num_key_value_heads") or heads),
            head_dim=int(resolved.get("head_dim") or hidden // heads),
            qkv_bias=model_type == "qwen2" or bool(resolved.get("attention_bias")),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(resolved.get("tie_word_embeddings", False)),
            layer_windows=_layer_windows(model_type, resolved, num_layers),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise SourceError(
            f"config.json lacks or garbles a required field ({error}).",
            "re-save the model with save_pretrained.",
        ) from None
    _refuse_inexact_configs(model)
    _check_tensors(model, tensor_names)
    return model


def _layer_windows(family: str, resolved: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's attention window, by the rule the family's transformers class applies."""
    window = resolved.get("sliding_window")
    if family == "mistral":  # MistralModel slides every layer by config.sliding_window
        return (window,) * num_layers
    if family in ("qwen2", "qwen3"):  # per layer_types, which the config derives from max_window_layers
        types = list(resolved.get("layer_types") or ["full_attention"] * num_layers)
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
        return tuple(window if t == "sliding_attention" and window else None for t in types)
    return (None,) * num_layers


def _refuse_inexact_configs(model: DenseModel) -> None:
    if model.num_heads % model.num_kv_heads:
        raise SourceError(
            f"num_attention_heads {model.num_heads} is not a multiple of num_key_value_heads {model.num_kv_heads} "
            "(as transformers reads config.json; an absent field takes the class default), so transformers cannot "
            "run this model.",
            "fix config.json so the key/value heads divide the attention heads.",
        )
    cfg = model.resolved
    if model.family in ("llama", "qwen3") and cfg.get("attention_bias"):
        raise UnsupportedModelError(
            f"this {model.family} model has attention biases (attention_bias=true), which "
            f"{'Mixtral' if model.family == 'llama' else 'Qwen3-MoE'} cannot hold.",
            "only bias-free attention can be upcycled exactly.",
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(
            "this model has MLP biases (mlp_bias=true); native MoE experts have none.",
            "only bias-free MLPs can be upcycled exactly.",
        )
    types = model.resolved.get("layer_types") or []
    if "sliding_attention" in types and not model.resolved.get("sliding_window"):
        raise SourceError(
            "layer_types names sliding-window layers but the config sets no sliding_window (use_sliding_window is "
            "off or the window is null), so transformers cannot run this model.",
            "set use_sliding_window and sliding_window, or make every layer full_attention.",
        )
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModelError(
            f"this {model.family} model has layer types {sorted(unknown)} that upcycle does not know.",
            "only full and sliding-window attention layers can be upcycled exactly.",
        )


def _check_tensors(model: DenseModel, tensors: set[str] | dict) -> None:
    """Names and, when known, shapes: a config that does not describe its weights fails here, not at load time."""
    names = set(tensors)
    ignorable = {n for n in names if n.endswith("rotary_emb.inv_freq")}
    if model.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & names
    expected = model.expected_shapes()
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - ignorable)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(
            f"the source lacks tensor {missing[0]!r}{more} that a {model.family} model with this config must have.",
            "pass the complete checkpoint (all shards) for this config.",
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise SourceError(
            f"the source holds tensor {unexpected[0]!r}{more} that a {model.family} model with "
            "this config does not have.",
            "check that config.json matches the weights.",
        )
    if isinstance(tensors, dict):
        for name, shape in expected.items():
            actual = tuple(getattr(tensors[name], "shape", shape))
            if actual != shape:
                raise SourceError(
                    f"{name} has shape {list(actual)} but config.json implies {list(shape)} (as transformers "
                    "reads it, absent fields taking the class defaults).",
                    "fix config.json (e.g. an absent head_dim takes the class default) so it matches the weights.",
                )
