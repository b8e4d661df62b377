"""The card of a grown MoE: what grew, and why the grown model computes what the original does."""

from __future__ import annotations

from typing import Any

from upcycle.model_card.sections import not_verified_section, table, verify_section

GROWN = "grown"  # the "kind" a grown folder's upcycle.json states


def growth_card(record: dict[str, Any], *, title: str, front: str, loading: str, verify: dict | None = None) -> str:
    growth = record["growth"]
    (experts, grown), (top_k, grown_top_k), m = growth["experts"], growth["top_k"], growth["factor"]
    name = (record.get("source") or {}).get("name")
    origin = f"the MoE model {name}" if name else f"a `{record['architecture']}` model"
    exactness = record["exactness"]
    notes = "".join(f"- {note}\n" for note in exactness.get("notes") or [])
    rows = [
        ("Class", f"`{record['architecture']}` (unchanged)"),
        ("Experts", f"{grown} = {experts} x {m} (new expert j is a copy of expert j // {m})"),
        ("Experts per token (top-k)", f"{grown_top_k} = {top_k} x {m}"),
        ("MoE layers", ", ".join(str(layer) for layer in record["moe_layers"])),
        ("Router", f"{growth['scoring']} scores; each router row repeated {m} times"),
    ]
    head = (
        "**Exact by design**: the grown model computes the same function as the model it grew from."
        if exactness["exact"]
        else f"**Not exact**: {exactness['method']}."
    )
    return "\n".join(
        [
            front,
            f"# {title}\n",
            f"A Mixture-of-Experts model grown from {origin} by upcycle, without training: {m} times "
            "the experts, each a copy of one of the original's, so training can specialise them from here.\n",
            "## What was done\n",
            table(rows),
            f"## Exactness\n\n{head}\n" + (f"\n{notes}" if notes else ""),
            verify_section(verify) if verify is not None else not_verified_section("ORIGINAL", "the original"),
            loading,
            "`upcycle.json` in this folder is the machine-readable record of the growth: every tensor's recipe and "
            "the sha256 of the original's files. This card summarises it.\n",
        ]
    )
