"""Fused Triton MoE SwiGLU experts (forward + backward), their PyTorch reference, and transformers registration.

Importing this package registers the "upcycle" experts implementation with transformers, so
`model.set_experts_implementation("upcycle")` and `from_pretrained(..., experts_implementation="upcycle")` work.
Triton is imported lazily, only when a kernel runs; without a usable GPU (or without triton) the reference runs
instead and a warning says so once.

Environment: UPCYCLE_KERNELS_BACKEND=auto|triton|reference, UPCYCLE_KERNELS_AUTOTUNE=0 (heuristic tiles only),
UPCYCLE_KERNELS_CACHE_DIR (tuned-config cache, default ~/.cache/upcycle/kernels), UPCYCLE_KERNELS_PRECOMPILE=0
(compile lazily, one kernel at a time, instead of a shape's whole set in parallel before its first launch),
UPCYCLE_KERNELS_GROUP_M=1 (plain row-major tile order instead of groups of 8 row tiles, for measuring),
TRITON_INTERPRET=1 (run the Triton kernels on the CPU, for tests).
"""

from __future__ import annotations

from .backend import select_backend, triton_unusable_reason
from .op import moe_swiglu
from .reference import moe_swiglu_reference
from .registry import IMPLEMENTATION_NAME, UnsupportedExpertsError, check_experts_module, experts_forward, register

__all__ = [
    "IMPLEMENTATION_NAME",
    "UnsupportedExpertsError",
    "check_experts_module",
    "experts_forward",
    "moe_swiglu",
    "moe_swiglu_reference",
    "register",
    "select_backend",
    "triton_unusable_reason",
]

register()
