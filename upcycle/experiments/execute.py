"""Running a sweep's plan: every run at once (seeds ``all``), or in two rounds (seeds ``best``).

With ``best`` the second round depends on the first: the setting with the lowest held-out loss at the first seed
is the one that earns the other seeds, so the rounds are run one after the other (each round's runs side by side
with ``--parallel``).
"""

from __future__ import annotations

from collections.abc import Callable

from upcycle.experiments.runner import Runner
from upcycle.experiments.sweep_plan import SweepPlan


def run_plan(plan: SweepPlan, runner: Runner, echo: Callable[[str], None]) -> None:
    """Execute every run of ``plan`` through ``runner`` (finished runs reused, interrupted ones resumed)."""
    if not plan.best_only:
        runner.run_all(plan.specs())
        return
    runner.run_all(plan.first())
    best = plan.best()
    more = plan.then(best)
    assert plan.seeds is not None
    echo(f"best at seed {plan.seeds[0]}: {best.name}; running it with {len(plan.seeds) - 1} more seed(s)")
    runner.run_all(more)
