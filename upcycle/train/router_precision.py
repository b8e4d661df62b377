"""The routers' precision under mixed precision (`moe.router_dtype`).

Everything routing decides comes from the router logits: the top-k choice, the sigmoid scores, the weights, the
load-balancing and z losses. Under bf16 autocast a router's linear runs in bf16 like every other linear (autocast
wins even over a router whose own code casts to fp32, as Glm4-MoE's and Dots1's do), so close scores tie and
choices flip on 8 bits of mantissa. `float32` runs each router with autocast off, on fp32 inputs and fp32 views of
its parameters (the fp32 master weights under autocast; an fp32 copy of the bf16 gathered ones under FSDP's mixed
precision, through which the gradient flows back). `auto` follows the class: fp32 for the routers whose own code
gates in fp32 (the sigmoid routers), the compute dtype for the others. In an fp32 run all three are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from upcycle.train.moe_losses import is_sigmoid_router

ROUTER_DTYPES = ("auto", "float32", "compute")


def routers_in_fp32(requested: str, routers: list[tuple[str, nn.Module]]) -> bool:
    """Whether the routers run in fp32 under mixed precision."""
    if requested == "auto":
        return any(is_sigmoid_router(router) for _, router in routers)
    return requested == "float32"


def run_routers_in_fp32(routers: list[tuple[str, nn.Module]], device_type: str) -> Callable[[], None]:
    """Make every router compute in fp32 whatever autocast or FSDP's policy say; returns the undo."""
    undo = []
    for _, router in routers:
        router.forward = _fp32_forward(router, router.forward, device_type)
        undo.append(router)

    def restore() -> None:
        for router in undo:
            del router.forward  # the class's own forward again

    return restore


def _fp32_forward(router: nn.Module, original: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        saved = dict(router._parameters)
        for name, parameter in saved.items():
            if parameter is not None and parameter.is_floating_point() and parameter.dtype != torch.float32:
                router._parameters[name] = parameter.float()  # differentiable: the gradient reaches the parameter
        try:
            with torch.autocast(device_type, enabled=False):
                output = original(hidden_states.float(), *args, **kwargs)
        finally:
            router._parameters.update(saved)
        if isinstance(output, tuple) and len(output) > 1 and torch.is_tensor(output[1]):
            # the logits stay fp32 (the losses read them); the weights meet the experts in the dtype they came in
            weights = output[1] if output[1].dtype == hidden_states.dtype else output[1].to(hidden_states.dtype)
            output = (output[0], weights, *output[2:])
        return output

    return forward
