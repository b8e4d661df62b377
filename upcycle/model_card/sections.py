"""The sections of a model card that report measured figures: exactness, verification, held-out loss and
downstream scores, each rendered only from what its record holds."""

from __future__ import annotations

from typing import Any


def table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {key} | {_cell(value)} |\n" for key, value in rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def exactness_section(exactness: dict[str, Any]) -> str:
    measured = exactness.get("rounding_deviation") or {}
    if exactness["exact"]:
        head = "**Exact by design**: the MoE computes the same function as the dense model it was upcycled from."
    elif exactness.get("exact_up_to_rounding"):
        head = (
            f"**Exact up to rounding to {exactness['rounded_to']}**: the upcycling itself is exact ("
            f"{exactness['method']}), but some dense weights are held here rounded to {exactness['rounded_to']} "
            "(the notes below say which)."
        )
        if "relative" in measured:
            head += (
                f" Measured at conversion: the {measured['what']} deviate {measured['relative']:.3g} relative from "
                f"the dense model's ({measured['tokens']} tokens, {measured['compute']} compute)."
            )
    else:
        why = "because:" if exactness.get("notes") else f"({exactness['method']})."
        head = f"**Approximate by design**: the MoE does not equal the dense model, {why}"
    notes = "".join(f"- {note}\n" for note in exactness.get("notes") or [])
    return f"## Exactness\n\n{head}\n" + (f"\n{notes}" if notes else "")


def conversion_exactness_after_training(exactness: dict[str, Any]) -> str:
    kind = "exact" if exactness["exact"] else "approximate"
    if exactness.get("exact_up_to_rounding"):
        kind = f"exact up to rounding to {exactness['rounded_to']}"
    return (
        f"At conversion the model was {kind} by design ({exactness['method']}); training has changed its weights "
        "since, so it no longer equals the dense model.\n"
    )


def not_verified_section(source: str = "DENSE", against: str = "the dense model") -> str:
    return (
        "## Verification\n\n"
        f"Not verified when this card was written: `upcycle verify {source} THIS_FOLDER` checks the config, every "
        f"tensor and the model's output against {against}.\n"
    )


def verify_section(report: dict[str, Any]) -> str:
    """The figures of an `upcycle verify` report (VerifyReport.to_json()), only those the report holds."""
    lines = [f"- Verdict: {'passed' if report.get('equivalent') else 'failed'}: {report.get('verdict', '')}"]
    config = report.get("config") or {}
    if config:
        layers = len(config.get("layers") or [])
        lines.append(
            f"- Config check: {layers} layers compute the same in transformers: {_yes(config.get('equivalent'))}"
        )
    if report.get("config_matches_plan") is not None:
        lines.append(f"- config.json as recorded in upcycle.json: {_yes(report['config_matches_plan'])}")
    weights = report.get("weights")
    if weights:
        mismatches = len(weights.get("mismatches") or [])
        lines.append(
            f"- Weights: {weights.get('tensors_checked', 0)} tensors re-made from the dense model, {mismatches} "
            "differing"
        )
        provenance = weights.get("source_matches_provenance")
        lines.append(
            "- Source sha256 as recorded in upcycle.json: "
            + ("not comparable" if provenance is None else _yes(provenance))
        )
    lines.append(_function_line(report))
    if report.get("tolerance") is not None:
        explicit = " (given explicitly)" if report.get("tolerance_explicit") else ""
        lines.append(f"- Tolerance: {report['tolerance']:g} relative{explicit}")
    return "## Verification\n\n" + "\n".join(lines) + "\n"


def _function_line(report: dict[str, Any]) -> str:
    full, streamed = report.get("function"), report.get("streaming")
    if full:
        return (
            f"- Function check (whole model, {full['dtype']}, {full['tokens']} tokens): max logit relative difference "
            f"{full['logits_rel_diff']:.3g}, top-1 agreement {full['top1_agreement']:.2%}"
        )
    if streamed:
        outer = [streamed.get(key, 0.0) for key in ("final_norm_rel_diff", "embedding_rel_diff", "lm_head_rel_diff")]
        worst = max([layer["rel_diff"] for layer in streamed.get("layers") or []] + outer)
        return (
            f"- Function check (layer by layer, {streamed['dtype']}, {streamed['tokens']} tokens): max relative "
            f"difference {worst:.3g} (layer outputs, embedding rows, final norm, LM head logits)"
        )
    return "- Function check: not run"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def held_out_section(held_out: list[tuple[int, float]]) -> str:
    if not held_out:
        return "No held-out loss was measured (the run had no eval data).\n"
    rows = "".join(f"| {step} | {loss:.4f} |\n" for step, loss in held_out)
    return "Held-out loss (mean cross-entropy per token) by step:\n\n| Step | Held-out loss |\n|---:|---:|\n" + rows


def downstream_section(downstream: dict[str, Any] | None) -> str:
    """The last evaluation's task scores, with the protocol that makes them comparable (or not) with others'."""
    if not downstream:
        return ""
    tasks = downstream["tasks"]
    items = "every item" if downstream.get("limit") is None else f"the first {downstream['limit']} items"
    rows = "".join(
        f"| {t['title']} | {t['shots']} | {t['items']} | {t['primary']} | {100 * t['score']:.1f} | "
        f"{t['bits_per_byte']:.3f} |\n"
        for t in tasks.values()
    )
    return (
        f"Downstream tasks at step {downstream['step']}, scored as `upcycle eval` scores them "
        f"({items} of each task from {downstream['source']}"
        f"{', in ' + downstream['precision'] if downstream.get('precision') else ''}): the log-likelihood of each "
        "choice as lm-evaluation-harness scores it; acc_norm divides it by the choice's length in characters; "
        "LAMBADA counts greedy last words; bits per byte are the gold continuation's.\n\n"
        "| Task | Shots | Items | Metric | Score (%) | Bits per byte |\n|---|---:|---:|---|---:|---:|\n"
        + rows
        + f"\nMacro average: {100 * downstream['macro_average']:.1f} over {len(tasks)} tasks.\n"
    )


def experts_ran(metrics: list[dict[str, Any]]) -> str | None:
    """Which experts implementation trained the model, from the run's layout record (None when it has none)."""
    layout = next((r for r in metrics if r.get("kind") == "layout"), None)
    if layout is None:
        return None
    checks = layout.get("kernel_checks") or []
    failed = [c for c in checks if not c["ok"]]
    if failed:
        reason = failed[0]["reason"]
        return f"transformers' grouped_mm: upcycle's Triton experts failed their first-contact check ({reason})"
    if checks:
        return "upcycle's Triton experts (they passed their first-contact check against the reference)"
    return str(layout.get("experts_implementation") or "?")
