"""Pure-PyTorch MoE SwiGLU experts: the specification the Triton kernels are tested against, and the CPU path.

Shapes use suffixes: T tokens, H hidden, F intermediate, E experts, K choices per token, S = T*K assignments.
Semantics are those of transformers' experts modules: `gate_up_proj [E, 2F, H]` holds the gate rows first,
then the up rows; `down_proj [E, H, F]`; output[t] = sum_k weight[t, k] * expert_{index[t, k]}(x[t]).
An index outside [0, E) (expert-parallel sentinel) contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def moe_swiglu_reference(
    x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor
) -> Tensor:
    """Differentiable reference; one host sync (expert counts), fp32 weighted combine like `grouped_mm`."""
    T, H = x_TH.shape
    E, F2, _ = w_gate_up_E2FH.shape
    K = top_k_index_TK.shape[1]
    ids_S = top_k_index_TK.reshape(-1)
    valid_S = (ids_S >= 0) & (ids_S < E)
    ids_S = torch.where(valid_S, ids_S, E)
    sorted_ids_S, perm_S = torch.sort(ids_S, stable=True)
    counts = torch.bincount(sorted_ids_S, minlength=E + 1).tolist()
    y_SH = x_TH.new_zeros(T * K, H, dtype=torch.float32)
    start = 0
    for e in range(E):
        end = start + counts[e]
        if end > start:
            rows_M = perm_S[start:end]
            gate_MF, up_MF = F.linear(x_TH[rows_M // K], w_gate_up_E2FH[e]).chunk(2, dim=-1)
            y_MH = F.linear(F.silu(gate_MF) * up_MF, w_down_EHF[e])
            y_SH = y_SH.index_copy(0, rows_M, y_MH.float())
        start = end
    w_S = torch.where(valid_S, top_k_weights_TK.reshape(-1).float(), 0.0)
    out_TH = (y_SH * w_S[:, None]).view(T, K, H).sum(dim=1)
    return out_TH.to(x_TH.dtype)


def moe_swiglu_reference_backward(
    grad_TH: Tensor, x_TH: Tensor, w_gate_up_E2FH: Tensor, w_down_EHF: Tensor,
    top_k_index_TK: Tensor, top_k_weights_TK: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Hand-written gradients of the reference (dx, dW_gate_up, dW_down, dweights): the CPU fallback's backward.

    Written out rather than recomputed through autograd because it runs inside a custom op's backward, where
    autograd does not record. Tests check it against autograd of `moe_swiglu_reference`.
    """
    T, H = x_TH.shape
    E, F2, _ = w_gate_up_E2FH.shape
    K = top_k_index_TK.shape[1]
    ids_S = top_k_index_TK.reshape(-1)
    valid_S = (ids_S >= 0) & (ids_S < E)
    sorted_ids_S, perm_S = torch.sort(torch.where(valid_S, ids_S, E), stable=True)
    counts = torch.bincount(sorted_ids_S, minlength=E + 1).tolist()
    dy_TH = grad_TH.to(x_TH.dtype)
    w_S = top_k_weights_TK.reshape(-1)
    dx_SH = torch.zeros(T * K, H, dtype=torch.float32, device=x_TH.device)
    dweights_S = torch.zeros(T * K, dtype=torch.float32, device=x_TH.device)
    dw_gate_up = torch.zeros_like(w_gate_up_E2FH)
    dw_down = torch.zeros_like(w_down_EHF)
    start = 0
    for e in range(E):
        end = start + counts[e]
        if end > start:
            rows_M = perm_S[start:end]
            x_MH, dy_MH = x_TH[rows_M // K], dy_TH[rows_M // K]
            gate_MF, up_MF = F.linear(x_MH, w_gate_up_E2FH[e]).float().chunk(2, dim=-1)
            sig_MF = torch.sigmoid(gate_MF)
            h_MF = (gate_MF * sig_MF * up_MF).to(x_TH.dtype)
            dweights_S[rows_M] = (dy_MH.float() * F.linear(h_MF, w_down_EHF[e]).float()).sum(-1)
            dyw_MH = (dy_MH.float() * w_S[rows_M, None].float()).to(x_TH.dtype)
            dw_down[e] = dyw_MH.T @ h_MF
            dh_MF = F.linear(dyw_MH, w_down_EHF[e].T).float()
            dgate_MF = dh_MF * up_MF * sig_MF * (1 + gate_MF * (1 - sig_MF))
            dgu_M2F = torch.cat([dgate_MF, dh_MF * gate_MF * sig_MF], dim=-1).to(x_TH.dtype)
            dw_gate_up[e] = dgu_M2F.T @ x_MH
            dx_SH[rows_M] = (dgu_M2F @ w_gate_up_E2FH[e]).float()
        start = end
    dx_TH = dx_SH.view(T, K, H).sum(dim=1).to(x_TH.dtype)
    return dx_TH, dw_gate_up, dw_down, dweights_S.view(T, K).to(top_k_weights_TK.dtype)
