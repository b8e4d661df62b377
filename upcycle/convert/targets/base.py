"""What every native MoE target class shares: the config fields copied from the dense model, and key names."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.convert.families import DenseModel
from upcycle.convert.options import UpcycleOptions
from upcycle.convert.tensor_recipe import TensorRecipe
from upcycle.spans import layer_spans

# Copied from the dense config as transformers resolves it (absent fields take the *source* class's default, and
# are written out, so the target class's defaults never apply): they shape attention, norms and embeddings.
PASSTHROUGH_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "initializer_range", "attention_dropout",
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


def rope_fields(parameters: dict) -> dict:
    """rope_parameters for transformers 5, and the same settings in the legacy fields older readers use.

    transformers 4.x reads only rope_theta / rope_scaling; transformers 5 prefers a legacy rope_scaling over
    rope_parameters when both exist, so the two blocks are written from one dict and can never disagree.
    """
    fields: dict = {"rope_parameters": dict(parameters), "rope_theta": parameters["rope_theta"]}
    if parameters.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
    if "partial_rotary_factor" in parameters:
        fields["partial_rotary_factor"] = parameters["partial_rotary_factor"]
    return fields


def window_fields(dense: DenseModel) -> dict:
    """Per-layer windows for classes that read layer_types, plus the older fields when they mean the same."""
    windowed = dense.windowed_layers()
    first = windowed[0] if windowed else dense.num_layers
    is_suffix = windowed == list(range(first, dense.num_layers))
    return {
        "use_sliding_window": bool(windowed),
        "sliding_window": next((w for w in dense.layer_windows if w is not None), None),
        "max_window_layers": first if is_suffix else dense.resolved.get("max_window_layers", dense.num_layers),
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in dense.layer_windows],
    }


def uniform_window_problem(dense: DenseModel, architecture: str) -> str | None:
    """Why a class with one window for every layer cannot hold this model, or None when it can."""
    if dense.windows_uniform:
        return None
    return (
        f"{architecture} applies one attention window to every layer, but this model slides only on layers "
        f"{layer_spans(dense.windowed_layers())}"
    )


_NOT_SHARED = {
    "model_type", "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype", "id2label",
    "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states", "is_encoder_decoder",
    "chunk_size_feed_forward", "intermediate_size", "mlp_bias",
}  # fmt: skip


def sibling_fields(dense: DenseModel, model_type: str) -> dict:
    """Every field of the dense config (as resolved) that the sibling MoE config class also has: a class built as
    the dense family's MoE twin reads the same names the same way, so each is carried over explicitly."""
    from transformers import CONFIG_MAPPING

    known = set(CONFIG_MAPPING[model_type]().to_dict()) - _NOT_SHARED
    return {key: value for key, value in dense.resolved.items() if key in known}


def expert_width(dense: DenseModel, opts: UpcycleOptions) -> int:
    """Intermediate neurons of one routed expert: the dense MLP's, less the shared expert's, cut into G shards."""
    return (dense.intermediate_size - opts.shared_width) // opts.granularity


def expert_shape_problem(target: Target, dense: DenseModel, opts: UpcycleOptions) -> str | None:
    """Why the shared expert asked for does not fit the class (None: it fits, or none is asked)."""
    if opts.shared_width and not target.shared_expert:
        return f"{target.architecture} has no shared expert (qwen2_moe holds one of any width; glm4_moe and dots1 too)"
    return shared_width_problem(target, dense, opts)


def shared_width_problem(target: Target, dense: DenseModel, opts: UpcycleOptions) -> str | None:
    """Why the class cannot hold a shared expert of --shared-width neurons (None: it can, or none is asked)."""
    width = opts.shared_width
    if not width:
        return None
    if not target.shared_expert:
        return f"{target.architecture} has no shared expert (qwen2_moe holds one of any width; glm4_moe and dots1 too)"
    if width >= dense.intermediate_size:
        return f"--shared-width {width} leaves no neurons of the {dense.intermediate_size} for the routed experts"
    routed = dense.intermediate_size - width
    if routed % opts.granularity:
        return f"the {routed} neurons left beside the shared expert do not split into {opts.granularity} shards"
    expert = routed // opts.granularity
    if target.shared_expert == "plain" and width % expert:
        return (
            f"{target.architecture}'s shared expert is a whole number of routed experts wide ({expert} neurons each "
            f"here), and --shared-width {width} is not"
        )
    return None


def no_groups_problem(target: Target, opts: UpcycleOptions) -> str | None:
    """Classes without group-limited routing: tied router rows alone can split a copy on ties, so G > 1 is refused."""
    if opts.granularity > 1:
        return (
            f"{target.architecture} has no group-limited routing, so virtual groups could split (use a target "
            "with group-limited routing, or -g 1)"
        )
    return None


