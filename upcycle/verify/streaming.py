"""The layer-streaming function check: the whole model checked in the memory of about one layer.

Both models are transformers' own classes built on the meta device from their config.json, so the code that
runs is the code users run. Real text goes through the dense model's own forward: its embedding rows are read for
the tokens used (never the whole table), and each decoder layer is given its weights from the safetensors just
before it runs and loses them right after. The MoE layer of the same index then runs on the same input hidden
states, with the attention mask and rotary tables the MoE model's own forward builds, its experts read one at a
time as the router picks them (transformers' eager experts loop). The two outputs are compared and the dense
output is carried forward. Attention and norm tensors are compared byte for byte as they are read; the
embedding, final norm and LM head are compared in chunks. The embedding rows of the tokens used and the LM head
(its logits on the final hidden states, in chunks of rows) are also run from both checkpoints, so a rounded
embedding or head counts in the deviation as it does in the whole-model check.

What this proves: every layer computes the same function on the inputs real text produces (within tolerance),
the shared tensors are identical, and (from the config check) the MoE config makes transformers compute every
layer as the dense config does. Together with the weight check, the whole model is proven without ever holding
it: peak memory is one dense layer, or the MoE layer's shared part plus one expert, in the compute dtype.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from upcycle.convert.finite import non_finite_count
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.source import DenseSource
from upcycle.convert.targets import TARGETS, Target
from upcycle.hf.config import load_config
from upcycle.hf.skeleton import (
    SkeletonError,
    assigned,
    decoder_layers,
    meta_buffers,
    meta_model,
    rebuild_rotary,
)
from upcycle.verify.function import TORCH_DTYPES, load_text_tokens
from upcycle.verify.weights import CHUNK_BYTES, WeightChecker, same_bits, tensor_difference


class StreamingError(Exception):
    """The checkpoints cannot be streamed layer by layer (a tensor is missing, or a module is unknown)."""


@dataclass
class StreamedLayer:
    layer: int
    mlp: str  # "moe" or "dense": the MoE model's block at this layer
    max_abs_diff: float
    rel_diff: float  # max |dense - moe| / max |dense| of the layer's output, on the same input
    shared_identical: int  # attention and norm tensors byte-identical in both checkpoints
    shared_differing: list[str] = field(default_factory=list)
    non_finite: dict[str, int] = field(default_factory=dict)  # NaN/inf values in the dense and MoE outputs


@dataclass
class StreamingReport:
    dtype: str
    device: str
    tokens: int
    text_source: str
    window_coverage: str
    layers: list[StreamedLayer]
    final_norm_rel_diff: float
    embedding_rel_diff: float  # the MoE's embedding rows vs the dense model's, for the tokens used
    lm_head_rel_diff: float  # the MoE's LM head vs the dense one on the same final hidden states (logits)
    outer_tensors: dict[str, bool]  # embedding, final norm, LM head: identical in both checkpoints
    seconds: float

    @property
    def rel_diff(self) -> float:
        outer = [self.final_norm_rel_diff, self.embedding_rel_diff, self.lm_head_rel_diff]
        return max([layer.rel_diff for layer in self.layers] + outer)

    @property
    def shared_differing(self) -> list[str]:
        differing = [name for layer in self.layers for name in layer.shared_differing]
        return differing + [name for name, same in self.outer_tensors.items() if not same]

    def first_divergent_layer(self, tol: float) -> int | None:
        return next((layer.layer for layer in self.layers if layer.rel_diff > tol), None)

    @property
    def non_finite(self) -> dict[str, int]:
        """NaN/inf values in the layer outputs, per model, summed over layers."""
        totals: dict[str, int] = {}
        for layer in self.layers:
            for where, count in layer.non_finite.items():
                totals[where] = totals.get(where, 0) + count
        return totals


def check_streaming(
    dense: DenseSource,
    moe: DenseSource,
    plan: UpcyclePlan,
    dtype: str = "float32",
    text: str | None = None,
    tokens: int = 256,
    window_coverage: str = "",
    device: str | None = None,
    checker: WeightChecker | None = None,
) -> StreamingReport:
    """Run the dense model's forward layer by layer, each MoE layer beside it on the same input.

    With a `checker`, every MoE tensor read here is also checked against its recipe as it is read (and the dense
    tensors already in memory are lent to it), so the weight check reads nothing twice.
    """
    start = time.perf_counter()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = TORCH_DTYPES[dtype]
    target = TARGETS[plan.target]
    dense_model = _skeleton(dense.config)
    moe_model = _skeleton(moe.config, experts_implementation="eager")
    vocab = dense_model.get_input_embeddings().weight.shape[0]
    ids, origin = load_text_tokens(moe.folder, text, tokens, vocab)
    ids = ids[None].to(where)
    moe_calls = _layer_calls(moe_model, ids, where, compute)
    pairs = _Pairs(dense, moe, dense_model, moe_model, target, moe_calls, where, compute, checker)
    layers = decoder_layers(dense_model)
    for index, layer in enumerate(list(layers)):
        layers[index] = _PairedLayer(index, layer, pairs)
    base = dense_model.base_model
    embed_name = f"{_prefix(dense_model, base)}embed_tokens.weight"
    dense_embedding = _RowEmbedding(dense, embed_name, where, compute)
    moe_embed_name = f"{_prefix(moe_model, moe_model.base_model)}embed_tokens.weight"
    embedding_diff = _relative(dense_embedding(ids), _RowEmbedding(moe, moe_embed_name, where, compute)(ids))[1]
    dense_model.set_input_embeddings(dense_embedding)
    rebuild_rotary(dense_model, where)
    norm_inputs: list[torch.Tensor] = []
    norm_name = _final_norm_name(base)
    norm = getattr(base, norm_name) if norm_name else None
    norm_key = f"{_prefix(dense_model, base)}{norm_name}"
    hook = (
        norm.register_forward_pre_hook(lambda module, args: norm_inputs.append(args[0])) if norm is not None else None
    )
    try:
        with torch.no_grad(), _tensors_for(norm, dense, norm_key, where, compute) as _:
            dense_out = base(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    final_diff = 0.0
    moe_final = dense_out
    moe_norm_name = _final_norm_name(moe_model.base_model)
    moe_norm = getattr(moe_model.base_model, moe_norm_name) if moe_norm_name else None
    if moe_norm is not None and norm_inputs:
        with torch.no_grad(), _tensors_for(moe_norm, moe, norm_key, where, compute) as _:
            moe_final = moe_norm(norm_inputs[0])
        final_diff = _relative(dense_out, moe_final)[1]
    head_diff = _head_deviation(
        dense, _head_name(dense, embed_name), moe, _head_name(moe, moe_embed_name), dense_out, moe_final, compute
    )
    outer = {
        name: _same_outer(dense, moe, name, checker)
        for name in (f"{_prefix(dense_model, base)}embed_tokens.weight", f"{norm_key}.weight", "lm_head.weight")
        if name in dense.tensors or name in moe.tensors
    }
    return StreamingReport(
        dtype=dtype,
        device=str(where),
        tokens=int(ids.shape[1]),
        text_source=origin,
        window_coverage=window_coverage,
        layers=pairs.results,
        final_norm_rel_diff=final_diff,
        embedding_rel_diff=embedding_diff,
        lm_head_rel_diff=head_diff,
        outer_tensors=outer,
        seconds=time.perf_counter() - start,
    )


def _skeleton(config: dict, experts_implementation: str | None = None) -> nn.Module:
    """The meta model with sdpa attention, or eager for classes without it (attention sinks, for one)."""
    try:
        return meta_model(load_config(config), "sdpa", experts_implementation)
    except SkeletonError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
        return meta_model(load_config(config), "eager", experts_implementation)


def _same_outer(dense: DenseSource, moe: DenseSource, name: str, checker: WeightChecker | None) -> bool:
    """A tensor outside the layers (embedding, final norm, LM head) is identical in both checkpoints."""
    if name not in dense.tensors or name not in moe.tensors:
        return False
    if checker is not None and name in checker.planned:  # the weight check compares the same bytes: once is enough
        return checker.check(name)
    return tensor_difference(dense, name, moe, name, moe.tensors[name].dtype) is None


def _head_name(source: DenseSource, embed_name: str) -> str:
    """The tensor transformers multiplies the final hidden states with: the embedding when the config ties them."""
    config = load_config(source.config)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    return embed_name if tied or "lm_head.weight" not in source.tensors else "lm_head.weight"


def _head_deviation(
    dense: DenseSource,
    dense_name: str,
    moe: DenseSource,
    moe_name: str,
    dense_hidden: torch.Tensor,
    moe_hidden: torch.Tensor,
    compute: torch.dtype,
) -> float:
    """Max |dense - MoE| / max |dense| over the logits of both LM heads, computed a chunk of vocabulary rows at a
    time so the head never sits whole in memory (softcapping and logit scales come after: not counted)."""
    if dense_name not in dense.tensors or moe_name not in moe.tensors:
        return math.inf
    info = dense.tensors[dense_name]
    if moe.tensors[moe_name].shape != info.shape:
        return math.inf
    rows = info.shape[0]
    step = max(1, CHUNK_BYTES // max(1, info.nbytes // max(rows, 1)))
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for begin in range(0, rows, step):
            device = dense_hidden.device
            expected = dense_hidden @ dense.read_rows(dense_name, begin, begin + step).to(device, compute).T
            actual = moe_hidden @ moe.read_rows(moe_name, begin, begin + step).to(device, compute).T
            diff, _ = _relative(expected, actual)
            worst, scale = max(worst, diff), max(scale, expected.double().abs().max().item())
    if not math.isfinite(worst):
        return math.inf
    return worst / scale if scale else worst


# ---- running the two models side by side ---------------------------------------------------------------------


class _Pairs:
    """Reads each layer's tensors from both checkpoints and runs the MoE layer beside the dense one."""

    def __init__(
        self,
        dense: DenseSource,
        moe: DenseSource,
        dense_model: nn.Module,
        moe_model: nn.Module,
        target: Target,
        moe_calls: list[tuple[tuple, dict]],
        device: torch.device,
        compute: torch.dtype,
        checker: WeightChecker | None,
    ) -> None:
        self.dense, self.moe, self.target = dense, moe, target
        self.checker = checker
        self.read_moe = checker.read_checked if checker is not None else moe.read
        self.moe_layers = decoder_layers(moe_model)
        self.dense_prefix = _layers_prefix(dense_model)
        self.moe_prefix = _layers_prefix(moe_model)
        self.moe_calls = moe_calls
        self.device, self.compute = device, compute
        self.results: list[StreamedLayer] = []

    def run(self, index: int, dense_layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        dense_prefix = f"{self.dense_prefix}{index}."
        dense_raw = self._read(self.dense.read, dense_layer, dense_prefix, {}, lambda name: name)
        if self.checker is not None:  # the experts are re-made from these, not from a second read
            self.checker.lend_dense({dense_prefix + name: tensor for name, tensor in dense_raw.items()})
        with assigned(dense_layer, self._cast(dense_raw)):
            output = dense_layer(hidden, *args, **kwargs)
        dense_out = output[0] if isinstance(output, tuple) else output
        moe_layer = self.moe_layers[index]
        block = _moe_block_name(moe_layer)
        renames = {block: self.target.moe_prefix} if block is not None else {}
        moe_raw = self._read(
            self.read_moe, moe_layer, f"{self.moe_prefix}{index}.", renames, self.target.checkpoint_name
        )
        shared = [n for n in moe_raw if n in dense_raw and not n.startswith(f"{block}.")]
        differing = [
            f"layer {index} {n}" for n in shared if not same_bits(dense_raw[n].to(moe_raw[n].dtype), moe_raw[n])
        ]
        del dense_raw
        recorded_args, recorded_kwargs = self.moe_calls[index]
        with assigned(moe_layer, self._cast(moe_raw)), self._experts(moe_layer, index):
            moe_output = moe_layer(hidden, *recorded_args[1:], **recorded_kwargs)
        if self.checker is not None:  # the layer's tensors no token used (idle experts), while its dense ones are lent
            for name in self.checker.layer_names(index):
                self.checker.check(name)
            self.checker.lend_dense({})
        moe_out = moe_output[0] if isinstance(moe_output, tuple) else moe_output
        max_abs, rel = _relative(dense_out, moe_out)
        kind = "moe" if block is not None else "dense"
        counts = {"dense layer outputs": non_finite_count(dense_out), "moe layer outputs": non_finite_count(moe_out)}
        nonzero = {where: count for where, count in counts.items() if count}
        self.results.append(StreamedLayer(index, kind, max_abs, rel, len(shared) - len(differing), differing, nonzero))
        return output

    def _read(
        self,
        read: Callable[[str], torch.Tensor],
        module: nn.Module,
        prefix: str,
        renames: dict,
        on_disk: Callable[[str], str],
    ) -> dict:
        """The module's parameters (experts excluded) as stored, keyed by their name in the module."""
        tensors = {}
        for name in [n for n, _ in module.named_parameters()] + meta_buffers(module):
            if _is_expert_weight(module, name):
                continue
            head, _, tail = name.partition(".")
            key = prefix + on_disk(f"{renames[head]}.{tail}" if head in renames else name)
            try:
                tensors[name] = read(key)
            except KeyError:
                raise StreamingError(
                    f"the checkpoint has no tensor {key!r} for {type(module).__name__}.{name}"
                ) from None
        return tensors

    def _cast(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.device, self.compute) for name, tensor in raw.items()}

    @contextmanager
    def _experts(self, layer: nn.Module, index: int) -> Iterator[None]:
        """The layer's experts read one at a time from the per-expert tensors, as transformers' eager loop asks."""

        def read(expert: int, projection: str) -> torch.Tensor:
            if self.target.stacked_experts:
                return self._stacked_expert(index, expert, projection)
            key = self.target.expert_key(index, expert, projection)
            if key not in self.moe.tensors:
                raise StreamingError(f"{self.moe.folder} has no tensor {key!r} for expert {expert} of layer {index}")
            return self.read_moe(key)

        with _streamed_experts(layer, read, self.device, self.compute):
            yield

    def _stacked_expert(self, index: int, expert: int, projection: str) -> torch.Tensor:
        """Expert `expert`'s rows of a stacked tensor (a positioned read of that expert only)."""
        key = self.target.stacked_key(index, "down" if projection == "down" else "gate_up")
        if key not in self.moe.tensors:
            raise StreamingError(f"{self.moe.folder} has no tensor {key!r} for the experts of layer {index}")
        block = self.moe.read_rows(key, expert, expert + 1)[0]
        if projection == "down":
            return block
        half = block.shape[0] // 2
        return block[:half] if projection == "gate" else block[half:]


