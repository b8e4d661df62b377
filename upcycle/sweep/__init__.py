"""Sweep any recipe key: train a recipe at every point of a grid, each run in its own process, and compare them.

``upcycle sweep RECIPE --grid optim.lr=1e-4,3e-4,1e-3 [--grid moe.capacity_factor=null,1.25] [--zip]
[--seeds N] [--with-dense]`` trains the recipe once per point of the grid (the cartesian product of the values,
or with ``--zip`` the i-th values together) and seed, plus the dense control when asked, then reports what
``upcycle compare`` reports, with compare's own analysis: held-out loss and perplexity at equal tokens and at
equal FLOPs, tokens/s, mean ± std over seeds, the best setting marked; a PNG per swept key (held-out loss
against the key, and the loss curves) and the whole as JSON.

Any key a recipe has can be swept, the conversion options included (``model.upcycle.experts=2,4,8``: each value
converted once into the verified cache). Values are YAML, exactly as ``--set`` takes them, and every point is
validated as a recipe before the first run. Each run lives in ``OUT/runs/<point>,seed=<seed>`` and runs in its
own process; a sweep run again continues where it stopped: finished runs are reused, the interrupted run resumes
from its latest checkpoint.

The modules, in the order a sweep uses them: :mod:`~upcycle.sweep.grid` (the ``--grid`` axes and their
combination), :mod:`~upcycle.sweep.points` (each point as a validated recipe) with
:mod:`~upcycle.sweep.control` (the dense control), :mod:`~upcycle.sweep.naming` (run folders),
:mod:`~upcycle.sweep.plan` (the runs, as compare's run specs, executed by compare's runner),
:mod:`~upcycle.sweep.analysis` and :mod:`~upcycle.sweep.render` (table and plots, on compare's),
:mod:`~upcycle.sweep.main` (the command).
"""

from __future__ import annotations

from upcycle.sweep.analysis import summarise_sweep
from upcycle.sweep.grid import Axis, combine, parse_axis, split_values
from upcycle.sweep.naming import label, run_name, safe_name, value_text, variant_name
from upcycle.sweep.plan import SweepPlan, sweep_run
from upcycle.sweep.points import Point, grid_points, recipe_value
from upcycle.sweep.render import key_plot_path, plot_key, sweep_table

_COMMAND = ("SWEEP_NAMES", "SweepResult", "default_out", "sweep_main")


def __getattr__(name: str) -> object:
    """The command's names load on first use: the command builds on upcycle.compare, which builds on the points."""
    if name in _COMMAND:
        from upcycle.sweep import main

        return getattr(main, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SWEEP_NAMES",
    "Axis",
    "Point",
    "SweepPlan",
    "SweepResult",
    "combine",
    "default_out",
    "grid_points",
    "key_plot_path",
    "label",
    "parse_axis",
    "plot_key",
    "recipe_value",
    "run_name",
    "safe_name",
    "split_values",
    "summarise_sweep",
    "sweep_main",
    "sweep_run",
    "sweep_table",
    "value_text",
    "variant_name",
]
