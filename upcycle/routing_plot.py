"""A picture of routing: how a trained MoE spreads held-out tokens over its experts, per layer, over training.

``upcycle train`` measures each MoE layer's expert load at every evaluation (step 0, every ``run.eval_interval``
steps and the last step): the share of the held-out tokens' top-k assignments each expert received. The train
records carry no per-expert numbers, so the picture has one column per evaluation. It is one PNG: a heatmap per
MoE layer (x = training step, y = expert, colour = share, one colour scale centred on the uniform share 1/E),
and below them the max/mean imbalance of every layer over the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.figures import save_figure
from upcycle.output_safety import refuse_existing, refuse_overlap

SUFFIX = "-expert-load.png"  # the default OUT is RUN_DIR's sibling RUN_DIR-expert-load.png
LEGEND_LAYERS = 8  # up to this many layers the imbalance lines get a legend; beyond, a colour bar of depth


@dataclass(frozen=True)
class ExpertLoad:
    """Expert-load shares from a run's evaluations: ``shares[t][l][e]`` at ``steps[t]``."""

    run_dir: Path
    steps: list[int]
    shares: list[list[list[float]]]

    @property
    def layers(self) -> int:
        return len(self.shares[0])

    @property
    def experts(self) -> int:
        return len(self.shares[0][0])

    def imbalance(self, layer: int) -> list[float]:
        """Max over mean share of one layer at each step: 1 is perfectly even, E means one expert takes all."""
        return [max(s[layer]) / (sum(s[layer]) / len(s[layer])) for s in self.shares]


def default_output(run_dir: Path | str) -> Path:
    """Beside the run folder, not in it: a run folder holds only what its run wrote (as for ``upcycle plot``)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}{SUFFIX}"


def read_expert_load(run_dir: Path | str) -> ExpertLoad:
    """The evaluations' expert loads from ``RUN_DIR/metrics.jsonl``, one per step (a redone step keeps its last)."""
    run_dir = Path(run_dir)
    by_step = {r["step"]: r["expert_load"] for r in _records(run_dir) if r.get("expert_load")}
    if not by_step:
        raise OptionError(
            f"{run_dir / 'metrics.jsonl'} has no expert-load records: the model has no routers (a dense run) or "
            "the run had no held-out data.",
            "pass the folder of a run that trained an upcycled MoE with data.eval set; expert load is measured "
            "at each evaluation.",
        )
    steps = sorted(by_step)
    shares = [by_step[s] for s in steps]
    shapes = {(len(s), len(s[0]) if s else 0) for s in shares}
    if len(shapes) != 1 or 0 in next(iter(shapes)):
        raise OptionError(
            f"{run_dir / 'metrics.jsonl'} mixes expert-load records of different shapes (layers x experts: "
            f"{sorted(shapes)}).",
            "plot a folder that holds one run's records: train into a fresh run.output_dir.",
        )
    return ExpertLoad(run_dir, steps, shares)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metric records, with an error that says what to pass when there are none to read."""
    from upcycle.train.metrics import read_metrics

    if not run_dir.is_dir():
        raise OptionError(
            f"{run_dir} is not a folder.", "pass a run folder written by upcycle train (it holds metrics.jsonl)."
        )
    if not (run_dir / "metrics.jsonl").is_file():
        raise OptionError(
            f"{run_dir} holds no metrics.jsonl.",
            "pass a run folder written by upcycle train (run.output_dir); a run writes it from step 0 on.",
        )
    try:
        return read_metrics(run_dir)
    except ValueError as error:
        raise OptionError(
            f"{run_dir / 'metrics.jsonl'} is not JSON lines ({error}).", "pass a run folder written by upcycle train."
        ) from None


def plot_expert_load(
    run_dir: Path | str, out: Path | str | None = None, title: str | None = None, force: bool = False
) -> Path:
    """Draw RUN_DIR's expert load per layer over training into OUT (default: beside RUN_DIR); returns OUT.

    OUT may not lie in (or be, or contain) the run folder; an existing OUT is replaced only with ``force``,
    atomically, so it is never half written.
    """
    run_dir = Path(run_dir)
    load = read_expert_load(run_dir)
    out = Path(out) if out is not None else default_output(run_dir)
    refuse_overlap(out, [("the run folder", run_dir)], option="--out")
    refuse_existing(out, force, kind="file", option="--out")
    return draw_expert_load(load, out, title, force)


def grid_shape(layers: int) -> tuple[int, int]:
    """Rows and columns of small panels: one row up to 4 layers, then about twice as wide as tall (30 -> 4 x 8)."""
    columns = min(layers, max(4, math.ceil(math.sqrt(2 * layers))))
    return math.ceil(layers / columns), columns


def step_edges(steps: list[int]) -> list[float]:
    """Cell edges half-way between evaluations, so each column is as wide as the steps it stands for."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    middles = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    return [steps[0] - (middles[0] - steps[0]), *middles, steps[-1] + (steps[-1] - middles[-1])]


