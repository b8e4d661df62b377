"""Running a dense and an MoE model side by side, one decoder layer at a time: the layer calls each model's own
forward makes, its weights read from the safetensors just before it runs, an MoE's experts read one at a time as
the router picks them. The streaming check (`verify.streaming`) compares what the pairs compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from upcycle.convert.finite import non_finite_count
from upcycle.convert.source import DenseSource
from upcycle.convert.targets import Target
from upcycle.hf.skeleton import assigned, decoder_layers, meta_buffers, rebuild_rotary
from upcycle.verify.weights import WeightChecker, same_bits


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


class Pairs:
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
        max_abs, rel = relative(dense_out, moe_out)
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


class PairedLayer(nn.Module):
    """Stands in the dense model's layer list: runs dense layer `index` and its MoE twin on the same input."""

    def __init__(self, index: int, dense_layer: nn.Module, pairs: Pairs) -> None:
        super().__init__()
        self.index = index
        self.dense_layer = dense_layer
        self.pairs = pairs
        if hasattr(dense_layer, "attention_type"):
            self.attention_type = dense_layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.pairs.run(self.index, self.dense_layer, hidden_states, args, kwargs)


class RowEmbedding(nn.Module):
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


def final_norm_name(base: nn.Module) -> str | None:
    """The base model's own norm (after the layers): `norm` in most classes, `embedding_norm` in LFM2."""
    return next((name for name, child in base.named_children() if "norm" in type(child).__name__.lower()), None)


def layer_calls(model: nn.Module, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> list:
    """The arguments the model's own forward gives each decoder layer for these ids (no weights needed)."""
    base = model.base_model
    layers = decoder_layers(model)
    originals = list(layers)
    calls: list[tuple[tuple, dict]] = []
    norm_name = final_norm_name(base)
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


def module_prefix(model: nn.Module, base: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is base)
    return f"{name}." if name else ""


@contextmanager
def tensors_for(
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


def relative(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item()
    scale = a.double().abs().max().item()
    if not math.isfinite(diff):
        return math.inf, math.inf
    return diff, diff / scale if scale else diff