def attention_problem(target: Target, dense: DenseModel) -> str | None:
    """Why the target's decoder layer cannot compute what the dense one does (traits only), or None."""
    traits, name = dense.traits, target.architecture
    if traits.block not in target.blocks:
        return f"{name} decoder layers are not {dense.title}'s ({traits.block} layers)"
    if traits.qk_norm not in target.qk_norms:
        if traits.qk_norm == "none":
            return f"{name} attention applies q/k norms that this {dense.title} model lacks"
        return f"{name} attention has no q/k norms ({traits.qk_norm}), which this {dense.title} model needs"
    if traits.o_bias and not target.o_bias:
        return f"{name} attention has no output-projection bias, which this {dense.title} model has"
    if traits.qkv_bias and not target.qkv_bias:
        return f"{name} attention has no q/k/v biases, which this {dense.title} model needs"
    return None


class Target:
    """A native transformers MoE class; subclasses say which dense configs they hold exactly, and why not."""

    name: str = ""
    architecture: str = ""
    model_type: str = ""
    # What the class's decoder layer can compute (asked of DenseModel.traits, never of a family's name).
    blocks: frozenset[str] = frozenset({"llama"})
    qk_norms: frozenset[str] = frozenset({"none"})
    qkv_bias: bool = False  # it can carry q/k/v biases (a config switch)
    o_bias: bool = False  # it can carry an output-projection bias
    moe_prefix: str = "mlp"  # module path of the sparse block inside a decoder layer
    expert_names: dict[str, str] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    router_fp32: bool = False  # transformers keeps this router in fp32 whatever the model dtype
    # The class casts the selected routing weights to the compute dtype before combining the experts, so in bf16
    # they no longer sum to exactly 1: a correct upcycle then differs from its dense model by up to ~1 % in bf16.
    rounds_routing_weights: bool = True
    # How the class adds its shared expert to the routed output: "" (it has none upcycle can fill), "gated" (times
    # a sigmoid gate: a zero gate is exactly 1/2, cancelled by doubling the down projection), "plain" (added as it
    # is, its width a whole number of routed experts' widths).
    shared_expert: str = ""

    def why_not(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        """The reason this class cannot hold the upcycled model exactly, or None when it can."""
        return (
            attention_problem(self, dense)
            or expert_shape_problem(self, dense, opts)
            or self.routing_problem(dense, opts, layout)
        )

    def routing_problem(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> str | None:
        """The reason the class's router, layer layout or windows cannot hold these options, or None."""
        raise NotImplementedError

    def moe_config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout) -> dict:
        raise NotImplementedError

    def config(self, dense: DenseModel, opts: UpcycleOptions, layout: Layout, dtype: str) -> dict:
        cfg = {key: dense.resolved.get(key) for key in PASSTHROUGH_FIELDS}
        cfg.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            num_key_value_heads=dense.num_kv_heads,
            head_dim=dense.head_dim,
            tie_word_embeddings=dense.tie_word_embeddings,
            dtype=dtype,
            output_router_logits=False,
        )
        cfg.update(rope_fields(self.rope_parameters(dense)))
        cfg.update(self.moe_config(dense, opts, layout))
        return cfg

    def rope_parameters(self, dense: DenseModel) -> dict:
        """The rotary settings this class needs to rotate exactly as the dense model does."""
        return dense.rope_parameters()

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{self.expert_names[projection]}.weight"

    stacked_experts: bool = False  # the class stores each layer's experts as two stacked tensors

    def stacked_key(self, layer: int, part: str) -> str:
        """The stacked tensor of a layer's experts: part "gate_up" ([E, 2F, H]) or "down" ([E, H, F])."""
        raise NotImplementedError

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.gate.weight"

    def shared_key(self, layer: int, projection: str) -> str:
        """The shared expert's tensor for one projection (gate, up, down); only for classes with `shared_expert`."""
        raise NotImplementedError

    def dense_mlp_key(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.{projection}_proj.weight"

    def checkpoint_name(self, name: str) -> str:
        """The on-disk name of a layer tensor (relative to the layer) the class keeps under another name in memory."""
        return name

    def rename(self, name: str) -> str:
        """The class's name for a copied dense tensor (most classes keep the dense names)."""
        return name

    def extra_tensors(self, layer: int, dense: DenseModel, opts: UpcycleOptions, dtype: str) -> list[TensorRecipe]:
        """Tensors the class requires beyond experts and router (empty shared experts, score biases)."""
        return []

    def output_scale(self, opts: UpcycleOptions) -> float:
        """The factor the class applies to the routed output (routed_scaling_factor), 1 for most."""
        return 1.0
