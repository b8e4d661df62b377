"""The parallel layout of a training run: how its ranks split the batch, the dense weights and the experts.

A layout is resolved once, from the recipe's ``parallel:`` section, the world size and the model's expert count,
and is checked before any weight is read. It is applied by transformers' own engine
(``from_pretrained(..., distributed_config=...)``): FSDP2 over ``fsdp`` ranks, HSDP over ``replicate`` copies
(one per node), and expert parallelism over ``ep`` ranks, each owning ``E / ep`` whole experts that its tokens reach
by all-to-all. The remaining ``fsdp / ep`` ranks that own the same experts shard them again ("expert FSDP").

Rank order follows transformers' meshes: dense ``(replicate, fsdp)``, experts ``(replicate, efsdp, ep)``, the last
dimension fastest; so rank ``r`` owns the experts of EP coordinate ``r % ep``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from upcycle.errors import OptionError


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism; ``replicate * fsdp * tp == world_size`` and ``ep`` divides ``fsdp * tp``."""

    world_size: int
    replicate: int = 1
    fsdp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def efsdp(self) -> int:
        """Ranks that own the same experts and shard them between each other (within one replica)."""
        return self.fsdp * self.tp // self.ep

    @property
    def data_parallel(self) -> int:
        """Ranks that each see a distinct batch."""
        return self.replicate * self.fsdp

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"efsdp": self.efsdp}

    def distributed_config(self, mixed_precision: bool) -> Any:
        """transformers' DistributedConfig for this layout; tokens reach the experts by all-to-all."""
        from transformers.distributed import DistributedConfig

        kwargs: dict[str, Any] = {"fsdp_size": self.fsdp, "fsdp_mixed_precision": mixed_precision}
        if self.replicate > 1:
            kwargs["dp_replicate_size"] = self.replicate
        if self.ep > 1:
            kwargs |= {"ep_size": self.ep, "ep_implementation": "all_to_all"}
        return DistributedConfig(**kwargs)

    def experts_of_rank(self, rank: int, num_experts: int) -> range:
        """The global expert ids whose weights rank `rank` holds (a slice of each of their rows under expert FSDP)."""
        per_rank = num_experts // self.ep
        coordinate = rank % self.ep
        return range(coordinate * per_rank, (coordinate + 1) * per_rank)

    def describe(self, num_experts: int | None) -> list[str]:
        """Lines for the start of a run: the group sizes, and which rank holds which experts."""
        lines = [
            f"layout: {self.world_size} rank(s) = replicate {self.replicate} x fsdp {self.fsdp} x tp {self.tp}; "
            f"{self.data_parallel} distinct batch(es) per micro-step"
        ]
        if num_experts:
            lines.append(
                f"experts: {num_experts} per layer, ep {self.ep} x expert-fsdp {self.efsdp} x replicate "
                f"{self.replicate} -> {num_experts // self.ep} whole expert(s) per rank"
                + (f", each sharded {self.efsdp} ways" if self.efsdp > 1 else "")
            )
            if self.ep > 1:
                owners = [f"rank {r}: {_span(self.experts_of_rank(r, num_experts))}" for r in range(self.world_size)]
                shown = owners if len(owners) <= 16 else [*owners[:8], f"... ({len(owners) - 16} more)", *owners[-8:]]
                lines.append("expert owners: " + "; ".join(shown))
        return lines


def _span(ids: range) -> str:
    return f"E{ids.start}" if len(ids) == 1 else f"E{ids.start}-E{ids.stop - 1}"


def engine_missing(layout: Layout) -> str | None:
    """Why this transformers cannot lay out `layout` (None when it can, or when one rank needs no engine)."""
    if not layout.sharded or engine_available():
        return None
    import transformers

    if layout.ep > 1 or layout.replicate > 1:
        return (
            f"transformers {transformers.__version__} has no expert parallelism or HSDP in its distributed engine "
            "(transformers.distributed.DistributedConfig has no ep_size / dp_replicate_size)"
        )
    return None


def engine_available() -> bool:
    """Whether transformers can shard a model at load time with FSDP2, HSDP and expert parallelism."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    return {"ep_size", "dp_replicate_size", "ep_implementation"} <= fields


def resolve_layout(parallel: Any, world_size: int, num_experts: int | None) -> Layout:
    """The layout the recipe's ``parallel:`` section asks for on `world_size` ranks, or one clear refusal.

    ``fsdp`` left unset takes every rank the other degrees leave; ``ep`` must divide the expert count and the
    ranks of one replica.
    """
    replicate, tp, ep = parallel.replicate, parallel.tp, parallel.ep
    if tp != 1:
        raise OptionError(
            f"parallel.tp={tp}: tensor parallelism is not part of upcycle's training loop (its data ranks and "
            "metrics assume every rank holds its own batch).",
            "set parallel.tp: 1 and shard with parallel.fsdp / parallel.ep instead.",
        )
    if world_size % replicate:
        raise OptionError(
            f"parallel.replicate={replicate} does not divide the {world_size} rank(s) launched.",
            f"launch a multiple of {replicate} ranks (e.g. {replicate} nodes x N), or set parallel.replicate to a "
            f"divisor of {world_size}.",
        )
    fsdp = parallel.fsdp if parallel.fsdp is not None else world_size // (replicate * tp)
    if replicate * fsdp * tp != world_size:
        raise OptionError(
            f"parallel.replicate={replicate} x parallel.fsdp={fsdp} x parallel.tp={tp} = {replicate * fsdp * tp} "
            f"rank(s), but {world_size} were launched.",
            f"leave parallel.fsdp unset (it then takes {world_size // (replicate * tp)}), or launch "
            f"{replicate * fsdp * tp} ranks.",
        )
    if ep > 1:
        if not num_experts:
            raise OptionError(
                f"parallel.ep={ep} but the model has no routed experts to place.",
                "set parallel.ep: 1 for a dense model.",
            )
        if num_experts % ep:
            raise OptionError(
                f"parallel.ep={ep} does not divide the model's {num_experts} experts per layer.",
                f"choose parallel.ep among {_divisors(num_experts, fsdp * tp)}.",
            )
        if (fsdp * tp) % ep:
            raise OptionError(
                f"parallel.ep={ep} does not divide the {fsdp * tp} rank(s) of one replica (fsdp {fsdp} x tp {tp}).",
                f"choose parallel.ep among {_divisors(num_experts, fsdp * tp)}, or launch a multiple of {ep} ranks "
                "per replica.",
            )
    layout = Layout(world_size, replicate, fsdp, tp, ep)
    if reason := engine_missing(layout):
        raise OptionError(
            f"parallel layout {layout.as_dict()} needs transformers' distributed engine, but {reason}.",
            "upgrade transformers (5.24 or newer has expert parallelism and HSDP), or set parallel.ep: 1 and "
            "parallel.replicate: 1.",
        )
    return layout


def _divisors(num_experts: int, ranks: int) -> str:
    options = [d for d in range(1, max(num_experts, 1) + 1) if num_experts % d == 0 and ranks % d == 0]
    return ", ".join(map(str, options))