class _PairedLayer(nn.Module):
    """Stands in the dense model's layer list: runs dense layer `index` and its MoE twin on the same input."""

    def __init__(self, index: int, dense_layer: nn.Module, pairs: _Pairs) -> None:
        super().__init__()
        self.index = index
        self.dense_layer = dense_layer
        self.pairs = pairs
        if hasattr(dense_layer, "attention_type"):
            self.attention_type = dense_layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.pairs.run(self.index, self.dense_layer, hidden_states, args, kwargs)


class _RowEmbedding(nn.Module):
    """The embedding lookup with only the rows of the tokens used read from the checkpoint."""

    def __init__(self, source: DenseSource, name: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        if name not in source.tensors:
            raise StreamingError(f"{source.folder} has no embedding tensor {name!r}")
        self.source, self.name, self.device, self.dtype = source, name, device, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = torch.stack([self.source.read_rows(self.name, int(i), int(i) + 1)[0] for i in unique])
        return rows.to(self.device, self.dtype)[inverse.to(self.device)]


class _ZeroEmbedding(nn.Module):
    def __init__(self, hidden: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden, self.device, self.dtype = hidden, device, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden, device=self.device, dtype=self.dtype)


class _CallRecorder(nn.Module):
    """Stands in a decoder layer to record what the model's forward passes it (masks, rotary tables)."""

    def __init__(self, layer: nn.Module, calls: list[tuple[tuple, dict]]) -> None:
        super().__init__()
        self.calls = calls
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(((hidden_states, *args), kwargs))
        return hidden_states


def _final_norm_name(base: nn.Module) -> str | None:
    """The base model's own norm (after the layers): `norm` in most classes, `embedding_norm` in LFM2."""
    return next((name for name, child in base.named_children() if "norm" in type(child).__name__.lower()), None)


def _layer_calls(model: nn.Module, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> list:
    """The arguments the model's own forward gives each decoder layer for these ids (no weights needed)."""
    base = model.base_model
    layers = decoder_layers(model)
    originals = list(layers)
    calls: list[tuple[tuple, dict]] = []
    norm_name = _final_norm_name(base)
    embedding, norm = model.get_input_embeddings(), getattr(base, norm_name) if norm_name else None
    hidden = embedding.weight.shape[1]
    model.set_input_embeddings(_ZeroEmbedding(hidden, device, dtype))
    if norm_name:
        setattr(base, norm_name, nn.Identity())
    rebuild_rotary(model, device)
    try:
        for index, layer in enumerate(originals):
            layers[index] = _CallRecorder(layer, calls)
        with torch.no_grad():
            base(input_ids=ids, use_cache=False)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
        model.set_input_embeddings(embedding)
        if norm_name:
            setattr(base, norm_name, norm)
    if len(calls) != len(originals):
        raise StreamingError(f"{type(model).__name__} called {len(calls)} of its {len(originals)} layers")
    return calls


@contextmanager
def _streamed_experts(
    layer: nn.Module, read: Callable[[int, str], torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Iterator[None]:
    """Swap each experts module's stacked weights for views that read expert e when indexed with e."""

    def gate_up(expert: int) -> torch.Tensor:  # [gate; up] rows, converted straight into one buffer
        gate, up = read(expert, "gate"), read(expert, "up")
        out = torch.empty(gate.shape[0] + up.shape[0], *gate.shape[1:], device=device, dtype=dtype)
        out[: gate.shape[0]].copy_(gate)
        out[gate.shape[0] :].copy_(up)
        return out

    swapped = []
    for module in layer.modules():
        if not _has_stacked_experts(module):
            continue
        if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
            raise StreamingError(f"{type(module).__name__} stores its experts in a layout upcycle does not stream")
        saved = (module._parameters.pop("gate_up_proj"), module._parameters.pop("down_proj"))
        module.__dict__["gate_up_proj"] = _ExpertReader(gate_up)
        module.__dict__["down_proj"] = _ExpertReader(lambda e: read(e, "down").to(device, dtype))
        swapped.append((module, saved))
    try:
        yield
    finally:
        for module, (gate_up, down) in swapped:
            del module.__dict__["gate_up_proj"], module.__dict__["down_proj"]
            module._parameters["gate_up_proj"], module._parameters["down_proj"] = gate_up, down


class _ExpertReader:
    """`weights[e]` reads expert e's weights when asked, so only the experts a batch uses are ever in memory."""

    def __init__(self, read: Callable[[int], torch.Tensor]) -> None:
        self.read = read

    def __getitem__(self, expert: Any) -> torch.Tensor:
        return self.read(int(expert))


def _has_stacked_experts(module: nn.Module) -> bool:
    gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    return gate_up is not None and down is not None and gate_up.dim() == 3


def _is_expert_weight(layer: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    owner = layer.get_submodule(owner_name) if owner_name else layer
    return attr in ("gate_up_proj", "down_proj") and _has_stacked_experts(owner)


def _moe_block_name(layer: nn.Module) -> str | None:
    """The decoder layer's child that holds the experts (its MoE block), or None for a dense layer."""
    for name, child in layer.named_children():
        if any(_has_stacked_experts(m) for m in child.modules()):
            return name
    return None


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _prefix(model: nn.Module, base: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is base)
    return f"{name}." if name else ""


@contextmanager
def _tensors_for(
    module: nn.Module | None, source: DenseSource, prefix: str, device: torch.device, dtype: torch.dtype
) -> Iterator[None]:
    if module is None:
        yield
        return
    tensors = {}
    for name, _ in module.named_parameters():
        key = f"{prefix}.{name}"
        if key not in source.tensors:
            raise StreamingError(f"{source.folder} has no tensor {key!r}")
        tensors[name] = source.read(key).to(device, dtype)
    with assigned(module, tensors):
        yield


def _relative(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item()
    scale = a.double().abs().max().item()
    if not math.isfinite(diff):
        return math.inf, math.inf
    return diff, diff / scale if scale else diff


__all__ = ["StreamedLayer", "StreamingError", "StreamingReport", "check_streaming"]
