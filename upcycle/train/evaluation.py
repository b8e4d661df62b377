"""The held-out evaluation: the mean loss per token and the experts' load, the same sequences every time."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from upcycle.train import moe_losses
from upcycle.train.distributed import Dist, all_reduce_sum
from upcycle.train.eval_plan import eval_batches
from upcycle.train.packing import PackedDataset, make_batch
from upcycle.train.recipe import TrainRecipe


def evaluate(
    model: nn.Module,
    dataset: PackedDataset,
    recipe: TrainRecipe,
    info: Dist,
    taps: moe_losses.RouterTaps | None,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, Any]:
    """Mean held-out loss per token over the same sequences every time, exact across any number of ranks.

    Every rank runs the same number of equal micro-batches (FSDP needs it); padding rows repeat real ones and
    are left out of the sums via the plan's counts.
    """
    plan = eval_batches(dataset, recipe.data.eval_sequences, recipe.batch.micro_batch_size, info.rank, info.world_size)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens
    loads: list[torch.Tensor] = []  # [L, E] per batch
    with torch.no_grad():
        for ids, count in zip(plan.batches, plan.counts, strict=True):
            batch_BS = make_batch(dataset, ids).to(info.device)
            if taps is not None:
                taps.clear()
            with autocast:
                logits_BSV = model(input_ids=batch_BS).logits
            loss_BS = torch.nn.functional.cross_entropy(
                logits_BSV[:, :-1].float().flatten(0, 1), batch_BS[:, 1:].flatten(), reduction="none"
            ).view(batch_BS.shape[0], -1)
            real = loss_BS[:count].double()
            total += torch.stack([real.sum().cpu(), torch.tensor(real.numel(), dtype=torch.float64)])
            if taps is not None and taps.records:  # padding rows (and padding-only batches) count nothing
                loads.append(moe_losses.expert_counts(taps.records, count * batch_BS.shape[1]).double())
    if taps is not None:
        taps.clear()
    model.train(was_training)
    total = all_reduce_sum(total, info)
    record: dict[str, Any] = {"eval_loss": (total[0] / total[1]).item(), "eval_tokens": int(total[1].item())}
    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
    if taps is not None and taps.routers:
        local_LE = torch.stack(loads).sum(0) if loads else torch.zeros(len(taps.routers), 1, dtype=torch.float64)
        load_LE = all_reduce_sum(local_LE, info)
        load_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
        imbalance = (load_LE.max(-1).values / load_LE.mean(-1)).tolist()
        record["expert_load"] = [[round(v, 5) for v in row] for row in load_LE.tolist()]
        record["load_imbalance_max_over_mean"] = [round(v, 4) for v in imbalance]
    return record