def draw_expert_load(load: ExpertLoad, out: Path, title: str | None = None, force: bool = False) -> Path:
    """The heatmaps and the imbalance panel as one PNG, written through a temporary sibling of OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = grid_shape(load.layers)
    row_inches = 2.0 if rows == 1 else 1.3  # a single row of panels gets room to read its cells
    fig = plt.figure(figsize=(max(7.0, 1.55 * columns + 1.4), row_inches * rows + 3.4), layout="constrained")
    grid = fig.add_gridspec(
        rows + 1, columns + 1, width_ratios=[1] * columns + [0.08], height_ratios=[row_inches] * rows + [2.3]
    )
    mesh = _draw_heatmaps(fig, grid, load, rows, columns)
    _draw_share_colorbar(fig, fig.add_subplot(grid[:rows, columns]), mesh, load.experts)
    _draw_imbalance(fig, grid, load, rows, columns)
    fig.suptitle(
        (title or f"Expert load per MoE layer: {load.run_dir.name}")
        + f"\nshare of held-out token assignments per expert at each evaluation ({load.experts} experts, "
        f"uniform = 1/{load.experts})",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out, force, dpi=110)


def _draw_heatmaps(fig: Any, grid: Any, load: ExpertLoad, rows: int, columns: int) -> Any:
    """One panel per layer on one colour scale: white is the uniform share, red more, blue less (0 is dead)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    uniform = 1 / load.experts
    top = max(2 * uniform, max(v for s in load.shares for layer in s for v in layer))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=top)
    x_edges = step_edges(load.steps)
    y_edges = [e - 0.5 for e in range(load.experts + 1)]
    mesh, first = None, None
    for layer in range(load.layers):
        ax = fig.add_subplot(grid[layer // columns, layer % columns], sharex=first, sharey=first)
        first = first or ax
        values = [[s[layer][e] for s in load.shares] for e in range(load.experts)]
        mesh = ax.pcolormesh(x_edges, y_edges, values, cmap="RdBu_r", norm=norm)
        ax.set_title(f"layer {layer}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6, length=2, pad=1)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        bottom, left = layer + columns >= load.layers, layer % columns == 0  # no panel below / first in its row
        ax.tick_params(labelbottom=bottom, labelleft=left)
        if left:
            ax.set_ylabel("expert", fontsize=7)
        if bottom:
            ax.set_xlabel("step", fontsize=7)
    return mesh


def _draw_share_colorbar(fig: Any, cax: Any, mesh: Any, experts: int) -> None:
    """The shared colour scale, with the uniform share 1/E marked on it as a black line."""
    bar = fig.colorbar(mesh, cax=cax)
    bar.ax.axhline(1 / experts, color="black", linewidth=1.2)
    bar.set_label(f"token share (line: 1/{experts})", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _draw_imbalance(fig: Any, grid: Any, load: ExpertLoad, rows: int, columns: int) -> None:
    """Max/mean share of every layer over the steps, and their mean; 1 is even, E is one expert taking all."""
    from matplotlib.ticker import MaxNLocator

    legend = load.layers <= LEGEND_LAYERS
    ax = fig.add_subplot(grid[rows, :] if legend else grid[rows, :columns])
    colour = _layer_colours(fig, grid, load.layers, rows, columns, legend)
    curves = [load.imbalance(layer) for layer in range(load.layers)]
    for layer, curve in enumerate(curves):
        label = f"layer {layer}" if legend else None
        ax.plot(
            load.steps, curve, color=colour(layer), linewidth=1, marker="o", markersize=2.5, label=label, alpha=0.85
        )
    means = [sum(values) / len(values) for values in zip(*curves, strict=True)]
    ax.plot(load.steps, means, color="black", linewidth=2, marker="o", markersize=3, label="mean over layers")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="even (1)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("max / mean share", fontsize=8)
    ax.set_title("load imbalance per layer (max expert share / mean share)", fontsize=8, pad=3)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=3 if legend else 2)


def _layer_colours(fig: Any, grid: Any, layers: int, rows: int, columns: int, legend: bool) -> Any:
    """Distinct colours for a legend of a few layers; for many, colour by depth with a colour bar for it."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if legend:
        return lambda layer: plt.get_cmap("tab10")(layer)
    depth, cmap = Normalize(vmin=0, vmax=layers - 1), plt.get_cmap("viridis")
    bar = fig.colorbar(ScalarMappable(depth, cmap), cax=fig.add_subplot(grid[rows, columns]))
    bar.set_label("layer", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return lambda layer: cmap(depth(layer))
