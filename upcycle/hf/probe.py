"""What transformers computes for a config, read without any weights: masks, rotary tables, attention, norms.

The model is built from the config on the meta device through transformers' own classes, then run on a short
probe sequence. The parts that decide *how* it computes run for real and are small: rotary tables, the attention
masks transformers builds, every attention module and norm (with seeded stand-in weights, the same for the same
parameter name). The large parts that upcycling copies or replaces are one shared stand-in in every model: the
embedding, the MLP or MoE block, the LM head. Two configs whose ComputeSpecs agree compute the same function
from the same weights. Nothing here reads upcycle's conversion code.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from upcycle.hf.config import UnknownConfigError
from upcycle.hf.config import load_config as _load_config
from upcycle.hf.moe_modules import is_moe_block
from upcycle.hf.skeleton import SkeletonError, decoder_layers, meta_model, rebuild_rotary

PROBE_IMPLEMENTATION = "upcycle_probe"
PROBE_TOKENS = 16  # the functional probe's sequence; longer windows are checked on the mask functions
MASK_HORIZON = 1 << 21  # query positions sampled up to here (2M tokens), and every window of either config
# Arguments that reach the attention call but do not change what it computes at inference.
IGNORED_ATTENTION_KWARGS = {
    "dropout", "position_ids", "cache_position", "output_attentions", "use_cache", "output_router_logits",
    "return_dict", "output_hidden_states", "past_key_values", "past_key_value", "logits_to_keep",
}  # fmt: skip


class ProbeError(Exception):
    """The config cannot be probed: transformers does not know it, or its model has an unknown structure."""


@dataclass
class NormSpec:
    eps: float | None
    outputs: torch.Tensor | None  # the norm applied to fixed inputs of normal and tiny magnitude


@dataclass
class LayerSpec:
    index: int
    attention: dict[str, Any]  # heads, kv_heads, head_dim, scaling, parameter names, other kwargs
    mask_rows: dict[int, tuple[tuple[int, int], ...]]  # query position -> allowed key ranges [start, end)
    norms: dict[str, NormSpec]
    mlp: str  # "dense" or "moe"
    activations: dict[str, torch.Tensor]  # activation name -> its values on a fixed grid

    @property
    def window(self) -> int | None:
        """Keys a late query sees, when fewer than all of them: the sliding window; None for full attention."""
        if not self.mask_rows:  # a layer that mixes tokens without attention (a causal convolution)
            return None
        q, runs = max(self.mask_rows.items())
        seen = sum(end - start for start, end in runs)
        return None if seen >= q + 1 else seen

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.index,
            "attention": "full" if self.window is None else f"sliding {self.window}",
            "heads": self.attention.get("heads"),
            "kv_heads": self.attention.get("kv_heads"),
            "head_dim": self.attention.get("head_dim"),
            "scaling": self.attention.get("scaling"),
            "norm_eps": {name: norm.eps for name, norm in self.norms.items()},
            "mlp": self.mlp,
            "activation": sorted(self.activations),
        }


@dataclass
class ComputeSpec:
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    tie_word_embeddings: bool
    special_tokens: dict[str, Any]
    rope: dict[str, Any]  # rope_parameters as transformers resolved them (for reading, not comparing)
    rotary: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> (cos, sin) per length in rope_lengths
    rope_lengths: list[int]
    final_norms: dict[str, NormSpec]
    layers: list[LayerSpec]
    layer_outputs: list[torch.Tensor] = field(repr=False, default_factory=list)
    logits: torch.Tensor | None = field(repr=False, default=None)
    far_position: int = 0  # where the second probe run starts: past every window and original context
    far_logits: torch.Tensor | None = field(repr=False, default=None)  # None: the class cannot run there


def load_config(config: dict) -> Any:
    try:
        return _load_config(config)
    except UnknownConfigError as error:
        raise ProbeError(str(error)) from None


def compute_spec(
    config: dict,
    windows: set[int] | None = None,
    max_positions: int | None = None,
    rope_lengths: list[int] | None = None,
    far_position: int | None = None,
) -> ComputeSpec:
    """Probe one config; the optional lengths add another config's windows and contexts to the sampled ones, and
    `far_position` sets where the second run starts (default: this config's own far point)."""
    _register_probe()
    cfg = load_config(config)
    try:
        model = meta_model(cfg, PROBE_IMPLEMENTATION)
        layers = decoder_layers(model)
    except SkeletonError as error:
        raise ProbeError(str(error)) from None
    base = model.base_model
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab, hidden = embedding.weight.shape
    tied = head is not None and head.weight is embedding.weight
    all_windows = (windows or set()) | window_fields(cfg)
    horizon = max(max_positions or 0, int(getattr(cfg, "max_position_embeddings", 0) or 0))

    layer_parts = [_split_layer(i, layer) for i, layer in enumerate(layers)]
    model.set_input_embeddings(_ProbeEmbedding(hidden))
    if head is not None:
        model.set_output_embeddings(_ProbeHead(hidden))
    try:
        rotary_names = rebuild_rotary(model)
    except SkeletonError as error:
        raise ProbeError(str(error)) from None
    _materialize(model, _fused_spans(cfg))

    recorder = _Recorder()
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(_keep_output(outputs)) for layer in layers]
    ids = torch.arange(PROBE_TOKENS)[None] % vocab
    try:
        with recorder.active(), torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    except ProbeError:
        raise
    except Exception as error:
        raise ProbeError(
            f"{type(model).__name__} does not run on the probe ({type(error).__name__}: {error})"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    far = far_position if far_position is not None else far_probe_position(cfg, horizon, all_windows)
    far_logits = _run_far(model, ids, far)
    attention_layers = [i for i, parts in enumerate(layer_parts) if parts["attention"]]
    if len(recorder.calls) != len(attention_layers):
        raise ProbeError(
            f"{type(model).__name__} ran attention {len(recorder.calls)} times for {len(attention_layers)} attention "
            "layers"
        )
    calls = dict(zip(attention_layers, recorder.calls, strict=True))

    positions = _mask_positions(all_windows, horizon)
    rope_lengths = sorted(set(rope_lengths or []) | set(rope_probe_lengths(cfg, horizon)))
    specs = []
    rows_by_mask: dict[int, dict[int, tuple[tuple[int, int], ...]]] = {}  # layers of one type share one mask
    for index, parts in enumerate(layer_parts):
        call = calls.get(index, {"mixer": parts["mixer"]})
        mask_rows: dict[int, tuple[tuple[int, int], ...]] = {}
        if index in calls:
            mask_function = call.pop("mask_function")
            if id(mask_function) not in rows_by_mask:
                rows_by_mask[id(mask_function)] = _mask_rows(mask_function, positions)
            mask_rows = rows_by_mask[id(mask_function)]
        specs.append(
            LayerSpec(
                index=index,
                attention=call,
                mask_rows=mask_rows,
                norms={name: _norm_spec(module) for name, module in parts["norms"].items()},
                mlp=parts["mlp_kind"],
                activations=parts["activations"],
            )
        )
    return ComputeSpec(
        model_type=cfg.model_type,
        architecture=type(model).__name__,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        tie_word_embeddings=bool(tied),
        special_tokens={k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        rope=dict(getattr(cfg, "rope_parameters", None) or {}),
        rotary=_rotary_tables(model, rotary_names, rope_lengths),
        rope_lengths=rope_lengths,
        final_norms={name: _norm_spec(module) for name, module in base.named_children() if _is_norm(module)},
        layers=specs,
        layer_outputs=outputs,
        logits=logits[0],
        far_position=far,
        far_logits=far_logits,
    )


def far_probe_position(cfg: Any, horizon: int, windows: set[int]) -> int:
    """A start position past twice the context, every window and the original context of long-context rotary types:
    computations that depend on the position itself (query scaling by position, NoPE switches) show there."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    return 2 * max([horizon, int(original or 0), *windows, PROBE_TOKENS]) + 1


def _run_far(model: nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor | None:
    """The probe's logits with position ids starting at `start` (the mask stays that of a 16-token sequence)."""
    positions = torch.arange(ids.shape[1])[None] + start
    try:
        with _Recorder().active(), torch.no_grad():
            return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    except Exception:  # a class that cannot take such positions: the position-free checks still hold
        return None


# ---- the probe's attention and mask functions, registered with transformers under one name -------------------

_ACTIVE: list[_Recorder] = []


class _Recorder:
    """Collects what each attention call received: shapes, kwargs and the function that built its mask."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.mask_functions: dict[int, Callable] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.remove(self)


def _probe_mask(*args: Any, mask_function: Callable | None = None, **kwargs: Any) -> torch.Tensor:
    """transformers' own sdpa mask, always materialised, remembered with the function that defines it."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(*args, mask_function=mask_function, **kwargs)
    if mask is None:
        raise ProbeError("transformers built no attention mask for the probe")
    if _ACTIVE:
        _ACTIVE[-1].mask_functions[id(mask)] = mask_function
    return mask


def _probe_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Plain softmax attention over the given mask, recording what the module asked for."""
    recorder = _ACTIVE[-1]
    if attention_mask is None or id(attention_mask) not in recorder.mask_functions:
        raise ProbeError(f"{type(module).__name__} attends with a mask transformers' mask functions did not build")
    params = sorted(part for name, _ in module.named_parameters() for part in _unfused_names(name))
    record: dict[str, Any] = {
        "heads": int(query.shape[1]),
        "kv_heads": int(key.shape[1]),
        "head_dim": int(query.shape[-1]),
        "value_dim": int(value.shape[-1]),
        "parameters": params,
        "mask_function": recorder.mask_functions[id(attention_mask)],
    }
    for name, value_ in sorted(kwargs.items()):
        if name in IGNORED_ATTENTION_KWARGS:
            continue
        if isinstance(value_, torch.Tensor):
            record[name] = f"tensor{list(value_.shape)}"
        elif value_ is not None:
            record[name] = value_
    recorder.calls.append(record)
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling")
    )
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register_probe() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _probe_attention)
    AttentionMaskInterface.register(PROBE_IMPLEMENTATION, _probe_mask)
    _REGISTERED = True


# ---- stand-ins for the parts upcycling copies or replaces ----------------------------------------------------


class _ProbeEmbedding(nn.Module):
    """Token vectors computed from the id (no table): small values, so norm epsilons matter."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        j = torch.arange(hidden, dtype=torch.float32)
        self.register_buffer("freq", 0.37 * (j + 1) / hidden + 0.05, persistent=False)
        self.register_buffer("phase", 0.11 * j, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 0.05 * torch.sin(ids[..., None].float() * self.freq + self.phase)


class _ProbeHead(nn.Module):
    """A fixed projection to a few outputs, standing in for the LM head."""

    def __init__(self, hidden: int, outputs: int = 16) -> None:
        super().__init__()
        self.register_buffer("weight", _standin("lm_head.probe", (outputs, hidden)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class _ProbeMLP(nn.Module):
    """The same position-wise function in place of every dense MLP and MoE block."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return 0.5 * torch.tanh(2.0 * x) + 0.25 * x


def _standin(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded values for a parameter name: identical in every model that has a parameter of that name and shape."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{list(shape)}".encode()).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(seed)
    if name.endswith("bias"):
        return torch.randn(shape, generator=generator) * 0.1
    if len(shape) == 1:
        return torch.rand(shape, generator=generator) + 0.5
    fan_in = shape[-1] if shape else 1
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("attn")


def _is_mlp(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    if is_moe_block(module):
        return True
    if "conv" in name:  # a class prefix can say "Moe" (Lfm2MoeShortConv): a convolution mixes tokens
        return False
    return any(word in name for word in ("mlp", "moe", "feedforward", "sparse"))


def _split_layer(index: int, layer: nn.Module) -> dict[str, Any]:
    """Find the token mixer (attention, or a convolution), norms and MLP of a decoder layer; record the MLP, then
    put the stand-in in its place."""
    children = dict(layer.named_children())
    attention = [n for n, m in children.items() if _is_attention(m)]
    norms = {n: m for n, m in children.items() if _is_norm(m)}
    rest = [
        n for n, m in children.items() if n not in attention and n not in norms and any(True for _ in m.parameters())
    ]
    mlps = [n for n in rest if _is_mlp(children[n])] if len(rest) > 1 else rest
    mixers = [n for n in rest if n not in mlps]
    if len(attention) + len(mixers) != 1 or len(mlps) != 1:
        raise ProbeError(
            f"decoder layer {index} ({type(layer).__name__}) does not split into one token mixer (attention or a "
            f"convolution), norms and one MLP (children: {', '.join(children)})"
        )
    mixer_name = (attention or mixers)[0]
    mixer = children[mixer_name]
    norms.update({f"{mixer_name}.{n}": m for n, m in mixer.named_children() if _is_norm(m)})
    mlp = children[mlps[0]]
    kind = "moe" if any(is_moe_block(module) for module in mlp.modules()) else "dense"
    activations = {}
    for module in mlp.modules():
        act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
        if act is not None:
            label = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))
            activations[label] = act(torch.linspace(-8.0, 8.0, 97))
    setattr(layer, mlps[0], _ProbeMLP())
    # what the layers run is compared on the probe's outputs; here, what they hold
    described = sorted(f"{name}{list(p.shape)}" for name, p in mixer.named_parameters())
    return {
        "norms": norms,
        "mlp_kind": kind,
        "activations": activations,
        "attention": bool(attention),
        "mixer": None if attention else described,
    }


# A fused [q; k; v] projection computes what three separate ones do: it is named by its parts, and its stand-in is
# the parts' stand-ins stacked, so a model that fuses them probes the same as one that does not.
FUSED_QKV = ("qkv_proj.weight", ("q_proj.weight", "k_proj.weight", "v_proj.weight"))


def _unfused_names(name: str) -> list[str]:
    fused, parts = FUSED_QKV
    if name.endswith(fused):
        prefix = name[: -len(fused)]
        return [prefix + part for part in parts]
    return [name]


def _fused_spans(cfg: Any) -> list[int]:
    """Rows of q, k and v in a fused projection, from the config."""
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _fused_standin(name: str, shape: tuple[int, ...], spans: list[int]) -> torch.Tensor:
    parts = _unfused_names(name)
    if len(parts) == 1 or sum(spans) != shape[0]:
        return _standin(name, shape)
    return torch.cat([_standin(part, (rows, *shape[1:])) for part, rows in zip(parts, spans, strict=True)])


def _materialize(model: nn.Module, fused_spans: list[int]) -> None:
    """Every parameter left on the meta device gets its stand-in; layers share them by their name in the layer."""
    cache: dict[tuple[str, tuple[int, ...]], nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            full = f"{module_name}.{name}" if module_name else name
            key = (_relative_to_layer(full), tuple(param.shape))
            if key not in cache:
                cache[key] = nn.Parameter(_fused_standin(*key, fused_spans), requires_grad=False)
            module._parameters[name] = cache[key]
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "meta":
                raise ProbeError(f"{module_name}.{name} is a buffer upcycle cannot rebuild from the config")


def _relative_to_layer(name: str) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return name


def _keep_output(outputs: list[torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach().clone())

    return hook


def _norm_spec(module: nn.Module) -> NormSpec:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    outputs = None
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.device.type != "meta":
        x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs = torch.cat([module(x), module(x * 1e-3)])
    return NormSpec(float(eps) if isinstance(eps, (int, float)) else None, outputs)


# ---- sampling masks and rotary tables far beyond the probe sequence ------------------------------------------


def window_fields(cfg: Any) -> set[int]:
    """Every window- or chunk-like length in a config, so the positions around it are sampled."""
    found = set()
    for key, value in cfg.to_dict().items():
        if ("window" in key or "chunk" in key) and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return found


def _mask_positions(windows: set[int], horizon: int) -> list[int]:
    positions = set(range(PROBE_TOKENS))
    top = min(MASK_HORIZON, max(2 * horizon, 2 * PROBE_TOKENS))
    k = 1
    while k <= top:
        positions |= {k - 1, k, k + 1}
        k *= 2
    for w in windows:
        positions |= {w - 1, w, w + 1, 2 * w, 2 * w + 1}
    return sorted(p for p in positions if p >= 0)


def _mask_rows(mask_function: Callable, positions: list[int]) -> dict[int, tuple[tuple[int, int], ...]]:
    """For each query position, the key ranges it may attend to (keys up to one past the query are tested)."""
    zero = torch.tensor(0)
    rows = {}
    for q in positions:
        kv = torch.arange(q + 2)
        allowed = torch.as_tensor(mask_function(zero, zero, torch.tensor(q), kv)).expand(q + 2).to(torch.int8)
        edges = torch.nonzero(torch.diff(allowed, prepend=allowed.new_zeros(1), append=allowed.new_zeros(1)))
        bounds = edges.flatten().tolist()
        rows[q] = tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2))
    return rows


def rope_probe_lengths(cfg: Any, horizon: int) -> list[int]:
    """Sequence lengths at which rotary tables are compared: dynamic and long-context types switch on them."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    lengths = {PROBE_TOKENS, horizon, horizon + 1, 2 * horizon}
    if original:
        lengths |= {int(original), int(original) + 1}
    return sorted(n for n in lengths if n > 0)


def _rotary_tables(model: nn.Module, names: list[str], lengths: list[int]) -> dict[str, list]:
    tables: dict[str, list] = {}
    for name in names:
        module = type(model.get_submodule(name))(getattr(model.get_submodule(name), "config", None) or model.config)
        x = torch.zeros(1, 1, 1)
        rows = []
        for length in lengths:
            positions = sorted(
                {p for p in [0, 1, 2, 3, PROBE_TOKENS - 1] + [2**k - 1 for k in range(40)] if p < length} | {length - 1}
            )
            with torch.no_grad():
                cos, sin = module(x, torch.tensor([positions]))
            rows.append((cos[0].clone(), sin[0].clone()))
        tables[name] = rows
    return tables
