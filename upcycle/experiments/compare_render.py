"""The comparison for people: the paper's Table 1 in markdown, and held-out loss against tokens and FLOPs as a plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from upcycle.experiments.run_data import RunData
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


Column = tuple[str, Callable[[dict[str, Any]], str]]
"""A table column: its header and how a summary row fills its cell."""


def markdown_rows(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table: the header, the rule, then one line per row."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return lines


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f} %"


def loss_columns(summary: dict[str, Any], versus: str | None = "Δ vs dense") -> list[Column]:
    """The measurement columns every table shares: step-0 loss, loss and perplexity at equal tokens and at equal
    FLOPs (each with its improvement over the reference when ``versus`` names one), throughput."""
    tokens, flops = summary["equal_tokens"], summary["equal_flops"]
    at_tokens: list[Column] = [
        (f"loss @ {tokens:,} tokens", lambda r: _fmt(r["loss_equal_tokens"], std=r["loss_equal_tokens_std"])),
        ("ppl", lambda r: _fmt(r["ppl_equal_tokens"], 2)),
    ]
    at_flops: list[Column] = [
        (f"loss @ {_si(flops)}FLOPs", lambda r: _fmt(r["loss_equal_flops"], std=r["loss_equal_flops_std"])),
        ("ppl", lambda r: _fmt(r["ppl_equal_flops"], 2)),
    ]
    if versus:
        at_tokens.append((versus, lambda r: _pct(r["improvement_equal_tokens_pct"])))
        at_flops.append((versus, lambda r: _pct(r["improvement_equal_flops_pct"])))
    return [
        ("held-out loss @ step 0", lambda r: _fmt(r["step0_loss"])),
        *at_tokens,
        *at_flops,
        ("tokens/s", lambda r: _fmt(r["tokens_per_s"], 0)),
    ]


def downstream_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """A column per downstream task the rows share, and their macro average (none when no row was scored)."""
    scored = [r for r in rows if r.get("downstream")]
    if not scored:
        return []
    tasks = [task for task in scored[0]["downstream"] if all(task in r["downstream"] for r in scored)]
    cell = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    columns: list[Column] = [(task, lambda r, task=task: cell((r.get("downstream") or {}).get(task))) for task in tasks]
    columns.append(("tasks avg", lambda r: cell(r.get("downstream_macro"))))
    return columns


def downstream_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    scored = [r for r in rows if r.get("downstream")]
    if not scored:
        return []
    items = sorted({n for r in scored for n in r["downstream_items"].values()})
    return [
        f"Downstream tasks (%): each run's last evaluation, scored as `upcycle eval` scores them (acc_norm or acc, "
        f"the benchmark's leading figure; {'/'.join(map(str, items))} items per benchmark, mean over seeds). At a few "
        "hundred items a benchmark's standard error is several points: differences smaller than that are noise."
    ]


def model_columns() -> list[Column]:
    """Seeds, active parameters and FLOPs per token of a row."""
    return [
        ("seeds", lambda r: ",".join(str(s) for s in r["seeds"])),
        ("active params", lambda r: _si(r["active_params"])),
        ("FLOPs/token", lambda r: _si(r["flops_per_token"])),
    ]


def table_notes(summary: dict[str, Any], versus: str | None = "the dense control") -> list[str]:
    """What the table's numbers mean (printed under it); ``versus`` is what Δ is measured against (None: no Δ)."""
    flops = summary["equal_flops"]
    delta = f"; Δ = relative loss improvement over {versus} (positive = better)" if versus else ""
    return [
        "",
        "Held-out loss: mean cross-entropy per token on the fixed held-out text (mean ± std over seeds); "
        f"ppl = exp(loss){delta}.",
        f"Equal FLOPs: each run's held-out loss interpolated linearly between evaluations at the training FLOPs "
        f"of the cheapest run ({_si(flops)}FLOPs). {summary['flops_formula']}.",
    ]


def markdown_table(summary: dict[str, Any]) -> str:
    """The paper's Table 1, small: held-out loss and perplexity at equal tokens and equal FLOPs."""
    rows = summary["rows"]
    columns: list[Column] = [
        ("model", lambda r: r["label"]),
        *model_columns(),
        *loss_columns(summary),
        *downstream_columns(rows),
    ]
    return "\n".join(markdown_rows(columns, rows) + table_notes(summary) + downstream_note(rows)) + "\n"


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
    has_flops = any(r.flops_per_token for r in runs)
    fig, axes = plt.subplots(1, 2 if has_flops else 1, figsize=(11 if has_flops else 6, 4.2), squeeze=False)
    draw_curves(axes[0][0], axes[0][1] if has_flops else None, runs)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, force, dpi=90)


def draw_curves(
    ax_tokens: Any, ax_flops: Any | None, runs: Sequence[RunData], color_of: Callable[[RunData], Any] | None = None
) -> None:
    """Held-out loss curves, one line per run: against training tokens, and against FLOPs when ``ax_flops`` is
    given. One color per variant (or ``color_of``'s), one line style per seed."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in runs))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    seed_index: dict[str, int] = {}
    for run in runs:
        color = color_of(run) if color_of is not None else colors(variants.index(run.variant) % 10)
        index = seed_index[run.variant] = seed_index.get(run.variant, -1) + 1
        label = run.label if run.seed is None else f"{run.label} (seed {run.seed})"
        style = dict(color=color, linestyle=styles[index % len(styles)], marker="o", markersize=3, linewidth=1.4)
        xs = [e["tokens"] for e in run.evals]
        ys = [e["eval_loss"] for e in run.evals]
        ax_tokens.plot(xs, ys, label=label, **style)
        if ax_flops is not None and run.flops_per_token:
            ax_flops.plot([e["flops"] for e in run.evals], ys, label=label, **style)
    ax_tokens.set_xlabel("training tokens")
    ax_tokens.set_ylabel("held-out loss")
    ax_tokens.set_title("held-out loss vs tokens")
    if ax_flops is not None:
        ax_flops.set_xlabel("training FLOPs (6·N_active + 12·L·d_attn·S per token)")
        ax_flops.set_title("held-out loss vs FLOPs")
    for ax in (ax_tokens, ax_flops):
        if ax is not None:
            ax.grid(alpha=0.3)
