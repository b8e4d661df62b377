"""A sweep for people: compare's table with a column per swept key and the best row starred, and one PNG per key.

The table is built from compare's columns (`compare_render`), so a sweep reads like a comparison.
Each key's PNG shows held-out loss against the key's values (at equal tokens and at equal FLOPs, mean ± std over
seeds; one line per setting of the other keys, the dense control as its own line or, for a key it does not
follow, a horizontal reference) beside every run's loss curve, colored by the key's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.experiments.compare_render import (
    Column,
    downstream_columns,
    downstream_note,
    draw_curves,
    loss_columns,
    markdown_rows,
    model_columns,
    table_notes,
)
from upcycle.experiments.naming import label, safe_name, value_text
from upcycle.experiments.run_data import RunData
from upcycle.figures import save_figure

BEST = "★"


def sweep_table(summary: dict[str, Any]) -> str:
    """One row per grid point (dense controls first), a column per swept key, the best setting starred."""
    rows = summary["rows"]
    has_control = any(r["control"] for r in rows)
    columns: list[Column] = [("", lambda r: BEST if r["best"] else "")]
    if has_control:
        columns.append(("model", lambda r: "dense control" if r["control"] else "upcycled"))
    for key in summary["keys"]:
        columns.append((key, lambda r, key=key: value_text(r["point"][key]) if key in r["point"] else "–"))
    if not summary["keys"]:
        columns.append(("run", lambda r: r["label"]))
    columns += model_columns() + loss_columns(summary, "Δ vs dense" if has_control else None)
    columns += downstream_columns(rows)
    if any(r["dropped_fraction"] is not None for r in rows):
        columns.append(("dropped", lambda r: _percent(r["dropped_fraction"])))
    notes = table_notes(
        summary, "the dense control at the same setting of the keys it follows" if has_control else None
    )
    notes += downstream_note(rows)
    among = " among the upcycled settings" if has_control else ""
    notes.append(f"{BEST} = the lowest held-out loss at equal tokens{among}.")
    if any(r["dropped_fraction"] is not None for r in rows):
        notes.append(
            "dropped: token-to-expert assignments over capacity (moe.capacity_factor), mean over steps and seeds."
        )
    return "\n".join(markdown_rows(columns, rows) + notes) + "\n" + dropped_table(rows)


def dropped_table(rows: list[dict[str, Any]]) -> str:
    """Dropped assignments per MoE layer (decoder layer index), one row per setting with a capacity factor."""
    dropping = [r for r in rows if r.get("dropped_per_layer")]
    if not dropping:
        return ""
    layers = list(dropping[0]["dropped_per_layer"])
    columns: list[Column] = [("setting", lambda r: r["label"])]
    columns += [(f"layer {n}", lambda r, n=n: _percent(r["dropped_per_layer"].get(n))) for n in layers]
    lines = markdown_rows(columns, dropping)
    return (
        "\nDropped token-to-expert assignments per MoE layer (mean over steps and seeds):\n\n" + "\n".join(lines) + "\n"
    )


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.2f} %"


def key_plot_path(out: Path, key: str) -> Path:
    """Where the PNG of one swept key goes: ``OUT/sweep-optim.lr.png``."""
    return out / f"sweep-{safe_name(key)}.png"


def plot_key(
    runs: Sequence[RunData], summary: dict[str, Any], key: str, out: Path | str, title: str | None = None
) -> Path:
    """Held-out loss against ``key``'s values (equal tokens, equal FLOPs) and the loss curves, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = summary["rows"]
    has_flops = summary["equal_flops"] is not None
    panels = 3 if has_flops else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.4), squeeze=False)
    values = list(dict.fromkeys(value_text(r["point"][key]) for r in rows if key in r["point"]))
    raw = {value_text(r["point"][key]): r["point"][key] for r in rows if key in r["point"]}
    axis = _KeyAxis(key, [raw[v] for v in values])
    _loss_vs_key(axes[0][0], rows, key, axis, "loss_equal_tokens", "best", f"{summary['equal_tokens']:,} tokens")
    if has_flops:
        flops = f"{summary['equal_flops']:.3g} FLOPs"
        _loss_vs_key(axes[0][1], rows, key, axis, "loss_equal_flops", "best_equal_flops", flops)
    cmap = plt.get_cmap("viridis")
    by_variant = {r["variant"]: r for r in rows}

    def color_of(run: RunData) -> Any:
        point = by_variant[run.variant]["point"]
        if by_variant[run.variant]["control"] or key not in point:
            return "black"
        return cmap(values.index(value_text(point[key])) / max(1, len(values) - 1) * 0.9)

    draw_curves(axes[0][-1], None, runs, color_of)
    axes[0][-1].set_title(f"held-out loss vs tokens (color: {key})")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.suptitle(title or f"upcycle sweep: held-out loss vs {key}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, True, dpi=90)


class _KeyAxis:
    """Where a key's values sit on the x axis: their own numbers (log-spaced when they span 10x), else in order."""

    def __init__(self, key: str, values: list[Any]) -> None:
        self.key = key
        self.numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        self.log = self.numeric and min(values) > 0 and max(values) >= 10 * min(values)
        self.values = values
        self.texts = [value_text(v) for v in values]

    def x(self, value: Any) -> float:
        return float(value) if self.numeric else float(self.texts.index(value_text(value)))

    def style(self, ax: Any) -> None:
        ax.set_xlabel(self.key)
        if self.log:
            ax.set_xscale("log")
            ax.minorticks_off()
        positions = [float(v) for v in self.values] if self.numeric else list(range(len(self.texts)))
        ax.set_xticks(positions, self.texts, rotation=20 if len(self.texts) > 4 else 0)


def _loss_vs_key(ax: Any, rows: list[dict[str, Any]], key: str, axis: _KeyAxis, field: str, best: str, at: str) -> None:
    """One line per setting of the other keys (mean ± std over seeds), its dense control dashed in its color: a
    line when the control follows the key, else a horizontal reference level."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10")
    colors: dict[str, Any] = {}
    series: dict[tuple[bool, str], list[dict[str, Any]]] = {}
    for row in rows:
        others = label({k: v for k, v in row["point"].items() if k != key})
        color = colors.setdefault(others, palette(len(colors) % 10))
        if row[field] is None:
            continue
        if key not in row["point"]:  # a dense control that does not follow this key: one reference level
            ax.axhline(row[field], color=color, linestyle="--", linewidth=1.2, label=row["label"])
            continue
        series.setdefault((row["control"], others), []).append(row)
    for (control, others), members in series.items():
        members.sort(key=lambda r: axis.x(r["point"][key]))
        xs = [axis.x(r["point"][key]) for r in members]
        ys = [r[field] for r in members]
        errs = [r[f"{field}_std"] or 0.0 for r in members]
        name = label({k: v for k, v in members[0]["point"].items() if k != key}, control)
        style = {"linestyle": "--" if control else "-", "color": colors[others]}
        ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=4, capsize=3, label=name, **style)
    for row in rows:
        if row[best] and row[field] is not None and key in row["point"]:
            x = axis.x(row["point"][key])
            ax.scatter([x], [row[field]], marker="*", s=180, color="red", zorder=5, label="best")
    axis.style(ax)
    ax.set_ylabel(f"held-out loss @ {at}")
    ax.set_title(f"held-out loss @ {at} vs {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
