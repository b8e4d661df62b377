"""TensorRecipe: how one output tensor is made from the dense source, as plain data.

The same recipe is executed by the writer and re-executed by `verify`, so the mapping from dense to MoE
tensors exists exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Literal

Op = Literal["copy", "expert", "router", "zeros", "stack"]
DtypeOf = Callable[[str], str]  # a source tensor's name -> the dtype code of what is made from it


@dataclass(frozen=True)
class TensorRecipe:
    name: str  # output tensor name, in the target's on-disk (per-expert) layout
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code of the output, e.g. "BF16"
    op: Op
    source: str | None = None  # dense tensor it derives from
    source_rows: tuple[int, int] | None = None  # the dense tensor's rows within a fused source (Phi-3's qkv_proj)
    rows: tuple[int, int] | None = None  # slice of source dim 0 (gate/up shard of a virtual group)
    cols: tuple[int, int] | None = None  # slice of source dim 1 (down shard)
    scale: float = 1.0
    drop_ratio: float = 0.0  # Drop-Upcycling: fraction of this expert's neurons re-drawn
    drop_axis: int = 0  # axis of the intermediate neurons: 0 for gate/up, 1 for down
    drop_key: str = ""  # names the expert: its gate, up and down re-draw the same neurons
    noise: float = 0.0  # Gaussian noise std relative to the source tensor's std
    router_init: str = ""  # random | zero | cluster | hidden | given (a merge's rows; `rows` picks them)
    router_std: float = 0.0
    calibration: str = (
        ""  # router_init cluster, hidden or given: the cache key of its rows (upcycle.convert.calibration)
    )
    neuron_order: str = ""  # --split activation: the cache key of the neuron permutation applied before slicing
    group_size: int = 1  # router rows tied in groups of this size (virtual groups)
    seed: int = 0
    layer: int = -1
    expert: int = -1
    projection: str = ""  # gate | up | down for expert tensors
    # op "stack": every expert's tensors in one [E, ...] tensor (classes that store experts stacked); each expert's
    # block is its `parts` (per-expert recipes, len(parts) / E of them) concatenated along dim 0. Parts may also be
    # single rows of a source (growing repeats a router's rows): the stack is reshaped to `shape`.
    parts: tuple[TensorRecipe, ...] = ()

    @property
    def is_verbatim(self) -> bool:
        """True when the output is the source (or its slice) unchanged apart from dtype."""
        return self.op == "copy" or (
            self.op == "expert" and self.scale == 1.0 and not self.drop_ratio and not self.noise
        )

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if v != _DEFAULTS[k] or k in ("name", "shape", "dtype")}
        data["op"] = self.op
        if self.parts:
            data["parts"] = [part.to_json() for part in self.parts]
        return data

    @classmethod
    def from_json(cls, data: dict) -> TensorRecipe:
        values = dict(data)
        values["shape"] = tuple(values["shape"])
        values["parts"] = tuple(cls.from_json(part) for part in values.get("parts", ()))
        for key in ("rows", "cols", "source_rows"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


_DEFAULTS = {f.name: f.default for f in fields(TensorRecipe)}


def derive_seed(seed: int, key: str) -> int:
    """A stable per-tensor seed, so any single tensor can be re-made without replaying the others."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
