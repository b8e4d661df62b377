"""What a dense family is, as data: where its tensors live, the traits targets ask about, and its refusals.

A family module builds one `Family` record. Nothing outside `families/` tests a family's name: targets ask
`DenseModel.traits`, the plan asks `DenseModel.mlp_sources` and `DenseModel.copies`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MLP_PROJECTIONS = ("gate", "up", "down")
LAYERS_PREFIX = "model.layers."


@dataclass(frozen=True)
class SourceRef:
    """One dense tensor, or a block of its rows (a fused projection split on the way)."""

    name: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Traits:
    """How a decoder layer computes, beyond the MLP: what a target class must reproduce to hold the family.

    block: the decoder layer's form ("llama": pre-norm attention then MLP; others name a family's own wiring,
        held only by the MoE class that shares that wiring).
    qkv_bias / o_bias: biases on the q, k, v projections and on the output projection.
    qk_norm: "none", "head" (an RMSNorm over each head, Qwen3-style).
    """

    block: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"

    def describe(self) -> str:
        parts = [f"{self.block} decoder layers"]
        if self.qkv_bias or self.o_bias:
            parts.append("biases on " + ("q/k/v/o" if self.o_bias else "q/k/v"))
        if self.qk_norm != "none":
            parts.append(f"q/k norms ({self.qk_norm})")
        return ", ".join(parts)


def llama_traits(resolved: dict, **traits: str) -> Traits:
    """Llama's attention (and its descendants'): attention_bias puts biases on q, k, v and o alike."""
    bias = bool(resolved.get("attention_bias"))
    return Traits(qkv_bias=bias, o_bias=bias, **traits)


@dataclass(frozen=True)
class MlpLayout:
    """Where a layer's dense MLP lives (names relative to the layer); `gate_up` names a fused [gate; up] tensor."""

    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    down: str = "mlp.down_proj.weight"
    gate_up: str | None = None


Refusal = Callable[["DenseModel"], "str | None"]
WindowRule = Callable[[dict, int], "tuple[int | None, ...]"]


def no_windows(resolved: dict, num_layers: int) -> tuple[int | None, ...]:
    return (None,) * num_layers


def every_layer_window(resolved: dict, num_layers: int) -> tuple[int | None, ...]:
    """Mistral's rule: config.sliding_window on every layer (None: full attention)."""
    return (resolved.get("sliding_window"),) * num_layers


def layer_types_windows(resolved: dict, num_layers: int) -> tuple[int | None, ...]:
    """The v5 rule: the resolved layer_types name the sliding layers (configs derive them from older fields)."""
    window = resolved.get("sliding_window")
    types = list(resolved.get("layer_types") or ["full_attention"] * num_layers)
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" and window else None for t in types)


@dataclass(frozen=True)
class Family:
    """One dense decoder family: its tensors, traits, refusals and exact homes (native MoE targets)."""

    model_type: str
    title: str
    example: str  # a public checkpoint of the family
    targets: tuple[str, ...]  # the target classes that can hold it, preferred first
    traits: Callable[[dict], Traits] = lambda resolved: Traits()
    mlp: MlpLayout = MlpLayout()
    fused_qkv: str | None = None  # one [q; k; v] projection relative to the layer, split on the way
    windows: WindowRule = no_windows
    refusals: tuple[Refusal, ...] = ()
    refused_configs: tuple[str, ...] = ()  # what `refusals` refuse, in words, for `upcycle families`
    rope: Callable[[dict], dict] = lambda parameters: parameters  # drops fields proven to be no-ops
    layer_kinds: frozenset[str] = frozenset({"full_attention", "sliding_attention"})  # layer_types it may hold
    # Hub checkpoints of some families name tensors differently from transformers' classes, which rename them on
    # load: (regex, replacement) pairs, applied in order, from the stored names to the class's names.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    min_transformers: str = ""  # the first transformers release with the family's class, when later than 5.17


@dataclass(frozen=True)
class DenseModel:
    """The facts about a dense source that conversion needs, as transformers reads its config.json.

    `resolved` holds every field the source class would default (Llama's rms_norm_eps 1e-6, Qwen3's head_dim 128,
    Mistral's window 4096), so a field absent from config.json never falls back to the target class's default.
    """

    spec: Family
    config: dict  # config.json as found
    resolved: dict  # config.json as transformers reads it, defaults filled in
    traits: Traits
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...]  # the attention window of each layer, None for full attention
    expected: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)  # what the class saves

    @property
    def family(self) -> str:
        return self.spec.model_type

    @property
    def title(self) -> str:
        return self.spec.title

    def layer_prefix(self, layer: int) -> str:
        return f"{LAYERS_PREFIX}{layer}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a tensor belongs to, or None for embeddings, the final norm and the head."""
        if not name.startswith(LAYERS_PREFIX):
            return None
        index = name[len(LAYERS_PREFIX) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def mlp_sources(self, layer: int) -> dict[str, SourceRef]:
        """gate, up and down of a layer's dense MLP, as [F, H], [F, H] and [H, F] blocks of source tensors."""
        prefix, mlp = self.layer_prefix(layer), self.spec.mlp
        if mlp.gate_up is not None:
            inter = self.intermediate_size
            fused = prefix + mlp.gate_up
            return {
                "gate": SourceRef(fused, (0, inter)),
                "up": SourceRef(fused, (inter, 2 * inter)),
                "down": SourceRef(prefix + mlp.down),
            }
        return {p: SourceRef(prefix + getattr(mlp, p)) for p in MLP_PROJECTIONS}

    def mlp_tensor_names(self) -> set[str]:
        return {ref.name for i in range(self.num_layers) for ref in self.mlp_sources(i).values()}

    def copies(self, name: str) -> list[tuple[str, SourceRef]]:
        """The output tensors a non-MLP source tensor becomes (itself, or the q/k/v blocks of a fused one)."""
        layer = self.layer_of(name)
        if layer is None or self.spec.fused_qkv is None or name != self.layer_prefix(layer) + self.spec.fused_qkv:
            return [(name, SourceRef(name))]
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = name.rsplit(".", 2)[0]  # model.layers.i.self_attn
        spans = {
            "q_proj": (0, q_out),
            "k_proj": (q_out, q_out + kv_out),
            "v_proj": (q_out + kv_out, q_out + 2 * kv_out),
        }
        return [(f"{attention}.{part}.weight", SourceRef(name, rows)) for part, rows in spans.items()]

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
        parameters = self.resolved.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
        return self.spec.rope(dict(parameters))
