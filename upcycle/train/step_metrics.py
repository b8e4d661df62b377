"""A training step's metrics: the language-model loss and the router terms, by name, summed and reduced as one.

The terms stay device tensors until the end of the step, so the device never waits for the host between
micro-batches; then they travel as one tensor (`StepMetrics.pack`), with the gradient norm, through a single
all-reduce and a single host read (`mean_over_ranks`), and come back by name (`StepMetrics.unpack`). Packing and
unpacking are the only places that know the order of the terms in that tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from upcycle.train.distributed import Dist, all_reduce_sum


@dataclass(frozen=True)
class StepMetrics:
    """The terms of a micro-batch (summed over a step's micro-batches, then averaged over them and the ranks).

    The router terms are measured whatever their coefficients (for the log); a dense model has no MoE layer (L = 0)
    and zeros for them. `dropped_per_layer_L` is None when routing is dropless (no capacity factor).
    """

    lm: torch.Tensor  # [] language-model loss
    aux: torch.Tensor  # [] load-balancing loss, summed over the MoE layers
    z: torch.Tensor  # [] router z-loss, summed over the MoE layers
    dropped: torch.Tensor  # [] fraction of assignments dropped, the mean over MoE layers (0 when dropless)
    aux_per_layer_L: torch.Tensor  # [L] load-balancing loss of each MoE layer
    dropped_per_layer_L: torch.Tensor | None  # [L] fraction dropped by each MoE layer's capacity

    def _terms(self) -> list[torch.Tensor]:
        """The terms in their packed order."""
        terms = [self.lm, self.aux, self.z, self.dropped, self.aux_per_layer_L]
        return terms if self.dropped_per_layer_L is None else [*terms, self.dropped_per_layer_L]

    def pack(self) -> torch.Tensor:
        """Every term in one 1-D tensor on their device: [lm, aux, z, dropped, aux per layer, dropped per layer]."""
        return torch.cat([term.reshape(-1) for term in self._terms()])

    def unpack(self, packed: torch.Tensor) -> StepMetrics:
        """The terms of `packed` (laid out as `self.pack()` lays out this step's terms) by name again."""
        terms = self._terms()
        parts = [
            part.reshape(term.shape) for part, term in zip(packed.split([t.numel() for t in terms]), terms, strict=True)
        ]
        lm, aux, z, dropped, aux_L = parts[:5]
        return StepMetrics(lm, aux, z, dropped, aux_L, parts[5] if self.dropped_per_layer_L is not None else None)

    def __add__(self, other: StepMetrics) -> StepMetrics:
        """Term by term: a step's sum over its micro-batches."""
        dropped_L = self.dropped_per_layer_L
        if dropped_L is not None:
            assert other.dropped_per_layer_L is not None, "the micro-batches of a step drop alike"
            dropped_L = dropped_L + other.dropped_per_layer_L
        return StepMetrics(
            self.lm + other.lm,
            self.aux + other.aux,
            self.z + other.z,
            self.dropped + other.dropped,
            self.aux_per_layer_L + other.aux_per_layer_L,
            dropped_L,
        )

    def per_layer_record(self) -> dict[str, Any]:
        """The per-layer fields of a train record (host values): none for a dense model, dropping only with a
        capacity factor."""
        if not self.aux_per_layer_L.numel():
            return {}
        record: dict[str, Any] = {"aux_loss_per_layer": [round(v, 6) for v in self.aux_per_layer_L.tolist()]}
        if self.dropped_per_layer_L is not None:
            record["dropped_fraction"] = self.dropped.item()
            record["dropped_fraction_per_layer"] = [round(v, 6) for v in self.dropped_per_layer_L.tolist()]
        return record


def mean_over_ranks(
    sums: StepMetrics, micro_batches: int, grad_norm: torch.Tensor, info: Dist
) -> tuple[StepMetrics, float]:
    """The step's terms averaged over its micro-batches and the ranks (float64, on the host), and the gradient
    norm (already global; its mean over ranks is itself): one all-reduce, one host read per step."""
    local = torch.cat([sums.pack().double() / micro_batches, grad_norm.detach().double().reshape(1)])
    total = all_reduce_sum(local, info).cpu()
    terms, norm = total.split([total.numel() - 1, 1])  # the gradient norm travels last
    return sums.unpack(terms / info.world_size), norm.item() / info.world_size
