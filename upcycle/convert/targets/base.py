"""What every native MoE target class shares: the config fields copied from the dense model, and key names."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.recipe import TensorRecipe

# Copied unchanged from the dense config when present; they shape attention, norms and embeddings.
PASSTHROUGH_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where the layers' MoE pieces go: which layers are sparse and how experts are numbered."""

    moe_layers: tuple[int, ...]
    num_layers: int

    @property
    def all_moe(self) -> bool:
        return len(self.moe_layers) == self.num_layers

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.moe_layers)]


class Target:
    """A native transformers MoE class; subclasses say which dense configs they hold exactly, and why not."""

    name: str = ""
    architecture: str = ""
    model_type: str = ""
    moe_prefix: str = "mlp"  # module path of the sparse block inside a decoder layer
    expert_names: dict[str, str] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    router_fp32: bool = False  # transformers keeps this router in fp32 whatever the model dtype

    def why_not(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        """The reason this class cannot hold the upcycled model exactly, or None when it can."""
        raise NotImplementedError

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        raise NotImplementedError

    def config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout, dtype: str) -> dict:
        cfg = {key: dense.config[key] for key in PASSTHROUGH_FIELDS if key in dense.config}
        cfg.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            num_key_value_heads=dense.num_kv_heads,
            head_dim=dense.head_dim,
            tie_word_embeddings=dense.tie_word_embeddings,
            dtype=dtype,
            output_router_logits=False,
        )
        cfg.update(dense.rope_fields())
        cfg.update(self.moe_config(dense, opts, layout))
        return cfg

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{self.expert_names[projection]}.weight"

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.gate.weight"

    def dense_mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.{projection}_proj.weight"

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        """Tensors the class requires beyond experts and router (empty shared experts, score biases)."""
        return []

    def output_scale(self, opts: UpcycleOptions) -> float:
        """The factor the class applies to the routed output (routed_scaling_factor), 1 for most."""
        return 1.0
