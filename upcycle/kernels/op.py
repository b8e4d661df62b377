"""The `upcycle::moe_swiglu*` torch.library custom ops, their fake (meta) impls and autograd.

Ops are opaque to torch.compile (traced without graph breaks, shapes from the fake impls). Two forward ops so
inference never writes the gate/up activations the backward needs: `moe_swiglu` (inference) and
`moe_swiglu_train` (also returns the expert-sorted gate/up pre-activations, saved for `moe_swiglu_backward`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import select_backend
from .reference import moe_swiglu_reference, moe_swiglu_reference_backward


def _check(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor
) -> None:
    """Refuse inputs the kernels would silently mis-compute."""
    if x_TH.dim() != 2 or w_gate_up_E2FH.dim() != 3 or w_down_EHF.dim() != 3:
        raise ValueError(
            "moe_swiglu expects hidden_states [T, H], gate_up_proj [E, 2F, H], down_proj [E, H, F]; got "
            f"{tuple(x_TH.shape)}, {tuple(w_gate_up_E2FH.shape)}, {tuple(w_down_EHF.shape)}."
        )
    E, F2, H = w_gate_up_E2FH.shape
    if F2 % 2 or x_TH.shape[1] != H or tuple(w_down_EHF.shape) != (E, H, F2 // 2):
        raise ValueError(
            f"moe_swiglu shape mismatch: hidden_states {tuple(x_TH.shape)}, gate_up_proj {tuple(w_gate_up_E2FH.shape)}"
            f", down_proj {tuple(w_down_EHF.shape)} (want [T, H], [E, 2F, H], [E, H, F])."
        )
    if top_k_index_TK.dim() != 2 or top_k_index_TK.shape != top_k_weights_TK.shape:
        raise ValueError(
            f"top_k_index {tuple(top_k_index_TK.shape)} and top_k_weights {tuple(top_k_weights_TK.shape)} "
            "must both be [T, k]."
        )
    if top_k_index_TK.shape[0] != x_TH.shape[0]:
        raise ValueError(f"top_k_index has {top_k_index_TK.shape[0]} rows but hidden_states has {x_TH.shape[0]}.")
    if top_k_index_TK.dtype.is_floating_point or not top_k_weights_TK.dtype.is_floating_point:
        raise ValueError("top_k_index must be an integer tensor and top_k_weights a floating-point tensor.")
    if not (x_TH.dtype == w_gate_up_E2FH.dtype == w_down_EHF.dtype):
        raise ValueError(
            f"hidden_states, gate_up_proj and down_proj must share a dtype; got {x_TH.dtype}, "
            f"{w_gate_up_E2FH.dtype}, {w_down_EHF.dtype}."
        )


def _saved_rows(x_TH: torch.Tensor, top_k_index_TK: torch.Tensor) -> int:
    """Rows of the saved gate/up buffer: one per assignment for Triton, none for the reference (recomputes)."""
    return top_k_index_TK.numel() if select_backend(x_TH.device) == "triton" else 0


def _triton_forward(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, store_gu):
    from .precompile import precompile
    from .routing import build_routing
    from .triton_fwd import moe_swiglu_forward

    routing = build_routing(top_k_index_TK, w_gate_up_E2FH.shape[0])
    precompile(x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, training=store_gu)
    return moe_swiglu_forward(x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, store_gu)


@torch.library.custom_op("upcycle::moe_swiglu", mutates_args=())
def moe_swiglu_op(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor
) -> Tensor:
    if select_backend(x_TH.device) == "triton":
        return _triton_forward(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, False)[0]
    return moe_swiglu_reference(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)


@moe_swiglu_op.register_fake
def _(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK):
    return x_TH.new_empty(x_TH.shape)


@torch.library.custom_op("upcycle::moe_swiglu_train", mutates_args=())
def moe_swiglu_train_op(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor
) -> tuple[Tensor, Tensor]:
    if select_backend(x_TH.device) == "triton":
        return _triton_forward(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, True)
    out_TH = moe_swiglu_reference(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)
    return out_TH, x_TH.new_empty(0, w_gate_up_E2FH.shape[1])


@moe_swiglu_train_op.register_fake
def _(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK):
    rows = _saved_rows(x_TH, top_k_index_TK)
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(rows, w_gate_up_E2FH.shape[1])


@torch.library.custom_op("upcycle::moe_swiglu_backward", mutates_args=())
def moe_swiglu_backward_op(
    grad_TH: Tensor, x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor,
    top_k_index_TK: Tensor, top_k_weights_TK: Tensor, gu_S2F: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    if gu_S2F.shape[0] == top_k_index_TK.numel() and select_backend(x_TH.device) == "triton":
        from .routing import build_routing
        from .triton_bwd import moe_swiglu_backward

        routing = build_routing(top_k_index_TK, w_gate_up_E2FH.shape[0])
        return moe_swiglu_backward(grad_TH, x_TH, w_gate_up_E2FH, w_down_EHF, routing, top_k_weights_TK, gu_S2F)
    return moe_swiglu_reference_backward(grad_TH, x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)


@moe_swiglu_backward_op.register_fake
def _(grad_TH, x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, gu_S2F):
    return (
        torch.empty_like(x_TH),
        torch.empty_like(w_gate_up_E2FH),
        torch.empty_like(w_down_EHF),
        torch.empty_like(top_k_weights_TK),
    )


def _setup_context(ctx, inputs, output) -> None:
    x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK = inputs
    ctx.save_for_backward(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, output[1])


def _backward(ctx, grad_TH: torch.Tensor, _grad_gu: torch.Tensor | None):
    x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, gu_S2F = ctx.saved_tensors
    dx, dw_gate_up, dw_down, dweights = torch.ops.upcycle.moe_swiglu_backward(
        grad_TH.contiguous(), x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK, gu_S2F
    )
    return dx, dw_gate_up, dw_down, None, dweights


moe_swiglu_train_op.register_autograd(_backward, setup_context=_setup_context)


def moe_swiglu(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor
) -> Tensor:
    """Fused SwiGLU experts: out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = index[t,k].

    Differentiable in x, both weights and top_k_weights. Weights may be strided views (e.g. transposed
    storage). Indices outside [0, E) contribute nothing (expert-parallel sentinels).
    """
    _check(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TH, w_gate_up_E2FH, w_down_EHF, top_k_weights_TK)
    )
    if needs_grad:
        return torch.ops.upcycle.moe_swiglu_train(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)[0]
    return torch.ops.upcycle.moe_swiglu(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)
