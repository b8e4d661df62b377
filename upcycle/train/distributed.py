"""Process-group set-up and FSDP2 sharding: the same code for 1 CPU, 1 GPU and `torchrun` on many GPUs."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from upcycle.hf.moe_modules import decoder_layers as find_decoder_layers


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """Join the process group `torchrun` describes (nccl on GPUs, gloo on CPUs); a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("UPCYCLE_DEVICE", "") != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the joined process group ((0, 1) without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = find_decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard")
    return list(layers)


def shard_model(model: nn.Module, info: Dist, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: one `fully_shard` unit per decoder layer, then the root; fp32 master weights, optional bf16 compute."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dist.device_mesh.init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def all_reduce_sum(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """Sum over ranks; the result comes back on the CPU whatever device the collective needs."""
    return _all_reduce(values, info, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """Element-wise maximum over ranks, back on the CPU."""
    return _all_reduce(values, info, dist.ReduceOp.MAX)


def _all_reduce(values: torch.Tensor, info: Dist, op: dist.ReduceOp) -> torch.Tensor:
    if info.enabled:
        values = values.to(info.device, copy=True)
        dist.all_reduce(values, op=op)
        values = values.cpu()
    return values


def barrier(info: Dist | None = None) -> None:
    """Wait for every rank (of `info`, or of the joined process group); nothing to wait for in one process."""
    if info.enabled if info is not None else rank_and_world()[1] > 1:
        dist.barrier()


def all_gather_objects(value: Any, info: Dist) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list in one process)."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (before clipping), clipping them to `max_norm`.

    Under expert parallelism the experts' gradients live on another device mesh than the dense ones, which
    `torch.nn.utils.clip_grad_norm_` cannot combine: each mesh's norm is reduced on its own mesh, then summed.
    """
    by_mesh: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:
            by_mesh[getattr(param.grad, "device_mesh", None)].append(param.grad)
    if len(by_mesh) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    squares = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares.append(norm.float().cpu() ** 2)
    total = torch.stack(squares).sum().sqrt()
    coefficient = max_norm / (total.item() + 1e-6)
    if coefficient < 1.0 and math.isfinite(coefficient):
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coefficient)
    return total
