"""The function check: both models through plain transformers on real text; logits, KL, top-1 and every layer.

The text is long enough to see every attention window: at least twice the smallest window when that is at most
WINDOW_CHECK_LIMIT tokens (longer windows are carried by the config check, which samples masks at any position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.convert.text_tokens import tokenize_text
from upcycle.hf.loading import TORCH_DTYPES

# Relative logits tolerance an exact method must meet in each compute dtype; fp32 (the default, whatever the
# storage dtype) is the sharp check. In bf16/fp16, what correct upcycles measure (benchmarks/verify_precision.py,
# benchmarks/RESULTS.md) depends on the class: Mixtral combines the experts with fp32 routing weights and measures
# 0, so one unit in the last place is allowed; classes that round the routing weights to the compute dtype
# measure up to 8.9e-3 on tiny models and 2.0e-2 on SmolLM2 (Qwen2-MoE, 6 MoE layers) in bf16, and 1.3e-3 in
# fp16, on correct upcycles, so errors below a few % cannot be told apart there: use fp32 for those.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 4e-3, "float16": 5e-4}
ROUNDED_ROUTING_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}


def tolerance_for(dtype: str, rounds_routing_weights: bool) -> float:
    """The default tolerance for a compute dtype and a target class."""
    if rounds_routing_weights and dtype in ROUNDED_ROUTING_TOLERANCE:
        return ROUNDED_ROUTING_TOLERANCE[dtype]
    return TOLERANCE[dtype]


WINDOW_CHECK_LIMIT = 4096


def load_dtype(compute: str) -> torch.dtype:
    """The dtype both models load in before casting to the compute dtype: one that holds every stored value exactly
    (bf16, fp16 and fp32 all fit in fp32), so the dense model is compared as stored, never rounded to the MoE's."""
    return torch.float64 if compute == "float64" else torch.float32


@dataclass
class LayerDiff:
    layer: int  # 0 = embeddings, i = after decoder layer i
    max_abs_diff: float
    rel_diff: float


@dataclass
class FunctionReport:
    dtype: str
    tokens: int
    text_source: str
    window_coverage: str  # how the length relates to the attention windows
    logits_max_abs_diff: float
    logits_rel_diff: float
    mean_kl: float
    top1_agreement: float
    layers: list[LayerDiff]
    loading_problems: list[str]
    non_finite: dict[str, int]  # NaN/inf values in each model's logits and hidden states (never equivalent)

    def first_divergent_layer(self, tol: float) -> int | None:
        return next((d.layer for d in self.layers if d.rel_diff > tol), None)


@dataclass(frozen=True)
class Probe:
    """What a function check runs: which text (None: held-out Shakespeare), how many tokens of it and why that
    many, and the dtype both models compute in."""

    dtype: str = "float32"
    text: str | None = None
    tokens: int = 256
    window_coverage: str = "no attention window"


def probe_for(smallest_window: int | None, min_tokens: int, dtype: str = "float32", text: str | None = None) -> Probe:
    """The probe that sees every attention window: at least `min_tokens`, and twice the smallest window when that
    is at most WINDOW_CHECK_LIMIT."""
    if smallest_window is None:
        return Probe(dtype, text, min_tokens)
    if smallest_window <= WINDOW_CHECK_LIMIT:
        tokens = max(min_tokens, 2 * smallest_window + 1)
        return Probe(
            dtype, text, tokens, f"{tokens} tokens cover 2 x the smallest attention window ({smallest_window})"
        )
    return Probe(dtype, text, min_tokens, (
        f"the smallest attention window ({smallest_window}) is longer than {WINDOW_CHECK_LIMIT} tokens: the config "
        "check carries it (masks sampled at every position that matters)"
    ))  # fmt: skip


def load_text_tokens(moe_folder: Path, text: str | None, tokens: int, vocab_size: int) -> tuple[torch.Tensor, str]:
    """One sequence of exactly `tokens` ids of real text (repeated when short): the checkpoint's tokenizer when it
    has one, else the text's UTF-8 bytes."""
    from upcycle import assets

    if text is not None:
        origin = "--text"
    else:
        try:
            text, origin = assets.sample_text(max(2000, 8 * tokens)), "held-out Shakespeare"
        except Exception:  # offline or not cached: the built-in prompts still exercise the model
            text, origin = "\n".join(assets.SAMPLE_PROMPTS), "built-in prompts"
    ids, note = tokenize_text(moe_folder, text, tokens, vocab_size)
    return ids, origin + note


def check_function(
    dense_folder: Path,
    moe_folder: Path,
    probe: Probe = Probe(),
    trust_remote_code: bool = False,
) -> FunctionReport:
    """Run both models with plain transformers and compare logits and every layer's hidden state.

    Each model is loaded as stored (every value exact), then computes in the probe's dtype: a bf16 MoE of an fp32
    dense model is compared with the fp32 dense model, so a rounding the conversion made is measured, not hidden.
    """
    from upcycle.hf.loading import load_causal_lm, load_causal_lm_strict

    torch_dtype = TORCH_DTYPES[probe.dtype]
    loaded = load_dtype(probe.dtype)
    dense = load_causal_lm_strict(dense_folder, loaded, trust_remote_code)
    moe, problems = load_causal_lm(moe_folder, loaded)
    dense, moe = dense.to(torch_dtype).eval(), moe.to(torch_dtype).eval()
    ids, origin = load_text_tokens(moe_folder, probe.text, probe.tokens, dense.config.vocab_size)
    with torch.no_grad():
        a = dense(ids[None], output_hidden_states=True)
        b = moe(ids[None], output_hidden_states=True)
    la, lb = a.logits[0].double(), b.logits[0].double()
    non_finite = {
        f"{model} {what}": int(sum((~torch.isfinite(t)).sum().item() for t in tensors))
        for model, out in (("dense", a), ("moe", b))
        for what, tensors in (("logits", [out.logits]), ("hidden states", out.hidden_states))
    }
    max_abs = finite_or_inf((la - lb).abs().max().item())
    scale = la.abs().max().item()
    logp, logq = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()
    agree = (la.argmax(-1) == lb.argmax(-1)).double().mean().item()
    layers = []
    for i, (ha, hb) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        diff = finite_or_inf((ha.double() - hb.double()).abs().max().item())
        size = ha.double().abs().max().item()
        layers.append(LayerDiff(i, diff, diff / size if size else diff))
    return FunctionReport(
        probe.dtype,
        len(ids),
        origin,
        probe.window_coverage,
        max_abs,
        finite_or_inf(max_abs / scale) if scale else max_abs,
        kl,
        agree,
        layers,
        problems,
        {where: count for where, count in non_finite.items() if count},
    )


def finite_or_inf(value: float) -> float:
    """A difference that is NaN (NaN - x) counts as infinitely large: NaN compares False with any tolerance."""
    return value if not math.isnan(value) else math.inf
