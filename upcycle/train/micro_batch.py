"""One micro-batch's forward and backward, with the MoE terms really applied to the loss."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from upcycle.train import moe_losses
from upcycle.train.recipe import TrainRecipe
from upcycle.train.step_metrics import StepMetrics


def run_micro_batch(
    model: nn.Module,
    taps: moe_losses.RouterTaps,
    batch_BS: torch.Tensor,
    recipe: TrainRecipe,
    scale: float,
    autocast: contextlib.AbstractContextManager,
) -> StepMetrics:
    """Forward and backward of one micro-batch, the loss scaled so accumulated gradients are a mean.

    The metrics come back detached, on the device: reading them is left to the end of the step, so the device
    never waits for the host in between. The router terms are computed (for the log) whatever their
    coefficients; they reach the loss only with a coefficient.
    """
    taps.clear()
    with autocast:
        out = model(input_ids=batch_BS, labels=batch_BS)
    lm = out.loss.float()
    loss = lm
    if taps.records:
        moe = recipe.moe
        with torch.set_grad_enabled(moe.aux_loss_coef > 0):
            aux_L = moe_losses.aux_losses(taps.records)
        with torch.set_grad_enabled(moe.z_loss_coef > 0):
            z = moe_losses.z_loss(taps.records)
        loss = lm + moe.aux_loss_coef * aux_L.sum() + moe.z_loss_coef * z
        dropped_L = moe_losses.dropped_fractions(taps.records)
        taps.count_assignments()
        dropped = dropped_L.mean() if dropped_L is not None else lm.new_zeros(())
        metrics = StepMetrics(
            lm.detach(),
            aux_L.sum().detach(),
            z.detach(),
            dropped.detach(),
            aux_L.detach(),
            dropped_L.detach() if dropped_L is not None else None,
        )
    else:
        zero = lm.new_zeros(())
        metrics = StepMetrics(lm.detach(), zero, zero, zero, lm.new_zeros((0,)), None)
    (loss * scale).backward()
    taps.clear()
    return metrics
