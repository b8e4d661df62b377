"""A sweep as data: one row per grid point (seeds averaged), compare's numbers, the best setting marked.

The rows are compare's own (`compare_analysis.variant_row`: held-out loss and perplexity at equal
tokens and at equal FLOPs, step-0 loss, throughput), so a sweep and a comparison measure alike. What a sweep adds:
each row's point (the swept keys' values), the share of token assignments its capacity factor dropped, the best
setting (lowest held-out loss at equal tokens, dense controls excluded) and, with dense controls, each row's
improvement over the control run at the same setting of the keys that apply to a dense model. Everything is read
from the run folders (``run_info.json`` says which point a run is), so the analysis can be redone from them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.experiments.compare_analysis import equal_budget, group_runs, improvement, seed_noise, variant_row, verdict
from upcycle.experiments.control import follows
from upcycle.experiments.flops import FLOPS_FORMULA
from upcycle.experiments.run_data import RunData


def summarise_sweep(runs: Sequence[RunData], keys: Sequence[str]) -> dict[str, Any]:
    """The sweep's table as data: rows per point in run order, the best marked, findings in sentences."""
    if not runs:
        raise OptionError("no runs to summarise.", "run the sweep first.")
    equal_tokens, equal_flops = equal_budget(list(runs))
    rows = []
    for group in group_runs(list(runs)).values():
        sweep = group[0].info.get("sweep") or {}
        row = variant_row(group, equal_tokens, equal_flops)
        row["point"] = sweep.get("point", {})
        row["control"] = bool(sweep.get("control", False))
        row |= dropped_tokens(group)
        rows.append(row)
    controls = [row for row in rows if row["control"]]
    for row in rows:
        reference = _control_of(row, controls)
        row["control_variant"] = reference["variant"] if reference is not None else None
        row |= improvement(row, reference)
    settings = [row for row in rows if not row["control"]] or rows
    best = min(settings, key=lambda r: r["loss_equal_tokens"])
    with_flops = [row for row in settings if row["loss_equal_flops"] is not None]
    best_flops = min(with_flops, key=lambda r: r["loss_equal_flops"]) if with_flops else None
    for row in rows:
        row["best"] = row is best
        row["best_equal_flops"] = row is best_flops
    return {
        "keys": list(keys),
        "equal_tokens": equal_tokens,
        "equal_flops": equal_flops,
        "flops_formula": FLOPS_FORMULA,
        "rows": rows,
        "best": best["variant"],
        "best_equal_flops": best_flops["variant"] if best_flops is not None else None,
        "findings": sweep_findings(rows, best, best_flops),
    }


def _control_of(row: dict[str, Any], controls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The dense control run at the same setting of every key the control was swept along."""
    if row["control"]:
        return row
    matching = [c for c in controls if follows(row["point"], c["point"])]
    return matching[0] if len(matching) == 1 else None


def sweep_findings(rows: list[dict[str, Any]], best: dict[str, Any], best_flops: dict[str, Any] | None) -> list[str]:
    """Plain sentences: which setting is best, by how much over the runner-up, against the seed noise."""
    noise_text, sd = seed_noise(rows)
    out = [noise_text]
    settings = sorted((r for r in rows if not r["control"]), key=lambda r: r["loss_equal_tokens"])
    line = f"best setting at equal tokens: {best['label']}, held-out loss {best['loss_equal_tokens']:.4f}"
    if len(settings) > 1:
        second = settings[1]
        diff = second["loss_equal_tokens"] - best["loss_equal_tokens"]
        if sd is None:
            margin = "seed noise unmeasured: run --seeds 2 or more to know if it is real"
        elif diff <= 2 * sd:
            margin = "within seed noise (|diff| <= 2 std)"
        else:
            margin = "beyond seed noise (> 2 std)"
        line += f"; the next best, {second['label']}, {second['loss_equal_tokens']:.4f} (diff {diff:+.4f}, {margin})"
    out.append(line + ".")
    if best_flops is not None:
        loss = best_flops["loss_equal_flops"]
        out.append(f"best setting at equal FLOPs: {best_flops['label']}, held-out loss {loss:.4f}.")
    if best["control_variant"] is not None and not best["control"]:
        control = next(r for r in rows if r["variant"] == best["control_variant"])
        diff = control["loss_equal_tokens"] - best["loss_equal_tokens"]
        out.append(
            f"the best setting beats its dense control at equal tokens: {verdict(diff, sd)} "
            f"({best['loss_equal_tokens']:.4f} vs {control['loss_equal_tokens']:.4f}, "
            f"{best['improvement_equal_tokens_pct']:+.2f} %)."
        )
        if best["improvement_equal_flops_pct"] is not None:
            diff_f = control["loss_equal_flops"] - best["loss_equal_flops"]
            out.append(f"... and at equal FLOPs: {verdict(diff_f, sd)} ({best['improvement_equal_flops_pct']:+.2f} %).")
    return out


def dropped_tokens(group: Sequence[RunData]) -> dict[str, Any]:
    """The share of token-to-expert assignments a capacity factor dropped, over every step of every seed.

    ``dropped_fraction`` is the mean over MoE layers; ``dropped_per_layer`` maps each MoE layer's decoder index
    (as the run's layout record names it) to its own mean. Both are None for a dropless run.
    """
    from upcycle.train.metrics import read_metrics

    means: list[float] = []
    per_layer: list[list[float]] = []
    layers: list[int | None] = []
    for run in group:
        records = read_metrics(Path(run.run_dir))
        layers = next((r["moe_layers"] for r in records if r.get("kind") == "layout" and "moe_layers" in r), layers)
        means += [r["dropped_fraction"] for r in records if "dropped_fraction" in r]
        per_layer += [r["dropped_fraction_per_layer"] for r in records if "dropped_fraction_per_layer" in r]
    by_layer = None
    if per_layer:
        names = layers if len(layers) == len(per_layer[0]) else list(range(len(per_layer[0])))
        by_layer = {
            str(name): statistics.fmean(column)
            for name, column in zip(names, zip(*per_layer, strict=True), strict=True)
        }
    return {"dropped_fraction": statistics.fmean(means) if means else None, "dropped_per_layer": by_layer}
