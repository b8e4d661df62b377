"""The support table: every family with its exact homes and the methods they hold, or its refusal.

Derived from the registry itself (each target's own `why_not` on a plain config of the family), so
`upcycle families` and the README's table cannot drift from what `convert` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.convert.families import FAMILIES, REFUSED
from upcycle.convert.families.base import DenseModel, Family
from upcycle.convert.grow.rules import grow_markdown
from upcycle.convert.options import UpcycleOptions

METHODS: dict[str, list[dict]] = {
    "G=1": [dict(experts=8, top_k=2)],
    "G>1": [dict(experts=4, granularity=2, top_k=2)],
    "softmax-topk": [dict(experts=8, top_k=2, router="softmax-topk", router_init="zero")],
    "--layers": [dict(experts=8, top_k=2, layers="2-3")],
    "router from data": [dict(experts=8, top_k=2, router_init="cluster")],
    "--split activation": [dict(experts=4, granularity=2, top_k=2, split="activation")],
    # a third of the 96 neurons: any width for a gated shared expert, one routed expert's width (G = 2) otherwise
    "--shared-width": [
        dict(experts=8, top_k=2, shared_width=32),
        dict(experts=4, granularity=2, top_k=2, shared_width=32),
    ],
}


@dataclass(frozen=True)
class FamilyRow:
    family: str
    title: str
    targets: tuple[str, ...]  # empty: refused
    methods: dict[str, tuple[str, ...]]  # method -> the targets that hold it exactly
    reason: str = ""
    needs: str = ""  # a later transformers than the oldest supported
    refused_configs: tuple[str, ...] = ()  # configs of an exact family that are refused, and why


def family_rows() -> list[FamilyRow]:
    from upcycle.convert.options import parse_layers
    from upcycle.convert.targets import TARGETS
    from upcycle.convert.targets.base import Layout

    rows = []
    for name, family in sorted(FAMILIES.items()):
        dense = _plain_dense(family)
        methods = {}
        for method, variants in METHODS.items():
            held = []
            for target in family.targets:
                tries = [(v, "") for v in variants] + [
                    ({**v, "router_init": "zero"}, " (zero router)") for v in variants if "router_init" not in v
                ]  # a method that names its router is held with that router or not at all
                for variant, note in tries:
                    opts = UpcycleOptions(**variant)
                    layout = Layout(parse_layers(opts.layers, dense.num_layers), dense.num_layers)
                    if TARGETS[target].why_not(dense, opts, layout) is None:
                        held.append(target + note)
                        break
            methods[method] = tuple(held)
        rows.append(
            FamilyRow(
                name,
                family.title,
                family.targets,
                methods,
                needs=family.min_transformers,
                refused_configs=family.refused_configs,
            )
        )
    for name, reason in sorted(REFUSED.items()):
        rows.append(FamilyRow(name, name, (), {}, reason=reason))
    return rows


def _plain_dense(family: Family) -> DenseModel:
    """The family with its class's defaults and no windows: what the method columns describe."""
    from upcycle.hf.config import UnknownConfigError, resolved_fields

    try:
        defaults = resolved_fields({"model_type": family.model_type})
    except UnknownConfigError:  # the installed transformers lacks the class
        defaults = {}
    return DenseModel(
        spec=family, config={}, resolved=defaults, traits=family.traits(defaults), num_layers=4, hidden_size=64,
        intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
        layer_windows=(None,) * 4,
    )  # fmt: skip


def markdown() -> str:
    """The README's table."""
    lines = [
        "| dense family | exact MoE target(s) | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for row in family_rows():
        if not row.targets:
            continue
        cells = [", ".join(row.methods[m]) or "no" for m in METHODS]
        needs = f" (transformers >= {row.needs})" if row.needs else ""
        lines.append(f"| `{row.family}` {row.title}{needs} | {', '.join(row.targets)} | " + " | ".join(cells) + " |")
    partly = [row for row in family_rows() if row.targets and row.refused_configs]
    lines += ["", "Configs refused within exact families:", ""]
    lines += [f"- `{row.family}`: {reason}." for row in partly for reason in row.refused_configs]
    refused = [row for row in family_rows() if not row.targets]
    lines += ["", "Refused, with the reason:", ""]
    lines += [f"- `{row.family}`: {row.reason}." for row in refused]
    lines += ["", "MoE classes `upcycle grow` grows:", ""]
    return "\n".join(lines) + "\n" + grow_markdown()
