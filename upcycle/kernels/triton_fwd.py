"""Triton forward: gathered up-projection with a SwiGLU epilogue, grouped down-projection, weighted combine.

Three launches and no activation copies: (1) each program takes a row tile of one expert, gathers its tokens'
hidden states straight from `x_TH`, multiplies by the expert's gate and up rows into two fp32 accumulators and
writes silu(gate) * up (and, when training, the gate/up pre-activations for the backward); (2) a grouped GEMM
applies each expert's down-projection to its rows in expert order; (3) one program per token sums its k
results, weighted, in fp32 and in a fixed order (deterministic, no atomics). All row/pointer math is int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .autotune import KernelConfig, choose_config, tokens_per_expert_bucket
from .launch import launch_kernel
from .routing import Routing, max_tiles


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch; half types always use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Kernels use only triton.language builtins plus the helpers below (no `tl.cdiv`/`tl.sigmoid`/`tl.sum`/`tl.zeros`, which
# are themselves jit functions): under TRITON_INTERPRET those break when triton was imported before the variable
# was set, as happens when another library imports triton first.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):  # fmt: skip
    """This program's expert (-1: no work) and as int64, sorted rows and mask, column block, columns and mask.

    Programs go in groups of GROUP_M consecutive row tiles that walk the output columns together, so each
    column tile of an expert's weight is read from HBM once per group instead of once per row tile (the rest
    hit L2). Within a group the row tile varies fastest.
    """
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    num_tiles = tl.num_programs(0) // num_n
    group = GROUP_M * num_n
    first = (pid // group) * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    tile = first + (pid % group) % size
    pid_n = (pid % group) // size
    expert = tl.load(tile_expert_ptr + tile)
    expert64 = tl.maximum(expert, 0).to(tl.int64)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(offsets_ptr + expert64 + 1)
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    return expert, expert64, rows, rows < row_end, pid_n, cols, cols < N


@triton.jit
def _rows_times_expert(
    a_ptr, a_rows, stride_ar, stride_ak, b_ptr, stride_bk, stride_bn, row_mask, cols, col_mask, KD,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 A[a_rows, :KD] @ B[:KD, cols], `b_ptr` already at the expert's matrix; `a_rows` may gather tokens."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_ar + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k_mask = (k0 + ks) < KD
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _up_swiglu_kernel(
    tile_expert_ptr, tile_start_ptr, offsets_ptr, x_ptr, w_ptr, h_ptr, gu_ptr, sorted_s_ptr,
    N, KD, top_k,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_hs, stride_hn, stride_gs, stride_gn,
    STORE_GU: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tile_expert, expert, rows, row_mask, pid_n, cols, col_mask = _row_tile(
        tile_expert_ptr, tile_start_ptr, offsets_ptr, N, BLOCK_M, BLOCK_N, GROUP_M
    )
    if tile_expert < 0:
        return
    tok = tl.load(sorted_s_ptr + rows, mask=row_mask, other=0) // top_k
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xh
    wg_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    wu_ptrs = wg_ptrs + N * stride_wn
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k_mask = (k0 + ks) < KD
        xa = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xa, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    h = acc_g * _sigmoid(acc_g) * acc_u
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h_ptr + rows[:, None] * stride_hs + cols[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip
    if STORE_GU:
        g_ptrs = gu_ptr + rows[:, None] * stride_gs + cols[None, :] * stride_gn
        tl.store(g_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=out_mask)
        tl.store(g_ptrs + N * stride_gn, acc_u.to(gu_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_gemm_kernel(
    tile_expert_ptr, tile_start_ptr, offsets_ptr, a_ptr, b_ptr, c_ptr, sorted_s_ptr, gu_ptr, w_ptr, part_ptr,
    N, KD, top_k,
    stride_as, stride_ak, stride_be, stride_bk, stride_bn, stride_cs, stride_cn,
    stride_gs, stride_gn, stride_wt, stride_wk, stride_ps,
    SWIGLU_BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[rows of e] = A[rows of e] @ B[e] for expert-sorted rows; B[e] is [KD, N] through its strides.

    SWIGLU_BACKWARD makes it the down-projection's backward: A = dy is gathered by token, and the epilogue takes
    the place of the store (`_swiglu_backward_epilogue`). The unused pointers and strides are then ignored.
    """
    tile_expert, expert, rows, row_mask, pid_n, cols, col_mask = _row_tile(
        tile_expert_ptr, tile_start_ptr, offsets_ptr, N, BLOCK_M, BLOCK_N, GROUP_M
    )
    if tile_expert < 0:
        return
    s = rows  # the sorted rows' assignments (token * top_k + slot), read once when the epilogue needs them
    a_rows = rows
    if SWIGLU_BACKWARD:
        s = tl.load(sorted_s_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        a_rows = s // top_k
    acc = _rows_times_expert(
        a_ptr, a_rows, stride_as, stride_ak, b_ptr + expert * stride_be, stride_bk, stride_bn, row_mask, cols,
        col_mask, KD, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if SWIGLU_BACKWARD:
        _swiglu_backward_epilogue(
            acc, rows, s, row_mask, pid_n, cols, col_mask, N, top_k, gu_ptr, w_ptr, c_ptr, part_ptr,
            stride_gs, stride_gn, stride_wt, stride_wk, stride_cs, stride_cn, stride_ps,
        )  # fmt: skip
    else:
        tl.store(c_ptr + rows[:, None] * stride_cs + cols[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])  # fmt: skip


@triton.jit
def _swiglu_backward_epilogue(
    dh_raw, rows, s, row_mask, pid_n, cols, col_mask, N, top_k, gu_ptr, w_ptr, dgu_ptr, part_ptr,
    stride_gs, stride_gn, stride_wt, stride_wk, stride_ds, stride_dn, stride_ps,
):  # fmt: skip
    """Given dy W_d (before the routing weight): router-weight partials <dy W_d, h> per column block, and
    dgu = the SwiGLU backward of w * dy W_d, with h = silu(g) * u recomputed from the saved pre-activations."""
    mask = row_mask[:, None] & col_mask[None, :]
    g_ptrs = gu_ptr + rows[:, None] * stride_gs + cols[None, :] * stride_gn
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + N * stride_gn, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    tl.store(part_ptr + rows * stride_ps + pid_n, tl.reduce(dh_raw * silu * u, 1, _add), mask=row_mask)
    wt = tl.load(w_ptr + (s // top_k) * stride_wt + (s % top_k) * stride_wk, mask=row_mask, other=0.0)
    dh = dh_raw * wt.to(tl.float32)[:, None]
    d_ptrs = dgu_ptr + rows[:, None] * stride_ds + cols[None, :] * stride_dn
    tl.store(d_ptrs, (dh * u * (sig * (1.0 + g * (1.0 - sig)))).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptrs + N * stride_dn, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr, w_ptr, pos_ptr, ids_ptr, out_ptr,
    N, top_k, num_experts,
    stride_ys, stride_yn, stride_wt, stride_wk, stride_ot, stride_on,
    HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[t] = sum_k (w[t, k] *) y[pos(t, k)] in fp32, k in order; sentinel experts are skipped."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k in range(0, top_k):
        s = t * top_k + k
        valid = tl.load(ids_ptr + s) < num_experts
        row = tl.load(pos_ptr + s)
        n_valid = tl.where(valid, N, 0)  # a sentinel's row was never written: load nothing from it
        v = tl.load(y_ptr + row * stride_ys + cols * stride_yn, mask=cols < n_valid, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            wt = tl.load(w_ptr + t * stride_wt + k * stride_wk).to(tl.float32)
            v = v * tl.where(valid, wt, 0.0)
        acc += v
    tl.store(out_ptr + t * stride_ot + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


def group_m() -> int:
    """Row tiles that share a pass over the output columns (see _row_tile): 8, the usual choice for GEMMs.

    `UPCYCLE_KERNELS_GROUP_M=1` restores plain row-major order (for measuring what the grouping buys).
    """
    return max(1, int(os.environ.get("UPCYCLE_KERNELS_GROUP_M", "8")))


def launch_on_row_tiles(
    kernel: triton.JITFunction, routing: Routing, cfg: KernelConfig, n: int, warmup: bool, *args, **constexprs
) -> None:
    """Launch a kernel whose programs each take one `_row_tile` of n output columns: its first arguments are the
    tile tables for the config's row block, its last the config's tile sizes."""
    tile_expert_M, tile_start_M = routing.tiles(cfg.block_m)
    grid = (max_tiles(routing.num_rows, routing.num_experts, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    launch_kernel(
        kernel, grid, tile_expert_M, tile_start_M, routing.offsets_E1, *args, **constexprs,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=group_m(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, warmup=warmup,
    )  # fmt: skip


def up_swiglu(
    x_TH: torch.Tensor, w_gate_up_E2FH: torch.Tensor, routing: Routing, store_gu: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h_SF = silu(x W_g^T) * (x W_u^T) per sorted row (and gu_S2F = pre-activations when `store_gu`)."""
    S, (E, F2, H) = routing.num_rows, w_gate_up_E2FH.shape
    F = F2 // 2
    h_SF = x_TH.new_empty(S, F)
    gu_S2F = x_TH.new_empty(S, F2) if store_gu else h_SF
    prec = dot_precision(x_TH.dtype)

    def launch(cfg: KernelConfig, warmup: bool = False) -> None:
        launch_on_row_tiles(
            _up_swiglu_kernel, routing, cfg, F, warmup,
            x_TH, w_gate_up_E2FH, h_SF, gu_S2F, routing.sorted_s_S, F, H, routing.top_k,
            *x_TH.stride(), *w_gate_up_E2FH.stride(), *h_SF.stride(), *gu_S2F.stride(),
            STORE_GU=store_gu, DOT_PRECISION=prec,
        )  # fmt: skip

    bucket = tokens_per_expert_bucket(S, E)
    launch(choose_config("up", F, H, bucket, x_TH.dtype, x_TH.device, launch))
    return h_SF, (gu_S2F if store_gu else None)


def grouped_gemm(a_SK: torch.Tensor, b_EKN: torch.Tensor, routing: Routing) -> torch.Tensor:
    """c_SN = a_SK @ b_EKN[expert of row] over expert-sorted rows (b may be any strided view)."""
    S, (E, KD, N) = routing.num_rows, b_EKN.shape
    c_SN = a_SK.new_empty(S, N)
    prec = dot_precision(a_SK.dtype)

    def launch(cfg: KernelConfig, warmup: bool = False) -> None:
        unused = routing.offsets_E1  # the pointers only the SWIGLU_BACKWARD epilogue reads
        launch_on_row_tiles(
            _grouped_gemm_kernel, routing, cfg, N, warmup,
            a_SK, b_EKN, c_SN, unused, unused, unused, unused, N, KD, routing.top_k,
            *a_SK.stride(), *b_EKN.stride(), *c_SN.stride(), 0, 0, 0, 0, 0,
            SWIGLU_BACKWARD=False, DOT_PRECISION=prec,
        )  # fmt: skip

    bucket = tokens_per_expert_bucket(S, E)
    launch(choose_config("gemm", N, KD, bucket, a_SK.dtype, a_SK.device, launch))
    return c_SN


def combine(
    y_SH: torch.Tensor, routing: Routing, weights_TK: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """out_TH = sum over each token's k sorted rows, optionally weighted; deterministic order."""
    S, H = y_SH.shape
    T = S // routing.top_k
    out_TH = y_SH.new_empty(T, H, dtype=out_dtype)
    if T == 0:
        return out_TH
    block_n = min(1024, triton.next_power_of_2(max(H, 16)))
    w = weights_TK if weights_TK is not None else y_SH
    w_strides = weights_TK.stride() if weights_TK is not None else (0, 0)
    launch_kernel(
        _combine_kernel, (T, triton.cdiv(H, block_n)),
        y_SH, w, routing.pos_S, routing.ids_S, out_TH, H, routing.top_k, routing.num_experts,
        *y_SH.stride(), *w_strides, *out_TH.stride(),
        HAS_WEIGHTS=weights_TK is not None, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out_TH


def moe_swiglu_forward(
    x_TH: torch.Tensor,
    w_gate_up_E2FH: torch.Tensor,
    w_down_EHF: torch.Tensor,
    routing: Routing,
    top_k_weights_TK: torch.Tensor,
    store_gu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_TH (and gu_S2F for the backward): the three launches above, nothing else allocated per token."""
    h_SF, gu_S2F = up_swiglu(x_TH, w_gate_up_E2FH, routing, store_gu)
    y_SH = grouped_gemm(h_SF, w_down_EHF.transpose(1, 2), routing)
    del h_SF
    return combine(y_SH, routing, top_k_weights_TK, x_TH.dtype), gu_S2F
