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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from upcycle.hf.config import UnknownConfigError
from upcycle.hf.config import load_config as _load_config
from upcycle.hf.moe_modules import is_moe_block
from upcycle.hf.probe_attention import (
    PROBE_IMPLEMENTATION,
    PROBE_TOKENS,
    ProbeError,
    Recorder,
    mask_positions,
    register_probe,
    rope_probe_lengths,
    rotary_tables,
    sample_mask_rows,
    unfused_names,
    window_fields,
)
from upcycle.hf.skeleton import SkeletonError, decoder_layers, meta_model, rebuild_rotary


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
    register_probe()
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

    recorder = Recorder()
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

    positions = mask_positions(all_windows, horizon)
    rope_lengths = sorted(set(rope_lengths or []) | set(rope_probe_lengths(cfg, horizon)))
    specs = []
    rows_by_mask: dict[int, dict[int, tuple[tuple[int, int], ...]]] = {}  # layers of one type share one mask
    for index, parts in enumerate(layer_parts):
        call = calls.get(index, {"mixer": parts["mixer"]})
        mask_rows: dict[int, tuple[tuple[int, int], ...]] = {}
        if index in calls:
            mask_function = call.pop("mask_function")
            if id(mask_function) not in rows_by_mask:
                rows_by_mask[id(mask_function)] = sample_mask_rows(mask_function, positions)
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
        rotary=rotary_tables(model, rotary_names, rope_lengths),
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
        with Recorder().active(), torch.no_grad():
            return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    except Exception:  # a class that cannot take such positions: the position-free checks still hold
        return None


# ---- the probe's attention and mask functions, registered with transformers under one name -------------------


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


def _fused_spans(cfg: Any) -> list[int]:
    """Rows of q, k and v in a fused projection, from the config."""
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _fused_standin(name: str, shape: tuple[int, ...], spans: list[int]) -> torch.Tensor:
    parts = unfused_names(name)
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
