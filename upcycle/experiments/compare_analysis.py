"""The comparison as data: per arm (seeds averaged), held-out loss at equal tokens and at equal FLOPs, and verdicts.

Equal tokens is the paper's Table 1 view; equal FLOPs (each run's held-out loss interpolated at the training FLOPs
of the cheapest run) charges an MoE for the extra experts a token uses. The findings say in plain sentences
whether the paper's direction reproduces, against the seed noise measured on the same runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from upcycle.errors import OptionError
from upcycle.experiments.flops import FLOPS_FORMULA
from upcycle.experiments.run_data import RunData


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def equal_budget(runs: list[RunData]) -> tuple[int, float | None]:
    """Where runs are compared: the fewest training tokens any run reached, and the fewest FLOPs (None when a run
    has no FLOPs count)."""
    equal_tokens = min(r.final_tokens for r in runs)
    with_flops = [r for r in runs if r.final_flops]
    equal_flops = min(r.final_flops for r in with_flops) if len(with_flops) == len(runs) else None  # type: ignore[type-var]
    return equal_tokens, equal_flops


def group_runs(runs: list[RunData]) -> dict[str, list[RunData]]:
    """The runs of each variant (its seeds), variants in the order they first appear."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return groups


def variant_row(group: list[RunData], equal_tokens: int, equal_flops: float | None) -> dict[str, Any]:
    """One variant's numbers, its seeds averaged: held-out loss and perplexity at equal tokens and at equal FLOPs,
    step-0 loss, parameter counts and throughput."""
    at_tokens = [r.loss_at(equal_tokens, "tokens") for r in group]
    at_flops = [r.loss_at(equal_flops, "flops") for r in group] if equal_flops else [None]
    step0 = [r.evals[0]["eval_loss"] for r in group if r.evals and r.evals[0]["step"] == 0]
    speeds = [r.tokens_per_s for r in group if r.tokens_per_s]
    loss_t, std_t = _mean_std([v for v in at_tokens if v is not None])
    flops_values = [v for v in at_flops if v is not None]
    loss_f, std_f = _mean_std(flops_values) if flops_values else (None, None)
    return {
        "variant": group[0].variant,
        "label": group[0].label,
        "seeds": [r.seed for r in group],
        "runs": [r.name for r in group],
        "active_params": group[0].info.get("active_params"),
        "total_params": group[0].info.get("total_params"),
        "flops_per_token": group[0].flops_per_token,
        "exact_at_init": group[0].info.get("exact_at_init"),
        "step0_loss": statistics.fmean(step0) if step0 else None,
        "loss_equal_tokens": loss_t,
        "loss_equal_tokens_std": std_t,
        "loss_equal_tokens_per_seed": at_tokens,
        "ppl_equal_tokens": math.exp(loss_t),
        "loss_equal_flops": loss_f,
        "loss_equal_flops_std": std_f,
        "loss_equal_flops_per_seed": at_flops,
        "ppl_equal_flops": math.exp(loss_f) if loss_f is not None else None,
        "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        **downstream_means(group),
    }


def downstream_means(group: list[RunData]) -> dict[str, Any]:
    """Each task's final score and the macro average, averaged over the seeds; empty unless every seed has them."""
    records = [r.downstream for r in group]
    if not records or any(record is None for record in records):
        return {}
    tasks = [task for task in records[0]["tasks"] if all(task in record["tasks"] for record in records)]
    return {
        "downstream": {task: statistics.fmean(record["tasks"][task]["score"] for record in records) for task in tasks},
        "downstream_macro": statistics.fmean(record["macro_average"] for record in records),
        "downstream_items": {task: records[0]["tasks"][task]["items"] for task in tasks},
    }


def improvement(row: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float | None]:
    """Relative held-out loss improvement of ``row`` over ``reference`` in %, at equal tokens and equal FLOPs
    (positive = better; None where a loss is missing)."""
    if reference is None:
        return {"improvement_equal_tokens_pct": None, "improvement_equal_flops_pct": None}
    return {
        "improvement_equal_tokens_pct": (
            100.0 * (reference["loss_equal_tokens"] - row["loss_equal_tokens"]) / (reference["loss_equal_tokens"])
        ),
        "improvement_equal_flops_pct": (
            100.0 * (reference["loss_equal_flops"] - row["loss_equal_flops"]) / reference["loss_equal_flops"]
            if row["loss_equal_flops"] is not None and reference["loss_equal_flops"] is not None
            else None
        ),
    }


