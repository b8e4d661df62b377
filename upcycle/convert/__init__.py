"""Dense → MoE conversion: plan it from headers and config, then stream it into a native HF checkpoint.

`upcycle.upcycling.convert` runs a whole conversion (plan, write, check the written folder, publish); this package
holds its parts below the checks. The options import alone (no torch): a recipe's ``model.upcycle`` is
:class:`UpcycleOptions`, and reading a recipe must stay quick. ``build_plan`` and ``UpcyclePlan`` load on first use.
"""

from __future__ import annotations

from typing import Any

from upcycle.convert.options import UpcycleOptions


def __getattr__(name: str) -> Any:
    """``UpcyclePlan`` and ``build_plan``, imported on first use (they bring torch)."""
    if name in ("UpcyclePlan", "build_plan"):
        from upcycle.convert import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["UpcycleOptions", "UpcyclePlan", "build_plan"]
