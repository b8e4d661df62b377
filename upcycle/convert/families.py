"""Dense source families: what their checkpoints hold and which of their configs can be upcycled exactly."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import SourceError, UnsupportedModelError

MLP_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class DenseModel:
    """The facts about a dense source that conversion needs, read from its config.json."""

    family: str
    config: dict
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    def mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.{projection}_proj.weight"

    @property
    def sliding_window(self) -> int | None:
        """The attention window every layer uses, or None for full attention."""
        cfg = self.config
        if self.family == "mistral":
            return cfg.get("sliding_window")
        if self.family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            return cfg.get("sliding_window")
        return None

    def layer_types(self) -> list[str] | None:
        types = self.config.get("layer_types")
        return list(types) if types else None

    def rope_fields(self) -> dict:
        """Rotary settings in whichever form the source uses; transformers normalises both on load."""
        cfg = self.config
        if cfg.get("rope_parameters"):
            return {"rope_parameters": dict(cfg["rope_parameters"])}
        fields = {"rope_theta": cfg.get("rope_theta", 10000.0)}
        if cfg.get("rope_scaling"):
            fields["rope_scaling"] = cfg["rope_scaling"]
        return fields

    def expected_keys(self) -> set[str]:
        """The exact tensor set the family's transformers class saves; anything else means a wrong source."""
        keys = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.tie_word_embeddings:
            keys.add("lm_head.weight")
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}."
            keys |= {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
            keys |= {f"{prefix}self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")}
            if self.qkv_bias:
                keys |= {f"{prefix}self_attn.{p}_proj.bias" for p in ("q", "k", "v")}
            if self.qk_norm:
                keys |= {prefix + "self_attn.q_norm.weight", prefix + "self_attn.k_norm.weight"}
            keys |= {self.mlp_key(i, p) for p in MLP_PROJECTIONS}
        return keys


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


def describe_dense(config: dict, tensor_names: set[str]) -> DenseModel:
    """Identify the family, refuse configs without an exact native target, and check the tensor set."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        reason = WHY_NOT.get(str(model_type), "it is not a family upcycle knows")
        raise UnsupportedModelError(
            f"model_type {model_type!r} cannot be upcycled exactly: {reason}.",
            f"upcycle supports {', '.join(SUPPORTED)} (dense decoder families whose MoE counterpart in "
            "transformers is exact at initialisation).",
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        model = DenseModel(
            family=model_type,
            config=config,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise SourceError(
            f"config.json lacks or garbles a required field ({error}).",
            "re-save the model with save_pretrained.",
        ) from None
    _refuse_inexact_configs(model)
    _check_tensors(model, tensor_names)
    return model


def _refuse_inexact_configs(model: DenseModel) -> None:
    cfg = model.config
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
    if model.family == "qwen2" and model.layer_types() and len(set(model.layer_types())) > 1:
        raise UnsupportedModelError(
            "this Qwen2 model mixes sliding and full attention layers; upcycle only "
            "handles one attention type for every layer.",
            "convert a model with use_sliding_window=false.",
        )


def _check_tensors(model: DenseModel, names: set[str]) -> None:
    ignorable = {n for n in names if n.endswith("rotary_emb.inv_freq")}
    if model.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & names
    expected = model.expected_keys()
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - ignorable)
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
