"""Moving rows between token order and expert-sorted order: gather (tokens -> rows) and combine (rows -> tokens).

combine_rows sums each token's top_k rows in slot order in fp32, one program per token, so its result is
bitwise reproducible (no atomics).
"""

import torch
import triton
import triton.language as tl

from triton_moe.kernels.host import FLOAT_DTYPES, INDEX_DTYPES, check_tensor_dim
from triton_moe.kernels.tuning import PERMUTE_NUM_WARPS, permute_block_h



@triton.jit
def _gather_rows_kernel(src_ptr, row_to_token_ptr, rows_ptr, hidden, BLOCK_H: tl.constexpr):
    """rows[r] = src[row_to_token[r]], one program per row r."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(row_to_token_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    for col_start in range(0, hidden, BLOCK_H):
        col_mask = cols < hidden - col_start
        values = tl.load(src_ptr + token * hidden + col_start + cols, mask=col_mask)
        tl.store(rows_ptr + row * hidden + col_start + cols, values, mask=col_mask)


@triton.jit
def _combine_rows_kernel(rows_ptr, flat_to_row_ptr, out_ptr, hidden, top_k, BLOCK_H: tl.constexpr):
    """out[t] = sum_{j < top_k} rows[flat_to_row[t * top_k + j]] in slot order, one program per token t."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    for col_start in range(0, hidden, BLOCK_H):
        col_mask = cols < hidden - col_start
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for slot in range(top_k):
            row = tl.load(flat_to_row_ptr + token * top_k + slot).to(tl.int64)
            acc += tl.load(rows_ptr + row * hidden + col_start + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * hidden + col_start + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


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
    rows = torch.empty((num_rows, hidden), dtype=src.dtype, device=src.device)  # (R, H)
    if num_rows > 0 and hidden > 0:
        _gather_rows_kernel[(num_rows,)](
            src, row_to_token, rows, hidden, BLOCK_H=permute_block_h(hidden), num_warps=PERMUTE_NUM_WARPS
        )
    return rows


def combine_rows(rows: torch.Tensor, flat_to_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum each token's top_k expert-sorted rows: out[t] = sum_{j < top_k} rows[flat_to_row[t * top_k + j]].

    The sum runs in slot order j = 0 .. top_k - 1 in fp32 and is stored in rows.dtype.

    Args:
        rows: [R, H] fp32/fp16/bf16, R = N * top_k.
        flat_to_row: [N * top_k] int32/int64, the expert-sorted row of assignment t * top_k + j.
        top_k: experts per token, >= 1.
    Returns:
        out: [N, H] of rows.dtype.
    """
    check_tensor_dim("rows", rows, 2, FLOAT_DTYPES)
    check_tensor_dim("flat_to_row", flat_to_row, 1, INDEX_DTYPES)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if flat_to_row.shape[0] != rows.shape[0] or rows.shape[0] % top_k != 0:
        raise ValueError(
            f"flat_to_row must have R = N * top_k entries like rows; got {flat_to_row.shape[0]} entries, "
            f"{rows.shape[0]} rows, top_k {top_k}"
        )
    num_tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=rows.dtype, device=rows.device)  # (N, H)
    if num_tokens > 0 and hidden > 0:
        _combine_rows_kernel[(num_tokens,)](
            rows, flat_to_row, out, hidden, top_k, BLOCK_H=permute_block_h(hidden), num_warps=PERMUTE_NUM_WARPS
        )
    return out
