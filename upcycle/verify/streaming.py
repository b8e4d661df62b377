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
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.source import DenseSource
from upcycle.convert.targets import TARGETS
from upcycle.hf.config import load_config
from upcycle.hf.loading import TORCH_DTYPES
from upcycle.hf.skeleton import (
    SkeletonError,
    decoder_layers,
    meta_model,
    rebuild_rotary,
)
from upcycle.verify.function import Probe, load_text_tokens
from upcycle.verify.layer_pairs import (
    PairedLayer,
    Pairs,
    RowEmbedding,
    StreamedLayer,
    StreamingError,
    final_norm_name,
    layer_calls,
    module_prefix,
    relative,
    tensors_for,
)
from upcycle.verify.weights import CHUNK_BYTES, WeightChecker, tensor_difference


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
    probe: Probe = Probe(),
    device: str | None = None,
    checker: WeightChecker | None = None,
) -> StreamingReport:
    """Run the dense model's forward layer by layer, each MoE layer beside it on the same input.

    With a `checker`, every MoE tensor read here is also checked against its recipe as it is read (and the dense
    tensors already in memory are lent to it), so the weight check reads nothing twice.
    """
    start = time.perf_counter()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = TORCH_DTYPES[probe.dtype]
    target = TARGETS[plan.target]
    dense_model = _skeleton(dense.config)
    moe_model = _skeleton(moe.config, experts_implementation="eager")
    vocab = dense_model.get_input_embeddings().weight.shape[0]
    ids, origin = load_text_tokens(moe.folder, probe.text, probe.tokens, vocab)
    ids = ids[None].to(where)
    moe_calls = layer_calls(moe_model, ids, where, compute)
    pairs = Pairs(dense, moe, dense_model, moe_model, target, moe_calls, where, compute, checker)
    layers = decoder_layers(dense_model)
    for index, layer in enumerate(list(layers)):
        layers[index] = PairedLayer(index, layer, pairs)
    base = dense_model.base_model
    embed_name = f"{module_prefix(dense_model, base)}embed_tokens.weight"
    dense_embedding = RowEmbedding(dense, embed_name, where, compute)
    moe_embed_name = f"{module_prefix(moe_model, moe_model.base_model)}embed_tokens.weight"
    embedding_diff = relative(dense_embedding(ids), RowEmbedding(moe, moe_embed_name, where, compute)(ids))[1]
    dense_model.set_input_embeddings(dense_embedding)
    rebuild_rotary(dense_model, where)
    norm_inputs: list[torch.Tensor] = []
    norm_name = final_norm_name(base)
    norm = getattr(base, norm_name) if norm_name else None
    norm_key = f"{module_prefix(dense_model, base)}{norm_name}"
    hook = (
        norm.register_forward_pre_hook(lambda module, args: norm_inputs.append(args[0])) if norm is not None else None
    )
    try:
        with torch.no_grad(), tensors_for(norm, dense, norm_key, where, compute) as _:
            dense_out = base(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    final_diff = 0.0
    moe_final = dense_out
    moe_norm_name = final_norm_name(moe_model.base_model)
    moe_norm = getattr(moe_model.base_model, moe_norm_name) if moe_norm_name else None
    if moe_norm is not None and norm_inputs:
        with torch.no_grad(), tensors_for(moe_norm, moe, norm_key, where, compute) as _:
            moe_final = moe_norm(norm_inputs[0])
        final_diff = relative(dense_out, moe_final)[1]
    head_diff = _head_deviation(
        dense, _head_name(dense, embed_name), moe, _head_name(moe, moe_embed_name), dense_out, moe_final, compute
    )
    outer = {
        name: _same_outer(dense, moe, name, checker)
        for name in (f"{module_prefix(dense_model, base)}embed_tokens.weight", f"{norm_key}.weight", "lm_head.weight")
        if name in dense.tensors or name in moe.tensors
    }
    return StreamingReport(
        dtype=probe.dtype,
        device=str(where),
        tokens=int(ids.shape[1]),
        text_source=origin,
        window_coverage=probe.window_coverage,
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
            diff, _ = relative(expected, actual)
            worst, scale = max(worst, diff), max(scale, expected.double().abs().max().item())
    if not math.isfinite(worst):
        return math.inf
    return worst / scale if scale else worst


# ---- running the two models side by side ---------------------------------------------------------------------


__all__ = ["StreamedLayer", "StreamingError", "StreamingReport", "check_streaming"]
