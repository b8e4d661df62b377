"""The card of a merged MoE: which model each expert came from, how its routers were made, and what verify proves."""

from __future__ import annotations

from typing import Any

from upcycle.model_card.sections import table

MERGED = "merge"  # the "kind" a merged folder's upcycle.json states


def merge_card(record: dict[str, Any], *, title: str, front: str, loading: str) -> str:
    merge = record["merge"]
    spec = merge["config"]
    experts = spec["experts"]
    rows = [
        ("Class", f"`{record['architecture']}`"),
        ("Base model (attention, norms, embeddings, head)", f"`{spec['base_model']}`"),
        *[(f"Expert {i}", f"the MLP of `{e['source_model']}`") for i, e in enumerate(experts)],
        *[(f"Shared expert {i}", f"the MLP of `{e['source_model']}`") for i, e in enumerate(spec["shared_experts"])],
        ("Experts per token (top-k)", str(spec["experts_per_token"])),
        ("Routers", f"gate_mode `{spec['gate_mode']}` (mergekit-moe's semantics)"),
        ("dtype", f"`{record['dtype']}`"),
    ]
    return "\n".join(
        [
            front,
            f"# {title}\n",
            f"A Mixture-of-Experts model merged by upcycle from {len(experts)} dense models of one shape, without "
            "training: expert i of every layer is model i's MLP, everything else the base model's.\n",
            "## What was done\n",
            table(rows),
            "## Exactness\n\n**Not exact by design**: a merge computes no single source model. `upcycle verify "
            "CONFIG.yaml THIS_FOLDER` proves its parts (routing forced to expert i gives model i's MLP output; every "
            "other tensor is the base's) and measures how far the whole model is from each source.\n",
            loading,
            "`upcycle.json` in this folder is the machine-readable record of the merge: the merge config, every "
            "tensor's recipe and the sha256 of the source files. This card summarises it.\n",
        ]
    )
