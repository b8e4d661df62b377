"""Routing metadata for grouped expert GEMMs, computed on the device with no host synchronisation.

Assignments (token t, choice k) are flattened to s = t*K + k and stably sorted by expert, so each expert owns a
contiguous run of sorted rows `[offsets[e], offsets[e+1])`. Kernels never copy activations into that order: they
gather token rows through `sorted_s` instead. A tile map (which expert, which first row) lets a fixed-size grid,
sized from shapes alone, walk the variable-length groups; surplus programs see expert -1 and exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    """Expert-sorted view of the assignments; everything lives on the tensors' device."""

    num_experts: int
    top_k: int
    ids_S: torch.Tensor  # int64 expert per flat assignment, sentinels (outside [0, E)) mapped to E
    sorted_s_S: torch.Tensor  # int64 flat assignment index s at each sorted row
    pos_S: torch.Tensor  # int64 sorted row of each flat assignment (inverse of sorted_s_S)
    offsets_E1: torch.Tensor  # int64 first sorted row of each expert; offsets[E] = number of real assignments
    _tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.sorted_s_S.numel()

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_expert int32, tile_start int64) for row tiles of `block_m`; cached per block size."""
        if block_m not in self._tiles:
            self._tiles[block_m] = _tile_map(self.offsets_E1, self.num_rows, block_m)
        return self._tiles[block_m]


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the number of row tiles: sum_e ceil(c_e / bm) <= ceil(S / bm) + min(E, S)."""
    return -(-num_rows // block_m) + min(num_experts, num_rows)


def build_routing(top_k_index_TK: torch.Tensor, num_experts: int) -> Routing:
    """Sort assignments by expert (stable, so ties keep token order and results are deterministic)."""
    T, K = top_k_index_TK.shape
    ids_S = top_k_index_TK.reshape(-1).to(torch.int64)
    ids_S = torch.where((ids_S >= 0) & (ids_S < num_experts), ids_S, num_experts)
    sorted_ids_S, sorted_s_S = torch.sort(ids_S, stable=True)
    bounds_E1 = torch.arange(num_experts + 1, device=ids_S.device, dtype=torch.int64)
    offsets_E1 = torch.searchsorted(sorted_ids_S, bounds_E1)
    pos_S = torch.empty_like(sorted_s_S)
    pos_S[sorted_s_S] = torch.arange(T * K, device=ids_S.device, dtype=torch.int64)
    return Routing(num_experts, K, ids_S, sorted_s_S, pos_S, offsets_E1)


def _tile_map(offsets_E1: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = offsets_E1.numel() - 1
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, dim=0)
    tile_M = torch.arange(max(max_tiles(num_rows, num_experts, block_m), 1), device=offsets_E1.device)
    expert_M = torch.searchsorted(tile_end_E, tile_M, right=True)
    live_M = expert_M < num_experts
    expert_M = expert_M.clamp(max=num_experts - 1)
    first_tile_M = (tile_end_E - tiles_E)[expert_M]
    start_M = offsets_E1[expert_M] + (tile_M - first_tile_M) * block_m
    tile_expert_M = torch.where(live_M, expert_M, -1).to(torch.int32)
    return tile_expert_M, start_M.to(torch.int64)