def summarise(runs: list[RunData], dense_variant: str | None = None) -> dict[str, Any]:
    """The comparison table as data: per variant (seeds averaged), loss at equal tokens and at equal FLOPs."""
    if not runs:
        raise OptionError("no runs to compare.", "pass at least one run folder.")
    groups = group_runs(runs)
    if dense_variant is None:
        dense_variant = next((r.variant for r in runs if r.info.get("experts") == 0), next(iter(groups)))
    equal_tokens, equal_flops = equal_budget(runs)
    rows = [variant_row(group, equal_tokens, equal_flops) for group in groups.values()]
    dense = next(row for row in rows if row["variant"] == dense_variant)
    for row in rows:
        row |= improvement(row, dense)
    return {
        "dense_variant": dense_variant,
        "equal_tokens": equal_tokens,
        "equal_flops": equal_flops,
        "flops_formula": FLOPS_FORMULA,
        "rows": rows,
        "findings": findings(rows, dense_variant),
    }


def seed_noise(rows: list[dict[str, Any]]) -> tuple[str, float | None]:
    """The largest std of held-out loss over seeds among the rows, and a sentence saying so."""
    noise = [r["loss_equal_tokens_std"] for r in rows if r["loss_equal_tokens_std"] is not None]
    text = (
        f"seed noise (std of held-out loss over seeds, largest of {len(noise)} variants): {max(noise):.4f}"
        if noise
        else "seed noise: unmeasured (one seed per variant)"
    )
    return text, (max(noise) if noise else None)


def verdict(diff: float, sd: float | None) -> str:
    """Whether a loss difference (positive = the first is better) says yes, no, or is within the seed noise."""
    if sd is not None and abs(diff) <= 2 * sd:
        return "within seed noise (|diff| <= 2 std)"
    return "yes" if diff > 0 else "no"


def findings(rows: list[dict[str, Any]], dense_variant: str) -> list[str]:
    """Plain sentences: does the paper's direction reproduce here, by how much, against what seed noise."""
    by = {row["variant"]: row for row in rows}
    dense = by[dense_variant]
    noise_text, sd = seed_noise(rows)
    out = [noise_text]

    moes = [r for r in rows if r["variant"] != dense_variant]
    if moes:
        best = min(moes, key=lambda r: r["loss_equal_tokens"])
        diff = dense["loss_equal_tokens"] - best["loss_equal_tokens"]
        out.append(
            f"MoE beats dense at equal tokens: {verdict(diff, sd)}; best MoE {best['variant']} "
            f"{best['loss_equal_tokens']:.4f} vs dense {dense['loss_equal_tokens']:.4f} "
            f"({best['improvement_equal_tokens_pct']:+.2f} %)."
        )
        if best["loss_equal_flops"] is not None and dense["loss_equal_flops"] is not None:
            diff_f = dense["loss_equal_flops"] - best["loss_equal_flops"]
            out.append(
                f"{best['variant']} beats dense at equal FLOPs: {verdict(diff_f, sd)} "
                f"({best['improvement_equal_flops_pct']:+.2f} %)."
            )
    if "e8g1t2-softmax" in by and "e8g1t2-renorm" in by:
        soft, renorm = by["e8g1t2-softmax"], by["e8g1t2-renorm"]
        diff = renorm["loss_equal_tokens"] - soft["loss_equal_tokens"]
        out.append(
            f"softmax-then-topK + weight scaling beats topK-then-softmax: {verdict(diff, sd)} "
            f"({soft['loss_equal_tokens']:.4f} vs {renorm['loss_equal_tokens']:.4f}, diff {diff:+.4f})."
        )
    if "e8g8t8" in by:
        fine = by["e8g8t8"]
        diff = dense["loss_equal_tokens"] - fine["loss_equal_tokens"]
        out.append(
            f"E8G8T8 (virtual groups) beats dense: {verdict(diff, sd)} "
            f"({fine['loss_equal_tokens']:.4f} vs {dense['loss_equal_tokens']:.4f}, "
            f"{fine['improvement_equal_tokens_pct']:+.2f} %)."
        )
    return out
