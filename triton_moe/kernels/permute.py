"""Moving rows between token order and expert-sorted order: gather (tokens -> rows) and combine (rows -> tokens).

combine_rows sums each token's top_k rows in slot order in fp32, each token in one program, so its result is
bitwise reproducible (no atomics).
"""

import torch
import triton
import triton.language as tl

from triton_moe.kernels.host import FLOAT_DTYPES, INDEX_DTYPES, ceil_div, check_int, check_tensor_dim, traceable
from triton_moe.kernels.tuning import PERMUTE_NUM_WARPS, permute_tile_h, rows_per_program



@triton.jit
def _gather_rows_kernel(src_ptr, row_to_token_ptr, rows_ptr, num_rows, hidden, TILE_ROWS: tl.constexpr,
                        TILE_H: tl.constexpr):
    """rows[r] = src[row_to_token[r]], for TILE_ROWS rows r a program."""
    rows = tl.program_id(0).to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS)  # (TILE_ROWS,)
    row_mask = rows < num_rows
    tokens = tl.load(row_to_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.arange(0, TILE_H)
    for col_start in range(0, hidden, TILE_H):
        mask = row_mask[:, None] & (cols[None, :] < hidden - col_start)  # (TILE_ROWS, TILE_H)
        values = tl.load(src_ptr + tokens[:, None] * hidden + col_start + cols[None, :], mask=mask)
        tl.store(rows_ptr + rows[:, None] * hidden + col_start + cols[None, :], values, mask=mask)


@triton.jit
def _combine_rows_kernel(rows_ptr, flat_to_row_ptr, out_ptr, num_tokens, hidden, top_k, TILE_TOKENS: tl.constexpr,
                         TILE_H: tl.constexpr):
    """out[t] = sum_{j < top_k} rows[flat_to_row[t * top_k + j]] in slot order, for TILE_TOKENS tokens t a
    program."""
    tokens = tl.program_id(0).to(tl.int64) * TILE_TOKENS + tl.arange(0, TILE_TOKENS)  # (TILE_TOKENS,)
    token_mask = tokens < num_tokens
    cols = tl.arange(0, TILE_H)
    for col_start in range(0, hidden, TILE_H):
        mask = token_mask[:, None] & (cols[None, :] < hidden - col_start)  # (TILE_TOKENS, TILE_H)
        acc = tl.zeros((TILE_TOKENS, TILE_H), dtype=tl.float32)
        for slot in range(top_k):
            row = tl.load(flat_to_row_ptr + tokens * top_k + slot, mask=token_mask, other=0).to(tl.int64)
            acc += tl.load(rows_ptr + row[:, None] * hidden + col_start + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + tokens[:, None] * hidden + col_start + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def gather_rows(src: torch.Tensor, row_to_token: torch.Tensor) -> torch.Tensor:
    """Copy each expert-sorted row's token: rows[r] = src[row_to_token[r]].

    Args:
        src: [N, H] fp32/fp16/bf16 token rows.
        row_to_token: [R] int32/int64 token of each expert-sorted row.
    Returns:
        rows: [R, H] of src.dtype.
    """
    check_tensor_dim("src", src, 2, FLOAT_DTYPES)
    check_tensor_dim("row_to_token", row_to_token, 1, INDEX_DTYPES)
    num_rows, hidden = row_to_token.shape[0], src.shape[1]
    if num_rows > 0 and src.shape[0] == 0:
        raise ValueError(f"src has no rows for row_to_token's {num_rows} rows to copy")
    rows = torch.empty((num_rows, hidden), dtype=src.dtype, device=src.device)  # (R, H)
    if num_rows > 0 and hidden > 0:
        tile_h = permute_tile_h(hidden)
        tile_rows = rows_per_program(tile_h, None)  # one row a program on a GPU
        traceable(_gather_rows_kernel)[(ceil_div(num_rows, tile_rows),)](
            src, row_to_token, rows, num_rows, hidden, TILE_ROWS=tile_rows, TILE_H=tile_h,
            num_warps=PERMUTE_NUM_WARPS,
        )
    return rows


def combine_rows(rows: torch.Tensor, flat_to_row: torch.Tensor, top_k: int,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum each token's top_k expert-sorted rows: out[t] = sum_{j < top_k} rows[flat_to_row[t * top_k + j]].

    The sum runs in slot order j = 0 .. top_k - 1 in fp32 and is stored in out_dtype (default rows.dtype), rounded
    once.

    Args:
        rows: [R, H] fp32/fp16/bf16, R = N * top_k.
        flat_to_row: [N * top_k] int32/int64, the expert-sorted row of assignment t * top_k + j.
        top_k: experts per token, >= 1.
        out_dtype: fp32/fp16/bf16, or None for rows.dtype.
    Returns:
        out: [N, H] of out_dtype.
    """
    check_tensor_dim("rows", rows, 2, FLOAT_DTYPES)
    check_tensor_dim("flat_to_row", flat_to_row, 1, INDEX_DTYPES)
    check_int("top_k", top_k, 1)
    out_dtype = rows.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    if flat_to_row.shape[0] != rows.shape[0] or rows.shape[0] % top_k != 0:
        raise ValueError(
            f"flat_to_row must have R = N * top_k entries like rows; got {flat_to_row.shape[0]} entries, "
            f"{rows.shape[0]} rows, top_k {top_k}"
        )
    num_tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=rows.device)  # (N, H)
    if num_tokens > 0 and hidden > 0:
        tile_h = permute_tile_h(hidden)
        tile_tokens = rows_per_program(tile_h, None)  # one token a program on a GPU
        traceable(_combine_rows_kernel)[(ceil_div(num_tokens, tile_tokens),)](
            rows, flat_to_row, out, num_tokens, hidden, top_k, TILE_TOKENS=tile_tokens, TILE_H=tile_h,
            num_warps=PERMUTE_NUM_WARPS,
        )
    return out
