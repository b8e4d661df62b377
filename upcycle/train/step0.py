"""The step-0 check: before training moves it, an exact upcycle computes its dense source's logits.

Both models run on the held-out tokens in the same precision (the run's: fp32, or bf16 under autocast or FSDP's
mixed precision), and their logits are compared: the largest difference relative to the largest dense logit, and
top-1 agreement, against what correct upcycles measure in that precision (STEP0_TOLERANCE); an exact upcycle
beyond it stops the run before any step. An approximate method
(noise, Drop-Upcycling, the paper's softmax-then-top-k), or an exact one whose conversion rounded the dense weights
to a narrower dtype, reports its deviation instead of passing. A model trained
after conversion (an export) is not compared with the original dense model.

`check` is what a run calls at step 0: it loads the dense source, compares, and turns the result into the eval
record's fields and the message the run prints (or the error that stops it).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.hf.loading import load_causal_lm_strict
from upcycle.train.distributed import Dist, all_reduce_max, all_reduce_sum
from upcycle.train.eval_plan import eval_batches
from upcycle.train.packing import PackedDataset, make_batch
from upcycle.train.recipe import TrainRecipe
from upcycle.upcycling import local_source

PRECISION_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# What correct upcycles measure at step 0 in the training's precision (max relative logit difference), with a
# margin; benchmarks/RESULTS.md. fp32: under 1e-6. bf16 under autocast or FSDP's mixed precision, where the MoE's
# weighted sum of expert outputs rounds differently from the dense MLP: tiny E4T2 7.6e-3 (autocast) and 1.3e-2 (2
# FSDP ranks), SmolLM2 with 6 MoE layers 1.1e-2 (autocast) and 2.0e-2 (all weights in bf16); an upcycle with
# --noise 0.05 measures 7.3e-2 to 7.9e-2 in every precision.
STEP0_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}
# fp32 rounds too little to hide a damaged weight: beyond its tolerance the run stops. Half precision's rounding
# grows with depth and width, so a larger model than those measured may pass its tolerance while being exact: the run
# stops only beyond STOP_FACTOR times it and warns in between.
STOP_FACTOR = {"float32": 1.0, "bfloat16": 3.0, "float16": 3.0}


@dataclass
class Step0Result:
    dense_loss: float
    rel_diff: float  # max |moe - dense| / max |dense| over the held-out logits
    top1_agreement: float
    precision: str
    tolerance: float
    exact_by_design: bool
    passed: bool | None  # None: an approximate method, whose deviation is reported, not judged

    def record(self) -> dict[str, Any]:
        return {f"step0_{k}": v for k, v in asdict(self).items()} | {"dense_eval_loss": self.dense_loss}


def dense_source(model_path: Path) -> tuple[Path, dict] | tuple[None, str]:
    """The dense folder an upcycle was converted from and its upcycle.json, or None and why there is none."""
    plan_path = model_path / "upcycle.json"
    if not plan_path.is_file():
        return None, "not an upcycle (no upcycle.json)"
    plan = json.loads(plan_path.read_text())
    if "training" in plan:
        return None, "trained after conversion: not compared with the original dense model"
    source = plan.get("source", {})
    folder = local_source(source) if source.get("kind") == "folder" else None
    if folder is None:
        return None, f"its dense source {source.get('path', '')} is not at hand (not converted on this machine)"
    return folder, plan


def compare_with_dense(
    model: nn.Module,
    dense: nn.Module,
    plan: dict,
    dataset: PackedDataset,
    sequences: int,
    micro_batch_size: int,
    info: Dist,
    precision: torch.dtype,
    autocast: contextlib.AbstractContextManager,
) -> Step0Result:
    """Both models on the same held-out batches (each rank its share), reduced over ranks."""
    batches = eval_batches(dataset, sequences, micro_batch_size, info.rank, info.world_size)
    was_training = model.training
    model.eval()
    dense.eval()
    worst = torch.zeros(2, dtype=torch.float64)  # max |diff|, max |dense logit|
    sums = torch.zeros(3, dtype=torch.float64)  # dense loss sum, agreeing tokens, tokens
    with torch.no_grad():
        for ids, count in zip(batches.batches, batches.counts, strict=True):
            batch_BS = make_batch(dataset, ids).to(info.device)
            with autocast:
                moe_BSV = model(input_ids=batch_BS).logits[:count].double()
                dense_BSV = dense(input_ids=batch_BS).logits[:count].double()
            if not count:
                continue
            worst = torch.maximum(worst, torch.stack([(moe_BSV - dense_BSV).abs().max(), dense_BSV.abs().max()]).cpu())
            loss = torch.nn.functional.cross_entropy(
                dense_BSV[:, :-1].flatten(0, 1), batch_BS[:count, 1:].flatten(), reduction="sum"
            )
            agree = (moe_BSV.argmax(-1) == dense_BSV.argmax(-1)).sum()
            sums += torch.stack([loss.cpu(), agree.cpu().double(), torch.tensor(float(moe_BSV.shape[:2].numel()))])
    model.train(was_training)
    worst = all_reduce_max(worst, info)
    sums = all_reduce_sum(sums, info)
    name = PRECISION_NAMES[precision]
    tolerance = STEP0_TOLERANCE[name]
    rel = (worst[0] / worst[1]).item() if worst[1] else worst[0].item()
    exact = bool(plan.get("exactness", {}).get("exact"))
    return Step0Result(
        dense_loss=(sums[0] / _predicted_tokens(batches.counts, dataset, info)).item(),
        rel_diff=rel,
        top1_agreement=(sums[1] / sums[2]).item() if sums[2] else 1.0,
        precision=name,
        tolerance=tolerance,
        exact_by_design=exact,
        passed=(rel <= tolerance) if exact else None,
    )


def _predicted_tokens(counts: list[int], dataset: PackedDataset, info: Dist) -> torch.Tensor:
    """Tokens whose next token is predicted (seq_len - 1 per real sequence), summed over ranks."""
    local = torch.tensor([float(sum(counts) * (dataset.seq_len - 1))], dtype=torch.float64)
    return all_reduce_sum(local, info)[0]


def check(
    model: nn.Module,
    recipe: TrainRecipe,
    dataset: PackedDataset,
    info: Dist,
    precision: torch.dtype,
    autocast: contextlib.AbstractContextManager,
) -> tuple[dict[str, Any], str | None]:
    """The record fields and a message: an upcycle's step-0 logits against its dense source, in the run's precision."""
    if recipe.model.init == "random":
        return (
            {},
            "step-0 check: not run (model.init is random: the model starts from fresh weights, not the dense one's)",
        )
    folder, plan = dense_source(Path(recipe.model.path))
    if folder is None:
        return {}, (f"step-0 check: not run ({plan})" if "trained" in str(plan) else None)
    dense = load_causal_lm_strict(folder, torch.float32).to(info.device)
    if info.enabled and precision != torch.float32:
        dense = dense.to(precision)  # FSDP computes the MoE in the policy's dtype: the dense model does too
    result = compare_with_dense(
        model,
        dense,
        plan,
        dataset,
        recipe.data.eval_sequences,
        recipe.batch.micro_batch_size,
        info,
        precision,
        autocast,
    )
    del dense
    record = result.record() | {"step0_matches_dense": result.passed}
    if result.passed is None:
        return record, _deviation_message(result, plan)
    if result.passed is False:
        return record, beyond_tolerance(result, folder, recipe)
    return record, None


def _deviation_message(result: Step0Result, plan: dict) -> str:
    """An approximate upcycle (by design, or by rounding at conversion): its deviation, reported, not judged."""
    exactness = plan.get("exactness") or {}
    measured = (exactness.get("rounding_deviation") or {}).get("relative")
    kind = (
        f"exact up to rounding to {exactness.get('rounded_to')}"
        + (f" ({measured:.3g} measured at conversion)" if measured is not None else "")
        if exactness.get("exact_up_to_rounding")
        else "approximate by design"
    )
    return (
        f"step-0 check: {kind}, the logits deviate {result.rel_diff:.3g} relative from the dense "
        f"model's (top-1 agreement {result.top1_agreement:.2%})"
    )


def beyond_tolerance(result: Step0Result, dense: Path, recipe: TrainRecipe) -> str:
    """An exact upcycle beyond its step-0 tolerance: stop (nothing trained), or in half precision, well within
    what its rounding might reach on a larger model than those measured, warn."""
    figures = (
        f"{result.rel_diff:.3g} relative ({result.precision}, tolerance {result.tolerance:g}; top-1 agreement "
        f"{result.top1_agreement:.2%})"
    )
    stop_at = result.tolerance * STOP_FACTOR[result.precision]
    if result.rel_diff <= stop_at:
        return (
            f"warning: at step 0 the model's logits differ from its dense source's by {figures}, more than exact "
            f"upcycles measured in {result.precision} but under the {stop_at:g} at which a run stops; check it in "
            f"float32 with `upcycle verify {dense} {recipe.model.path}`"
        )
    rebuild = (
        f"; if it reports a difference, delete {recipe.model.path} so that the next run converts again"
        if recipe.model.source is not None
        else ", and convert again"
    )
    raise UpcycleError(
        f"at step 0 the model's logits differ from its dense source's by {figures}, although its conversion is "
        "exact by design; nothing was trained.",
        f"run `upcycle verify {dense} {recipe.model.path}` to find what differs{rebuild}.",
    )
