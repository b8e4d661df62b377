"""Proving that an upcycled checkpoint equals its dense source, or measuring how far an approximate one is.

Two levels: the weights (each MoE tensor is re-made from the dense model with the recipe recorded in
upcycle.json and must match bit for bit), and the function (both models run through plain transformers on
real text; logits, KL, top-1 agreement and the hidden state after every layer are compared).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.source import DenseSource, hash_files
from upcycle.errors import SourceError

# Relative logits tolerance that an exact method must meet in each compute dtype.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2, "float16": 5e-3}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class WeightMismatch:
    tensor: str
    problem: str
    max_abs_diff: float = math.nan


@dataclass
class WeightReport:
    tensors_checked: int = 0
    mismatches: list[WeightMismatch] = field(default_factory=list)
    source_matches_provenance: bool = True

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.source_matches_provenance


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
    logits_max_abs_diff: float
    logits_rel_diff: float
    mean_kl: float
    top1_agreement: float
    layers: list[LayerDiff]
    loading_problems: list[str]

    def first_divergent_layer(self, tol: float) -> int | None:
        return next((d.layer for d in self.layers if d.rel_diff > tol), None)


@dataclass
class VerifyReport:
    dense: str
    moe: str
    method: str
    exact_by_design: bool
    notes: list[str]
    tolerance: float
    tolerance_explicit: bool
    weights: WeightReport | None
    function: FunctionReport | None
    equivalent: bool
    verdict: str

    def to_json(self) -> dict:
        return asdict(self)


def read_plan(moe_folder: Path) -> UpcyclePlan:
    plan_path, config_path = moe_folder / "upcycle.json", moe_folder / "config.json"
    if not plan_path.is_file() or not config_path.is_file():
        raise SourceError(
            f"{moe_folder} has no upcycle.json/config.json, so it was not written by upcycle convert.",
            "pass the OUT folder of `upcycle convert`.",
        )
    try:
        return UpcyclePlan.from_json(json.loads(plan_path.read_text()), json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"{plan_path} is damaged ({error}).", "convert the model again.") from None


def check_weights(dense: DenseSource, moe: DenseSource, plan: UpcyclePlan) -> WeightReport:
    """Re-make every planned tensor from the dense model and compare it bit for bit with the MoE file."""
    report = WeightReport()
    recorded = plan.source.get("sha256") or {}
    if recorded and plan.source.get("kind", "folder") == "folder":  # a .gguf source leaves no folder to hash
        files = [dense.folder / name for name in recorded]
        report.source_matches_provenance = all(f.is_file() for f in files) and hash_files(files) == recorded
    planned = {recipe.name: recipe for recipe in plan.recipes}
    for name in sorted(set(moe.tensors) - set(planned)):
        report.mismatches.append(WeightMismatch(name, "not in the plan (unexpected tensor)"))
    read = CachedReader(dense.read)
    for name, recipe in planned.items():
        if name not in moe.tensors:
            report.mismatches.append(WeightMismatch(name, "missing from the checkpoint"))
            continue
        actual = moe.read(name)
        expected = materialize(recipe, read)
        report.tensors_checked += 1
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            report.mismatches.append(
                WeightMismatch(
                    name, f"is {list(actual.shape)} {actual.dtype}, planned {list(expected.shape)} {expected.dtype}"
                )
            )
        elif not torch.equal(actual, expected):
            diff = (actual.float() - expected.float()).abs().max().item()
            report.mismatches.append(WeightMismatch(name, _describe(recipe, actual), diff))
    return report


def _describe(recipe, actual: torch.Tensor) -> str:
    if recipe.op == "router" and recipe.group_size > 1:
        rows = actual.float().view(-1, recipe.group_size, actual.shape[-1])
        broken = (rows != rows[:, :1]).any(dim=-1).nonzero().tolist()
        if broken:
            group, member = broken[0]
            return (
                f"router row {group * recipe.group_size + member} breaks virtual group {group}: its rows must be "
                "identical so a token takes every shard of a copy"
            )
        return "router differs from its recorded initialisation"
    if recipe.op == "expert":
        what = "copy" if recipe.rows is None and recipe.cols is None else "shard"
        return f"expert {recipe.expert} ({recipe.projection}) is not the recorded {what} of {recipe.source}"
    if recipe.op == "copy":
        return f"differs from dense tensor {recipe.source}"
    return "differs from its recipe"


def load_text_tokens(moe_folder: Path, text: str | None, max_tokens: int, vocab_size: int) -> tuple[list, str]:
    """Token sequences of real text: the checkpoint's tokenizer when it has one, else the text's UTF-8 bytes."""
    from upcycle import assets

    if text is not None:
        texts, origin = [text], "--text"
    else:
        try:
            texts, origin = [assets.sample_text()], "held-out Shakespeare"
        except Exception:  # offline or not cached: the built-in prompts still exercise the model
            texts, origin = list(assets.SAMPLE_PROMPTS), "built-in prompts"
    tokenizer = None
    if (moe_folder / "tokenizer.json").is_file() or (moe_folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(moe_folder)
    sequences = []
    for item in texts:
        if tokenizer is not None:
            ids = tokenizer(item, return_tensors="pt").input_ids[0]
        else:
            ids = torch.tensor(list(item.encode("utf-8")), dtype=torch.long) % vocab_size
            origin += " (UTF-8 bytes; no tokenizer)"
        sequences.append(ids[:max_tokens])
    return [s for s in sequences if len(s)], origin


def check_function(
    dense_folder: Path,
    moe_folder: Path,
    dtype: str = "float32",
    text: str | None = None,
    max_tokens: int = 256,
    trust_remote_code: bool = False,
    storage_dtype: str | None = None,
) -> FunctionReport:
    """Run both models with plain transformers and compare logits and every layer's hidden state."""
    from upcycle.loading import load_causal_lm, load_causal_lm_strict

    torch_dtype = TORCH_DTYPES[dtype]
    # Both models load at the checkpoint's storage precision, then compute in `dtype`: a bf16 MoE is compared with
    # the dense model rounded to bf16, so what is measured is the upcycling, not the change of precision.
    stored = TORCH_DTYPES.get(storage_dtype or dtype, torch_dtype)
    dense = load_causal_lm_strict(dense_folder, stored, trust_remote_code)
    moe, problems = load_causal_lm(moe_folder, stored)
    dense, moe = dense.to(torch_dtype), moe.to(torch_dtype)
    dense.eval()
    moe.eval()
    sequences, origin = load_text_tokens(moe_folder, text, max_tokens, dense.config.vocab_size)
    max_abs = scale = kl_sum = 0.0
    agree = tokens = 0
    layer_abs: list[float] = []
    layer_scale: list[float] = []
    with torch.no_grad():
        for ids in sequences:
            a = dense(ids[None], output_hidden_states=True)
            b = moe(ids[None], output_hidden_states=True)
            la, lb = a.logits[0].double(), b.logits[0].double()
            max_abs = max(max_abs, (la - lb).abs().max().item())
            scale = max(scale, la.abs().max().item())
            logp, logq = la.log_softmax(-1), lb.log_softmax(-1)
            kl_sum += (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum().item()
            agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
            tokens += len(ids)
            for i, (ha, hb) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
                if len(layer_abs) <= i:
                    layer_abs.append(0.0)
                    layer_scale.append(0.0)
                layer_abs[i] = max(layer_abs[i], (ha.double() - hb.double()).abs().max().item())
                layer_scale[i] = max(layer_scale[i], ha.double().abs().max().item())
    layers = [LayerDiff(i, d, d / s if s else 0.0) for i, (d, s) in enumerate(zip(layer_abs, layer_scale, strict=True))]
    return FunctionReport(
        dtype,
        tokens,
        origin,
        max_abs,
        max_abs / scale if scale else 0.0,
        kl_sum / max(tokens, 1),
        agree / max(tokens, 1),
        layers,
        problems,
    )


def verify(
    dense_folder: Path,
    moe_folder: Path,
    dtype: str = "float32",
    tol: float | None = None,
    text: str | None = None,
    max_tokens: int = 256,
    weights: bool = True,
    function: bool = True,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Both checks and a verdict; approximate methods pass only against an explicit tolerance."""
    dense_folder, moe_folder = Path(dense_folder), Path(moe_folder)
    if dtype not in TORCH_DTYPES:
        raise SourceError(f"unknown --dtype {dtype!r}.", f"choose one of {', '.join(TORCH_DTYPES)}.")
    plan = read_plan(moe_folder)
    dense = DenseSource.open(dense_folder, trust_remote_code)
    moe = DenseSource.open(moe_folder)
    tolerance = tol if tol is not None else TOLERANCE[dtype]
    weight_report = check_weights(dense, moe, plan) if weights else None
    function_report = (
        check_function(dense_folder, moe_folder, dtype, text, max_tokens, trust_remote_code, plan.dtype)
        if function
        else None
    )
    equivalent, verdict = _verdict(plan, weight_report, function_report, tolerance, tol is not None)
    return VerifyReport(
        str(dense_folder),
        str(moe_folder),
        plan.exactness.method,
        plan.exactness.exact,
        plan.exactness.notes,
        tolerance,
        tol is not None,
        weight_report,
        function_report,
        equivalent,
        verdict,
    )


def _verdict(
    plan: UpcyclePlan, weights: WeightReport | None, function: FunctionReport | None, tol: float, explicit: bool
) -> tuple[bool, str]:
    if weights is not None and not weights.source_matches_provenance:
        return False, "the dense model is not the one this checkpoint was converted from (sha256 differs)"
    if weights is not None and weights.mismatches:
        first = weights.mismatches[0]
        return False, f"{len(weights.mismatches)} tensor(s) differ from the plan; first: {first.tensor} {first.problem}"
    if function is not None and function.loading_problems:
        return False, "transformers did not load the checkpoint cleanly: " + "; ".join(function.loading_problems)
    deviation = f" (logits deviate {function.logits_rel_diff:.3g} relative)" if function is not None else ""
    if not plan.exactness.exact and not explicit:
        return False, f"approximate by design{deviation}: {plan.exactness.method}; pass --tol to accept a deviation"
    if function is not None and function.logits_rel_diff > tol:
        layer = function.first_divergent_layer(tol)
        where = "" if layer is None else " in the embeddings" if layer == 0 else f" after decoder layer {layer - 1}"
        return False, (
            f"logits differ by {function.logits_rel_diff:.3g} relative, above the tolerance {tol:g}; "
            f"hidden states first diverge{where}"
        )
    if not plan.exactness.exact:
        return True, f"within the explicit tolerance {tol:g}{deviation} (approximate method)"
    return True, f"equivalent within {tol:g} relative"
