"""A sweep's grid: ``--grid KEY=v1,v2,...`` axes, combined as a cartesian product or zipped.

Each value is handed to the recipe as ``KEY=value`` text, exactly as ``--set`` takes it, so ``1e-4``, ``null``,
``[0.8,0.9]`` and ``{experts: 4}`` mean here what they mean there and are checked by the same code. Values are
separated by top-level commas: a comma inside brackets, braces or quotes belongs to its value. Keys are checked
here, before any recipe is read, with the rules (and the did-you-mean) of ``--set``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from upcycle.errors import OptionError
from upcycle.train.overrides import split_override

SWEEP_OWNED = {
    "run.output_dir": "every run gets its own folder under --out/runs",
    "run.checkpoints": "a sweep's runs keep checkpoints until they finish, so a killed sweep resumes",
    "run.keep_checkpoints": "a sweep's runs keep their latest checkpoint only, and none once finished",
    "run.export": "a sweep measures; it exports no model",
    "run.tensorboard": "a sweep measures; metrics.jsonl holds every number",
    "run.log_interval": "the table's throughput needs every step's record",
}
"""Keys the sweep sets itself on every run, so a grid (or --set) over them would be overruled: refused."""


@dataclass(frozen=True)
class Axis:
    """One swept key and its values, as typed (``optim.lr`` and ``("1e-4", "3e-4")``)."""

    key: str
    texts: tuple[str, ...]

    def override(self, index: int) -> str:
        """The value at ``index`` as a ``--set`` override."""
        return f"{self.key}={self.texts[index]}"


def split_values(text: str) -> list[str]:
    """``1e-4,[0.8,0.9],'a,b'`` -> ``["1e-4", "[0.8,0.9]", "'a,b'"]``: commas split only outside brackets and quotes."""
    values, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and not "".join(current).strip():  # YAML quotes a value only from its start
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_axis(text: str) -> Axis:
    """``KEY=v1,v2,...`` as an :class:`Axis`; the key is checked against the recipe's keys, the values counted."""
    key, values = split_override(text, option="--grid")
    if key in SWEEP_OWNED:
        raise OptionError(f"--grid {key}: the sweep sets {key} itself ({SWEEP_OWNED[key]}).", "sweep another key.")
    texts = split_values(values)
    if not values.strip() or any(not t for t in texts):
        raise OptionError(
            f"--grid {text!r} has an empty value.", f"list values separated by commas, e.g. --grid {key}=1e-4,3e-4."
        )
    return Axis(key, tuple(texts))


def combine(axes: Sequence[Axis], zip_axes: bool = False) -> list[tuple[str, ...]]:
    """The grid's points, each as its ``--set`` overrides (one per axis, in axis order).

    The cartesian product varies the last axis fastest; ``zip_axes`` pairs the i-th values of every axis instead,
    and needs axes of equal length. No axis at all is one point: the recipe as it is.
    """
    keys = [a.key for a in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        key = repeated[0]
        raise OptionError(f"--grid {key} is given twice.", f"list all its values in one --grid {key}=...")
    if zip_axes:
        lengths = {a.key: len(a.texts) for a in axes}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise OptionError(
                f"--zip pairs the i-th values of every --grid, so each needs as many values: {shown}.",
                "give every --grid the same number of values, or drop --zip for every combination.",
            )
        count = len(axes[0].texts) if axes else 1
        return [tuple(a.override(i) for a in axes) for i in range(count)]
    return [
        tuple(a.override(i) for a, i in zip(axes, indices, strict=True))
        for indices in itertools.product(*(range(len(a.texts)) for a in axes))
    ]
