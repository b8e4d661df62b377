"""Router-side training terms for every native MoE class: load-balancing aux loss, z-loss, token dropping.

transformers adds an aux loss only for some classes and only with `output_router_logits=True` (DeepSeek-style
classes such as Glm4-MoE and Dots1 compute none), so upcycle computes these itself from a forward hook on each
MoE block's router. Every router returns `(logits_TE, weights_TK, index_TK)`.

Convention (Megatron-Core, the paper's implementation): each MoE layer's load-balancing loss is
E * sum_e f_e * P_e (1.0 when perfectly balanced) and the coefficient applies to every layer, so the loss added to
the LM loss is coef * (sum over layers); likewise the z-loss. P_e is the router's mean probability for expert e:
the softmax of the logits for softmax routers, and for sigmoid-scored routers (Glm4-MoE, Dots1) the sigmoid scores
normalised over the experts (DeepSeek-V3's sequence-wise balance loss uses the same normalised scores).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from upcycle.hf.moe_modules import moe_blocks, router_of
from upcycle.train.token_dropping import SentinelSupport, within_capacity


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The router of every sparse block (see upcycle.hf.moe_modules)."""
    return [(f"{name}.gate", router_of(module)) for name, module in moe_blocks(model)]


def router_layers(routers: list[tuple[str, nn.Module]]) -> list[int | None]:
    """The decoder layer index of each router, in model order, from its module name (None if it names none)."""
    found = [re.search(r"(?:^|\.)layers\.(\d+)\.", name) for name, _ in routers]
    return [int(match.group(1)) if match else None for match in found]


@dataclass
class RouterRecord:
    logits_TE: torch.Tensor
    index_TK: torch.Tensor
    sigmoid: bool = False  # the router scores experts with a sigmoid (DeepSeek-style), not a softmax
    kept_TK: torch.Tensor | None = None  # assignments kept within the capacity factor (None: dropless)

    def probabilities_TE(self) -> torch.Tensor:
        logits = self.logits_TE.float()
        if self.sigmoid:
            scores = logits.sigmoid()
            return scores / scores.sum(-1, keepdim=True)
        return logits.softmax(-1)


def is_sigmoid_router(router: nn.Module) -> bool:
    """DeepSeek-style routers (Glm4-MoE, Dots1) score with a sigmoid and carry a score-correction bias."""
    return hasattr(router, "e_score_correction_bias")


@dataclass
class RouterTaps:
    """Hooks that record each router's output for the losses and may drop tokens beyond expert capacity."""

    model: nn.Module
    capacity_factor: float | None = None
    count: bool = False  # accumulate assignments per expert over a step (for score-bias balancing)
    skip_dropped: bool = True  # False: dropped assignments are computed with weight zero (the same gradients)
    say: Callable[[str], None] | None = None  # told once per experts class whether dropping saves its compute
    records: list[RouterRecord] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routers = find_routers(self.model)
        self.counts_LE: torch.Tensor | None = None
        self._experts = {id(router_of(block)): block.experts for _, block in moe_blocks(self.model)}
        self._sentinels = SentinelSupport(self.say)
        for _, router in self.routers:
            self._handles.append(router.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        logits_TE, weights_TK, index_TK = output[0], output[1], output[2]
        record = RouterRecord(logits_TE, index_TK, is_sigmoid_router(module))
        self.records.append(record)
        if self.capacity_factor is None or not module.training:
            return None
        num_experts = logits_TE.shape[-1]
        kept_TK = record.kept_TK = within_capacity(index_TK, num_experts, self.capacity_factor)
        routed_TK = index_TK
        experts = self._experts.get(id(module))
        if self.skip_dropped and experts is not None:
            hidden_TH = args[0].reshape(-1, args[0].shape[-1])
            if self._sentinels.skips(experts, hidden_TH, num_experts, index_TK.shape[-1]):
                routed_TK = index_TK.masked_fill(~kept_TK, num_experts)  # the sentinel: not computed at all
        return (logits_TE, weights_TK * kept_TK.to(weights_TK.dtype), routed_TK, *output[3:])

    def clear(self) -> None:
        self.records.clear()

    def count_assignments(self) -> None:
        """Add this micro-batch's token-to-expert assignments (training forwards only) to the step's counts."""
        if not self.count or not self.records:
            return
        counts = torch.stack([_counts(r.index_TK, r.logits_TE.shape[-1]) for r in self.records])
        self.counts_LE = counts if self.counts_LE is None else self.counts_LE + counts

    def reset_counts(self) -> None:
        self.counts_LE = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _counts(index_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert; scatter_add, unlike bincount, needs no host sync on a GPU."""
    flat = index_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def aux_losses(records: list[RouterRecord]) -> torch.Tensor:
    """Per layer, Switch-style load balancing E * sum_e f_e * P_e: 1.0 when perfectly balanced."""
    losses = []
    for record in records:
        num_experts = record.logits_TE.shape[-1]
        probs_E = record.probabilities_TE().mean(0)
        counts_E = _counts(record.index_TK, num_experts).to(probs_E.dtype)
        fraction_E = counts_E / record.index_TK.numel()
        losses.append(num_experts * (fraction_E * probs_E).sum())
    return torch.stack(losses)


def aux_loss(records: list[RouterRecord]) -> torch.Tensor:
    """The load-balancing loss the coefficient multiplies: the sum over MoE layers (Megatron-Core's convention)."""
    return aux_losses(records).sum()


def z_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of each layer's router logits, summed over layers."""
    return torch.stack([r.logits_TE.float().logsumexp(-1).square().mean() for r in records]).sum()


def dropped_fractions(records: list[RouterRecord]) -> torch.Tensor | None:
    """Per MoE layer, the fraction of token-to-expert assignments its capacity dropped (None when dropless).

    Per layer because capacity bites unevenly: a layer whose router is skewed drops far more than the mean shows.
    """
    kept = [r.kept_TK for r in records if r.kept_TK is not None]
    if not kept:
        return None
    return 1.0 - torch.stack([k.float().mean() for k in kept])


def dropped_fraction(records: list[RouterRecord]) -> torch.Tensor | None:
    """The fraction of token-to-expert assignments dropped, averaged over MoE layers (None when dropless)."""
    per_layer = dropped_fractions(records)
    return None if per_layer is None else per_layer.mean()


def update_score_biases(taps: RouterTaps, rate: float, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): each sigmoid router's score-correction bias moves by `rate` towards
    balance, + for experts below the mean load of the step, - above; `reduce` sums the counts over ranks."""
    if taps.counts_LE is None:
        return
    counts_LE = reduce(taps.counts_LE.double())
    for (_, router), counts_E in zip(taps.routers, counts_LE, strict=True):
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is None:
            continue
        step_E = torch.sign(counts_E.mean() - counts_E).to(bias.device, bias.dtype) * rate
        with torch.no_grad():
            bias.add_(step_E)


def expert_counts(records: list[RouterRecord], tokens: int) -> torch.Tensor:
    """[L, E] assignments per expert among the first `tokens` tokens of the batch (rows flatten batch-major, so
    these are its first rows: a padded evaluation batch counts only its real sequences)."""
    return torch.stack([_counts(r.index_TK[:tokens], r.logits_TE.shape[-1]) for r in records]).cpu()
