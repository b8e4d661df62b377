"""Capacity factors: which assignments each expert keeps, and dropping the rest before the experts compute them.

An expert keeps at most ceil(cf * T * k / E) assignments of a batch, first choices first, then by token
(`within_capacity`). A dropped assignment gets routing weight zero (so the loss and every gradient are what they
would be had it never been routed) and, where the experts module can skip it, the index E: an expert-parallel
sentinel, which upcycle's Triton experts and transformers' `grouped_mm` and eager experts exclude from the
grouped product instead of computing it and multiplying by zero. Whether a module skips sentinels is not assumed
from a version number: the first time, a two-token probe compares it with the zero-weight route, and a module
that errs or differs keeps computing its dropped assignments (said once).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def within_capacity(index_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """True for assignments kept: each expert takes at most ceil(cf*T*k/E), first choices first, then by token."""
    tokens, k = index_TK.shape
    capacity = math.ceil(capacity_factor * tokens * k / num_experts)
    order_S = index_TK.t().reshape(-1)  # priority: all first choices (in token order), then all second choices
    one_hot_SE = torch.nn.functional.one_hot(order_S, num_experts)
    position_S = (one_hot_SE.cumsum(0) * one_hot_SE).sum(-1) - 1
    return (position_S < capacity).view(k, tokens).t()


class SentinelSupport:
    """Per experts module: does it skip an assignment whose index is E (checked once, by a probe)?"""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self._known: dict[int, bool] = {}
        self._said: set[str] = set()
        self._say = say

    def skips(self, experts: nn.Module, hidden_TH: torch.Tensor, num_experts: int, k: int) -> bool:
        key = id(experts)
        if key not in self._known:
            expert_parallel = getattr(experts, "_is_expert_parallel", False) and not getattr(
                experts, "_upcycle_sentinels", False
            )
            if expert_parallel:  # the all-to-all sends by global expert id: a sentinel has nowhere to go
                self._known[key], why = False, "with expert parallelism every assignment crosses the all-to-all"
            else:
                self._known[key], why = _probe(experts, hidden_TH, num_experts, k), "its probe failed"
            self._tell(experts, self._known[key], why)
        return self._known[key]

    def _tell(self, experts: nn.Module, skips: bool, why: str) -> None:
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
        what = f"{type(experts).__name__} ({implementation})"
        if what in self._said or self._say is None:
            return
        self._said.add(what)
        if skips:
            self._say(f"capacity: dropped assignments skip the expert compute in {what}")
        else:
            self._say(
                f"capacity: {what} cannot skip a dropped assignment ({why}): it is still computed, with routing "
                "weight zero (the same loss and gradients, no saving)"
            )


def _probe(experts: nn.Module, hidden_TH: torch.Tensor, num_experts: int, k: int) -> bool:
    """Two tokens through the module with one assignment dropped both ways: by zero weight, and by the sentinel with
    its weight left in place. A module that skips the sentinel ignores that weight; one that clamps the index and
    computes the assignment (then weighs it) does not, and is not trusted to skip."""
    told = getattr(experts, "_is_expert_parallel", None)
    if told is False:
        experts._is_expert_parallel = True  # transformers masks sentinels in grouped_mm/batched_mm only when told
    x_TH = hidden_TH[:2].detach()
    index_TK = torch.arange(2 * k, device=x_TH.device).remainder(num_experts).view(2, k)
    weights_TK = torch.full((2, k), 1.0 / k, device=x_TH.device, dtype=x_TH.dtype)
    dropped_TK = torch.zeros_like(index_TK, dtype=torch.bool)
    dropped_TK[1, 0] = True
    try:
        with torch.no_grad():
            zeroed = experts(x_TH, index_TK, weights_TK.masked_fill(dropped_TK, 0))
            skipped = experts(x_TH, index_TK.masked_fill(dropped_TK, num_experts), weights_TK)
        scale = zeroed.abs().max().clamp_min(1e-30)
        skips = bool(torch.isfinite(skipped).all() and ((skipped - zeroed).abs().max() / scale) < 1e-3)
    except (IndexError, RuntimeError, ValueError):
        skips = False
    if told is False:
        experts._is_expert_parallel = skips
        experts._upcycle_sentinels = skips  # set here, not by expert parallelism
    return skips
