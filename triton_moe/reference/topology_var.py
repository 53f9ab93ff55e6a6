"""Block-sparse topology of the expert hidden activations, for experts of variable widths, in plain torch.

The hidden activations of all experts form one block-sparse matrix [padded_rows, total_width] in blocks of
`block_size`: expert e's (padded) rows meet only expert e's columns. Each expert's row count is padded up to
a multiple of block_size, so the matrix has `padded_e / bs` block rows of `width_e / bs` blocks each for
every expert. stk stores it as BCSR: per nonzero block its block row and block column, per block row the
offset of its first block, and the same three arrays for the transpose (which the backward's dsd needs).

Each step is a function of its own so that a profile can time it; `build_topology` runs them in order.
The block counts must be known on the host to size these arrays, so `build_topology` synchronises once.
"""

import stk
import torch
import torch.nn.functional as F

from triton_moe.config import MoEConfig


def padded_bins(tokens_per_expert: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row offsets of each expert after padding its token count up to a multiple of block_size: [E + 1]."""
    padded_tokens_per_expert = torch.div(tokens_per_expert + block_size - 1, block_size,
                                         rounding_mode="floor") * block_size  # [E]
    return F.pad(padded_tokens_per_expert.cumsum(0), (1, 0))


def block_row_offsets(block_rows_per_expert: list[int], block_columns_per_expert: torch.Tensor,
                      num_block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert of each block row [BR] and the BCSR offsets of each block row's first block [BR + 1] int32."""
    device = block_columns_per_expert.device
    counts = torch.tensor(block_rows_per_expert, device=device)
    block_row_expert = torch.repeat_interleave(
        torch.arange(len(block_rows_per_expert), device=device), counts, output_size=num_block_rows)
    blocks_per_row = block_columns_per_expert[block_row_expert]  # [BR]
    offsets = F.pad(blocks_per_row.cumsum(0), (1, 0)).to(torch.int32)
    return block_row_expert, offsets


def row_indices(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block row of every nonzero block [nnz] int32, from the block-row offsets [BR + 1]."""
    num_block_rows = offsets.numel() - 1
    blocks_per_row = offsets.diff()
    return torch.repeat_interleave(torch.arange(num_block_rows, device=offsets.device, dtype=torch.int32),
                                   blocks_per_row, output_size=nnz)


def column_indices(block_row_expert: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                   expert_block_column_offsets: torch.Tensor) -> torch.Tensor:
    """Block column of every nonzero block [nnz] int32: its expert's first block column + its rank in the row."""
    nnz = rows.numel()
    rank_in_row = torch.arange(nnz, device=rows.device, dtype=torch.int32) - offsets[rows.long()]
    first_column = expert_block_column_offsets[block_row_expert[rows.long()]]
    return (first_column + rank_in_row).to(torch.int32)


def transpose(rows: torch.Tensor, columns: torch.Tensor, num_block_columns: int):
    """BCSR of the transpose: (column_indices_t [nnz], offsets_t [BC + 1], block_offsets_t [nnz]), int32.

    A stable sort by block column keeps each column's blocks in row order.
    """
    sorted_columns, block_offsets_t = torch.sort(columns, stable=True)
    column_indices_t = rows[block_offsets_t]
    column_ids = torch.arange(num_block_columns + 1, device=columns.device, dtype=sorted_columns.dtype)
    offsets_t = torch.searchsorted(sorted_columns, column_ids).to(torch.int32)
    return column_indices_t, offsets_t, block_offsets_t.to(torch.int32)


def make_topology(num_padded_rows: int, config: MoEConfig, bs: int, rows, columns, offsets,
                  transposed) -> stk.Matrix:
    """The stk.Matrix [padded_rows, total_width] of blocks bs x bs; its data lives on the meta device (only its
    shape is used)."""
    data = torch.empty(rows.numel(), bs, bs, device="meta")
    column_indices_t, offsets_t, block_offsets_t = transposed
    return stk.Matrix((num_padded_rows, config.total_width), data, rows, columns, offsets,
                      column_indices_t, offsets_t, block_offsets_t)


def build_topology(tokens_per_expert: torch.Tensor, config: MoEConfig, bs: int):
    """Topology for this batch's routing, in blocks bs x bs: (stk.Matrix, padded_row_offsets [E + 1],
    block_rows_per_expert list).

    Synchronises once, to read the padded block-row counts on the host.
    """
    device = tokens_per_expert.device
    padded_row_offsets = padded_bins(tokens_per_expert, bs)
    block_rows_per_expert = (padded_row_offsets.diff() // bs).tolist()  # the sync
    block_columns = [width // bs for width in config.expert_widths]
    num_block_rows = sum(block_rows_per_expert)
    nnz = sum(r * c for r, c in zip(block_rows_per_expert, block_columns))

    block_columns_per_expert = torch.tensor(block_columns, device=device)
    expert_block_column_offsets = F.pad(block_columns_per_expert.cumsum(0), (1, 0))
    block_row_expert, offsets = block_row_offsets(block_rows_per_expert, block_columns_per_expert, num_block_rows)
    rows = row_indices(offsets, nnz)
    columns = column_indices(block_row_expert, offsets, rows, expert_block_column_offsets)
    transposed = transpose(rows, columns, config.total_width // bs)
    topology = make_topology(num_block_rows * bs, config, bs, rows, columns, offsets, transposed)
    return topology, padded_row_offsets, block_rows_per_expert
