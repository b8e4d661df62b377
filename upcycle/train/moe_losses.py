"""Router-side training terms for every native MoE class: load-balancing aux loss, z-loss, token dropping.

transformers adds an aux loss only for some classes and only with `output_router_logits=True` (DeepSeek-style
classes such as Glm4-MoE and Dots1 compute none), so upcycle computes these itself from a forward hook on each
MoE block's router. Every router returns `(logits_TE, weights_TK, index_TK)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The router of every sparse block: the `gate` of any module that also holds `experts`."""
    return [
        (f"{name}.gate", module.gate)
        for name, module in model.named_modules()
        if hasattr(module, "experts") and isinstance(getattr(module, "gate", None), nn.Module)
    ]


@dataclass
class RouterRecord:
    logits_TE: torch.Tensor
    index_TK: torch.Tensor


@dataclass
class RouterTaps:
    """Hooks that record each router's output for the losses and may drop tokens beyond expert capacity."""

    model: nn.Module
    capacity_factor: float | None = None
    records: list[RouterRecord] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routers = find_routers(self.model)
        for _, router in self.routers:
            self._handles.append(router.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        logits_TE, weights_TK, index_TK = output[0], output[1], output[2]
        self.records.append(RouterRecord(logits_TE, index_TK))
        if self.capacity_factor is None or not module.training:
            return None
        keep_TK = within_capacity(index_TK, logits_TE.shape[-1], self.capacity_factor)
        return (logits_TE, weights_TK * keep_TK.to(weights_TK.dtype), index_TK, *output[3:])

    def clear(self) -> None:
        self.records.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def within_capacity(index_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """True for assignments kept: each expert takes at most ceil(cf*T*k/E), first choices first, then by token."""
    tokens, k = index_TK.shape
    capacity = math.ceil(capacity_factor * tokens * k / num_experts)
    order_S = index_TK.t().reshape(-1)  # priority: all first choices (in token order), then all second choices
    one_hot_SE = torch.nn.functional.one_hot(order_S, num_experts)
    position_S = (one_hot_SE.cumsum(0) * one_hot_SE).sum(-1) - 1
    return (position_S < capacity).view(k, tokens).t()


def _counts(index_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert; scatter_add, unlike bincount, needs no host sync on a GPU."""
    flat = index_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def aux_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Switch-style load balancing, E * sum_e f_e * P_e, averaged over layers: 1.0 when perfectly balanced."""
    losses = []
    for record in records:
        num_experts = record.logits_TE.shape[-1]
        probs_E = record.logits_TE.float().softmax(-1).mean(0)
        counts_E = _counts(record.index_TK, num_experts).to(probs_E.dtype)
        fraction_E = counts_E / record.index_TK.numel()
        losses.append(num_experts * (fraction_E * probs_E).sum())
    return torch.stack(losses).mean()


def z_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the router logits, averaged over layers."""
    return torch.stack([r.logits_TE.float().logsumexp(-1).square().mean() for r in records]).mean()


def expert_load(records: list[RouterRecord]) -> list[list[float]]:
    """Per layer, the fraction of token assignments each expert received."""
    loads = []
    for record in records:
        counts = _counts(record.index_TK, record.logits_TE.shape[-1]).double()
        loads.append((counts / counts.sum()).tolist())
    return loads
