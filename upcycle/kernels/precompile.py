"""Compile every kernel variant a layer shape will need at once, on a thread pool, before its first launch.

Left alone, the first forward+backward of a new shape compiles about 26 kernel variants one after another
(each tuned launch site compiles all its candidates, then the next site starts). Planned up front with
:func:`capture_launches` (the wrappers run without launching), they compile together. Triton's compiler
releases the GIL: on 2 cores one shape's whole set compiled 1.6-1.9x faster on two threads than on one
(`benchmarks/kernel_report.py --compare-serial`, benchmarks/RESULTS.md), and the pool grows with the cores.
Sites already tuned (the on-disk cache) compile only their chosen config. `UPCYCLE_KERNELS_PRECOMPILE=0`
turns this off; any failure here is logged and left to the ordinary lazy compile, so it never breaks a run.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from .autotune import compile_in_parallel, configs_to_compile, device_arch, tokens_per_expert_bucket
from .launch import Capture, capture_launches
from .routing import Routing

logger = logging.getLogger(__name__)

_done: set[tuple] = set()
_lock = threading.Lock()


def precompile_enabled() -> bool:
    return os.environ.get("UPCYCLE_KERNELS_PRECOMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def plan(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, routing: Routing, top_k_weights_TK: Tensor, training: bool
) -> Capture:
    """The launches (and tuned sites) of one forward, plus the backward when `training`; nothing runs."""
    from .triton_bwd import moe_swiglu_backward
    from .triton_fwd import moe_swiglu_forward

    with capture_launches() as captured:
        _, gu_S2F = moe_swiglu_forward(x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, training)
        if training:
            dy_TH = torch.empty_like(x_TH)
            moe_swiglu_backward(dy_TH, x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, gu_S2F)
    return captured


def warmups(captured: Capture, dtype: torch.dtype, arch: int = 90) -> list[Callable[[], None]]:
    """One compile-only call per kernel variant the real launches will use (all candidates of untuned sites)."""
    calls: list[Callable[[], None]] = []
    for site in captured.tuned:
        for cfg in configs_to_compile(site.kernel, site.n, site.k, site.bucket, dtype, arch):
            calls.append(functools.partial(site.launch, cfg, warmup=True))
    for launch in captured.untuned_launches():
        calls.append(functools.partial(launch.kernel.warmup, *launch.args, grid=launch.grid, **launch.kwargs))
    return calls


def precompile(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, routing: Routing, top_k_weights_TK: Tensor, training: bool
) -> None:
    """Once per (shapes, strides, dtype, device, tokens-per-expert bucket, training): compile all, in parallel."""
    if x_TH.device.type != "cuda" or not precompile_enabled():
        return
    key = (
        tuple(w_gate_up_E2FH.shape), w_gate_up_E2FH.stride(), w_down_EHF.stride(), x_TH.shape[1], x_TH.stride(),
        routing.top_k, x_TH.dtype, top_k_weights_TK.dtype, x_TH.device,
        tokens_per_expert_bucket(routing.num_rows, routing.num_experts), training,
    )  # fmt: skip
    with _lock:
        if key in _done:
            return
        _done.add(key)
    try:
        captured = plan(x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, training)
        calls = warmups(captured, x_TH.dtype, device_arch(x_TH.device))
        compile_in_parallel(calls)
    except Exception as err:  # never fatal: the launches compile lazily instead
        logger.warning("upcycle.kernels: ahead-of-time compile failed (%r); compiling lazily", err)
