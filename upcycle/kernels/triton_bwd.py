"""Triton backward: grouped GEMMs for the input gradients, variable-length grouped GEMMs for the weight gradients.

Given dy_TH and the saved gate/up pre-activations gu_S2F (expert-sorted rows):
(1) one grouped GEMM gathers dy by token and multiplies by each expert's down-projection; its epilogue recomputes
    h = silu(g) * u, emits the router-weight gradient partials <dy W_d, h> per column block, and writes the
    SwiGLU backward dgu_S2F (the routing weight applied);
(2) dx: grouped GEMM dgu_S2F @ W_gate_up[e], then the same deterministic per-token combine as the forward;
(3) dW_gate_up[e] = dgu^T x[tokens of e] and dW_down[e] = (w * dy[tokens])^T h, each a reduction over the
    expert's own rows (variable length, zero rows give a zero gradient), gathers fused into the loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_fwd
from .autotune import KernelConfig, choose_config, tokens_per_expert_bucket
from .launch import launch_kernel
from .routing import Routing
from .triton_fwd import (
    _grouped_gemm_kernel,
    _sigmoid,
    combine,
    dot_precision,
    grouped_gemm,
    launch_on_row_tiles,
)


@triton.jit
def _grouped_dw_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr, sorted_s_ptr, offsets_ptr,
    N, KD, top_k, half,
    stride_as, stride_an, stride_bs, stride_bk, stride_ce, stride_cn, stride_ck, stride_wt, stride_wk,
    A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, B_GATHER: tl.constexpr, B_SWIGLU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[e] = sum over e's sorted rows p of A[p, :N]^T B[p, :KD]; rows are gathered/scaled/activated on load."""
    expert = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    num_k = (KD + BLOCK_K - 1) // BLOCK_K
    pid_n = pid // num_k
    pid_k = pid % num_k
    row_begin = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    n_mask = ns < N
    k_mask = kk < KD
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for m0 in range(row_begin, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < row_end
        s = tl.load(sorted_s_ptr + rows, mask=row_mask, other=0)
        tok = s // top_k
        a_rows = tok if A_GATHER else rows
        a = tl.load(a_ptr + a_rows[:, None] * stride_as + ns[None, :] * stride_an,
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
        if A_SCALE:
            wt = tl.load(w_ptr + tok * stride_wt + (s % top_k) * stride_wk, mask=row_mask, other=0.0)
            a = (a.to(tl.float32) * wt.to(tl.float32)[:, None]).to(a_ptr.dtype.element_ty)
        b_rows = tok if B_GATHER else rows
        b_ptrs = b_ptr + b_rows[:, None] * stride_bs + kk[None, :] * stride_bk
        b_mask = row_mask[:, None] & k_mask[None, :]
        if B_SWIGLU:
            g = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
            u = tl.load(b_ptrs + half * stride_bk, mask=b_mask, other=0.0).to(tl.float32)
            b = (g * _sigmoid(g) * u).to(b_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    tl.store(c_ptr + expert * stride_ce + ns[:, None] * stride_cn + kk[None, :] * stride_ck,
             acc.to(c_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])  # fmt: skip


def down_backward(
    dy_TH: torch.Tensor, w_down_EHF: torch.Tensor, gu_S2F: torch.Tensor, weights_TK: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgu_S2F, dweights_S in sorted-row order, fp32)."""
    S, (E, H, F) = routing.num_rows, w_down_EHF.shape
    dgu_S2F = torch.empty_like(gu_S2F)
    prec = dot_precision(dy_TH.dtype)
    parts: dict[int, torch.Tensor] = {}

    def launch(cfg: KernelConfig, warmup: bool = False) -> None:
        part_SB = parts.setdefault(
            cfg.block_n, torch.zeros(S, triton.cdiv(F, cfg.block_n), device=dy_TH.device, dtype=torch.float32)
        )
        launch_on_row_tiles(
            _grouped_gemm_kernel, routing, cfg, F, warmup,
            dy_TH, w_down_EHF, dgu_S2F, routing.sorted_s_S, gu_S2F, weights_TK, part_SB, F, H, routing.top_k,
            *dy_TH.stride(), *w_down_EHF.stride(), *dgu_S2F.stride(),
            *gu_S2F.stride(), *weights_TK.stride(), part_SB.stride(0),
            SWIGLU_BACKWARD=True, DOT_PRECISION=prec,
        )  # fmt: skip
        parts["last"] = part_SB

    bucket = tokens_per_expert_bucket(S, E)
    launch(choose_config("down_bwd", F, H, bucket, dy_TH.dtype, dy_TH.device, launch))
    return dgu_S2F, parts["last"].sum(dim=1)


def grouped_dw(
    a: torch.Tensor,
    b: torch.Tensor,
    out_ENK: torch.Tensor,
    routing: Routing,
    *,
    weights_TK: torch.Tensor | None = None,
    a_gather: bool = False,
    b_gather: bool = False,
    b_swiglu: bool = False,
) -> torch.Tensor:
    """out[e] = A_e^T B_e over expert e's rows, written through `out_ENK`'s strides (may be a transposed view)."""
    E, N, KD = out_ENK.shape
    half = b.shape[1] // 2
    prec = dot_precision(a.dtype)
    w = weights_TK if weights_TK is not None else a
    w_strides = weights_TK.stride() if weights_TK is not None else (0, 0)

    def launch(cfg: KernelConfig, warmup: bool = False) -> None:
        grid = (E, triton.cdiv(N, cfg.block_n) * triton.cdiv(KD, cfg.block_k))
        launch_kernel(
            _grouped_dw_kernel, grid,
            a, b, out_ENK, w, routing.sorted_s_S, routing.offsets_E1, N, KD, routing.top_k, half,
            *a.stride(), *b.stride(), *out_ENK.stride(), *w_strides,
            A_GATHER=a_gather, A_SCALE=weights_TK is not None, B_GATHER=b_gather, B_SWIGLU=b_swiglu,
            DOT_PRECISION=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, warmup=warmup,
        )  # fmt: skip

    bucket = tokens_per_expert_bucket(routing.num_rows, E)
    launch(choose_config("dw", N, KD, bucket, a.dtype, a.device, launch))
    return out_ENK


def moe_swiglu_backward(
    dy_TH: torch.Tensor,
    x_TH: torch.Tensor,
    w_gate_up_E2FH: torch.Tensor,
    w_down_EHF: torch.Tensor,
    routing: Routing,
    top_k_weights_TK: torch.Tensor,
    gu_S2F: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_TH, dW_gate_up, dW_down, dweights_TK); weight gradients keep the weights' strides."""
    T, K = top_k_weights_TK.shape
    dy_TH = dy_TH.to(x_TH.dtype)
    dgu_S2F, dw_sorted_S = down_backward(dy_TH, w_down_EHF, gu_S2F, top_k_weights_TK, routing)
    dw_S = torch.where(routing.ids_S < routing.num_experts, dw_sorted_S[routing.pos_S], 0.0)
    dweights_TK = dw_S.view(T, K).to(top_k_weights_TK.dtype)
    dx_SH = grouped_gemm(dgu_S2F, w_gate_up_E2FH, routing)
    dx_TH = combine(dx_SH, routing, None, x_TH.dtype)
    del dx_SH
    dw_gate_up = grouped_dw(dgu_S2F, x_TH, torch.empty_like(w_gate_up_E2FH), routing, b_gather=True)
    dw_down = grouped_dw(
        dy_TH, gu_S2F, torch.empty_like(w_down_EHF), routing,
        weights_TK=top_k_weights_TK, a_gather=True, b_swiglu=True,
    )  # fmt: skip
    return dx_TH, dw_gate_up, dw_down, dweights_TK


# Every jit kernel a forward and backward launch (what an ahead-of-time compile or a cache count walks).
LAUNCHED_KERNELS = (
    triton_fwd._up_swiglu_kernel,
    triton_fwd._grouped_gemm_kernel,
    triton_fwd._combine_kernel,
    _grouped_dw_kernel,
)
