"""The comparison for people: the paper's Table 1 in markdown, and held-out loss against tokens and FLOPs as a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.compare.run_data import RunData
from upcycle.figures import save_figure


def _fmt(value: float | None, digits: int = 4, std: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _si(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The paper's Table 1, small: held-out loss and perplexity at equal tokens and equal FLOPs."""
    tokens, flops = summary["equal_tokens"], summary["equal_flops"]
    header = (
        f"| model | seeds | active params | FLOPs/token | held-out loss @ step 0 | loss @ {tokens:,} tokens | "
        f"ppl | Δ vs dense | loss @ {_si(flops)}FLOPs | ppl | Δ vs dense | tokens/s |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in summary["rows"]:
        pct_f = row["improvement_equal_flops_pct"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row["label"],
                    ",".join(str(s) for s in row["seeds"]),
                    _si(row["active_params"]),
                    _si(row["flops_per_token"]),
                    _fmt(row["step0_loss"]),
                    _fmt(row["loss_equal_tokens"], std=row["loss_equal_tokens_std"]),
                    _fmt(row["ppl_equal_tokens"], 2),
                    f"{row['improvement_equal_tokens_pct']:+.2f} %",
                    _fmt(row["loss_equal_flops"], std=row["loss_equal_flops_std"]),
                    _fmt(row["ppl_equal_flops"], 2),
                    "–" if pct_f is None else f"{pct_f:+.2f} %",
                    _fmt(row["tokens_per_s"], 0),
                ]
            )
            + " |"
        )
    notes = [
        "",
        "Held-out loss: mean cross-entropy per token on the fixed held-out text (mean ± std over seeds); "
        "ppl = exp(loss); Δ = relative loss improvement over the dense control (positive = better).",
        f"Equal FLOPs: each run's held-out loss interpolated linearly between evaluations at the training FLOPs "
        f"of the cheapest run ({_si(flops)}FLOPs). {summary['flops_formula']}.",
    ]
    return "\n".join(lines + notes) + "\n"


def plot_runs(runs: Sequence[RunData], out: Path | str, title: str | None = None, force: bool = False) -> Path:
    """Held-out loss against training tokens and against training FLOPs, one line per run, as a PNG.

    Drawn into a temporary file beside OUT and renamed over it, so OUT is never half written; an existing OUT is
    replaced only with ``force``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(r.variant for r in runs))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    has_flops = any(r.flops_per_token for r in runs)
    fig, axes = plt.subplots(1, 2 if has_flops else 1, figsize=(11 if has_flops else 6, 4.2), squeeze=False)
    seed_index: dict[str, int] = {}
    for run in runs:
        color = colors(variants.index(run.variant) % 10)
        index = seed_index[run.variant] = seed_index.get(run.variant, -1) + 1
        label = run.label if run.seed is None else f"{run.label} (seed {run.seed})"
        style = dict(color=color, linestyle=styles[index % len(styles)], marker="o", markersize=3, linewidth=1.4)
        xs = [e["tokens"] for e in run.evals]
        ys = [e["eval_loss"] for e in run.evals]
        axes[0][0].plot(xs, ys, label=label, **style)
        if has_flops and run.flops_per_token:
            axes[0][1].plot([e["flops"] for e in run.evals], ys, label=label, **style)
    axes[0][0].set_xlabel("training tokens")
    axes[0][0].set_ylabel("held-out loss")
    axes[0][0].set_title("held-out loss vs tokens")
    if has_flops:
        axes[0][1].set_xlabel("training FLOPs (6·N_active + 12·L·d_attn·S per token)")
        axes[0][1].set_title("held-out loss vs FLOPs")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, force, dpi=90)
