"""Grouped GEMMs over expert-sorted rows: the one building block of every MoE projection, forward and backward.

Two kernels, each called in several roles by the launchers below:
- `_expert_rows_gemm`: per expert e, out[rows of e] = A[rows of e] @ B_e, in one of two layouts:
  RAGGED_OUT (hidden -> expert width): A rows gathered from a [N, H] source by row_to_token,
      B_e[k, n] = weight[width_off_e + n, k], out = expert e's [count_e, W_e] block of a ragged buffer; on request
      it also writes the rows it gathers, in expert-sorted order, for the weight gradient. For large 16-bit problems
      from Hopper on, B loads by TMA.
      Roles: up projection (+ activation and routing weight), down projection backward (dA = dL/d act; for large
      problems and one-projection activations + the activation's backward and the routing weight's gradient, in
      partial sums per column tile).
  not RAGGED_OUT (expert width -> hidden): A = expert e's block of a ragged buffer,
      B_e[k, n] = weight[width_off_e + k, n], out = rows [R, H].
      Roles: down projection, input grad rows (dX before combine).
- `_weight_grad_gemm`: per expert e, dW[width_off_e + m, n] = sum over rows r of e of A[r, m] * B[token(r), n],
  A ragged, B gathered from a [N, H] source, or the [R, H] token rows already in expert-sorted order (the copies
  above), which load by TMA from Hopper on. Roles: dW2 (A = the weighted activations the forward kept, B =
  grad_out's rows), dW1 (B = x's rows; + dV1 in the same launch).
Both accumulate in fp32 and never use atomics, so every result is bitwise reproducible. A third, row-wise kernel,
`_activation_backward_rows`, finishes the down projection's backward on the ragged dA where the dA GEMM does not
(gated activations, small problems): the activation's derivative, the routing weight and the routing weight's
gradient (a whole row's dot product, so no partial sums).

Layout arguments shared by the launchers (R = N * top_k expert-sorted rows, E experts, H hidden):
    row_to_token: [R] int32/int64, token of each row; rows are sorted by expert.
    expert_row_offsets: [E+1] int32/int64, rows of expert e are expert_row_offsets[e] : expert_row_offsets[e+1].
    expert_width_offsets: [E+1] int32/int64, prefix sums of expert_widths; expert e owns weight rows
        expert_width_offsets[e] : expert_width_offsets[e+1] of each [TW, H] weight.
    expert_widths: the E widths W_e >= 1 as host ints (they size the launch grid without a device sync).
    expert_h_offsets: [E+1] int64, prefix sums of count_e * W_e; expert e's hidden activations are the dense
        row-major [count_e, W_e] block starting there in each ragged 1-D buffer (h_pre, h_up, h_act, ...).
    blocks: tile sizes; tuning.gemm_blocks(dtype, role, ...) when None (each launcher is one role).
All tensors are contiguous and on one device; float operands of one call share one dtype (fp32, fp16, bf16).
"""

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from triton_moe.kernels.activation import activation_backward, activation_forward, check_activation, is_gated
from triton_moe.kernels.host import FLOAT_DTYPES, INDEX_DTYPES, ceil_div, check_tensor_shape, next_power_of_2
from triton_moe.kernels.tuning import (PERMUTE_NUM_WARPS, ROW_PASS_ELEMENTS, GemmBlocks, gemm_blocks,
                                       fused_dh_pays_off, permute_block_h, tma_readable,
                                       weights_by_tma)

# The largest common factor of the expert widths worth telling the compiler (WIDTH_MULTIPLE): 16 elements hold
# a whole 16-byte vector in every dtype, and Triton marks integer arguments divisible by 16 the same way.
WIDTH_ALIGNMENT = 16


@triton.jit
def _expert_of_tile(tile_id, tiles_per_expert, experts):
    """The expert owning tile `tile_id` and that expert's first tile id.

    tiles_per_expert [EXPERTS_POW2] int32 counts each expert's tiles (0 in padding lanes), experts are laid out
    one after another. Past the last tile the expert returned is >= the number of experts.
    """
    tile_ends = tl.cumsum(tiles_per_expert, 0)
    expert = tl.sum((tile_ends <= tile_id).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(experts < expert, tiles_per_expert, 0), 0)
    return expert, first_tile


@triton.jit
def _expert_extent(expert, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr,
                   WIDTH_MULTIPLE: tl.constexpr):
    """(first row, rows, first weight row, width, start of the ragged block) of one expert."""
    row_start = tl.load(expert_row_offsets_ptr + expert)
    num_rows = tl.load(expert_row_offsets_ptr + expert + 1) - row_start
    width_start = tl.load(expert_width_offsets_ptr + expert)
    # Every width, hence every block start in the ragged buffers, is a multiple of WIDTH_MULTIPLE. Loaded from
    # memory, the compiler cannot know it: without the hint each ragged row access is split into 2-byte ones.
    width = tl.multiple_of(tl.load(expert_width_offsets_ptr + expert + 1) - width_start, WIDTH_MULTIPLE)
    h_start = tl.multiple_of(tl.load(expert_h_offsets_ptr + expert).to(tl.int64), WIDTH_MULTIPLE)
    return row_start, num_rows, width_start, width, h_start


@triton.jit
def _expert_rows_gemm(
    a_ptr, a2_ptr, b_ptr, b2_ptr, b_desc, b2_desc,
    out_ptr, out2_ptr, out3_ptr, a_rows_ptr, h_pre_ptr, partials_ptr,
    row_weights_ptr, row_weight_index_ptr,
    row_to_token_ptr, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr,
    num_experts, hidden, partial_tiles,
    RAGGED_OUT: tl.constexpr,
    SECOND_PRODUCT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    INDEXED_ROW_WEIGHTS: tl.constexpr,
    COPY_A_ROWS: tl.constexpr,
    B_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    """One (expert, row tile, column tile) of out = A @ B_e; see the module docstring for the two layouts.

    COPY_A_ROWS (RAGGED_OUT only): the program of column tile 0 of each row tile also stores the A rows it gathers,
    a_rows[r] = A[row_to_token[r]] ([R, H], rows in expert-sorted order), for the weight gradient to read.
    B_TMA (RAGGED_OUT only): B_e's tiles (and B2_e's) load through b_desc (b2_desc), TMA descriptors of the [TW, H]
    weights in boxes of BLOCK_N weight rows x BLOCK_K; past the expert's width they hold the next expert's rows,
    which only reach output columns the store masks.

    SECOND_PRODUCT: "none"; "shared_a": acc2 = A @ B2_e from the same A tiles (swiglu gate and up);
        "summed": acc += A2 @ B2_e (dX of swiglu: dh_gate @ w1_e + dh_up @ v1_e), in a second K loop.
    EPILOGUE:
        "act_forward": out = h_pre = acc, out2 = h_up = acc2 (GATED), out3 = act(h_pre[, h_up]), times row r's
            routing weight if HAS_ROW_WEIGHTS: row_weights[row_weight_index[r]] if INDEXED_ROW_WEIGHTS, else
            row_weights[r].
        "act_backward" (not GATED): acc is dA, the gradient for the rows' unweighted activations; with
            a = act(h_pre) recomputed from the ragged h_pre: out = dh_pre = w_r * dA * act'(h_pre), and, if
            HAS_ROW_WEIGHTS, partials[slot_r, col_tile] = the tile's columns of sum_n dA * a (partials is
            [R, partial_tiles], rows in row_weights' order; the launcher sums each row, the routing weight's
            gradient, and an expert with fewer column tiles writes zeros in the rest). dA is rounded to out's
            dtype first, as the row pass reads it.
        "store": out = acc.
    """
    tile_id = tl.program_id(0)
    # The tiles per expert depend on the routing, which only the device knows: every program recomputes the
    # schedule from the E row counts instead of the host reading them back (a device sync).
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    rows_per_expert = tl.load(expert_row_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        expert_row_offsets_ptr + experts, mask=is_expert, other=0
    )
    if RAGGED_OUT:
        widths = tl.load(expert_width_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
            expert_width_offsets_ptr + experts, mask=is_expert, other=0
        )
        col_tiles_per_expert = tl.cdiv(widths, BLOCK_N)
    else:
        col_tiles_per_expert = tl.cdiv(hidden, BLOCK_N)
    tiles_per_expert = (tl.cdiv(rows_per_expert, BLOCK_M) * col_tiles_per_expert).to(tl.int32)
    expert, first_tile = _expert_of_tile(tile_id, tiles_per_expert, experts)
    if expert >= num_experts:
        return

    row_start, num_rows, width_start, width, h_start = _expert_extent(
        expert, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr, WIDTH_MULTIPLE)
    if RAGGED_OUT:
        num_cols = width
        reduce_size = hidden
    else:
        num_cols = hidden
        reduce_size = width
    # Column tiles fastest: consecutive programs, which run at the same time, share one tile of A rows (a
    # gather of token rows, or a slab of the ragged buffer) and sweep the expert's weight slice, which is at
    # most a few MiB and stays in L2 across the expert's row tiles. Row tiles fastest would instead re-read
    # every A row once per column tile, far apart in time, from DRAM for large experts.
    col_tiles = tl.cdiv(num_cols, BLOCK_N)
    row_tile = (tile_id - first_tile) // col_tiles
    col_tile = (tile_id - first_tile) % col_tiles
    expert_rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) row index within the expert
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    row_mask = expert_rows < num_rows
    col_mask = cols < num_cols
    rows = row_start + expert_rows  # (BLOCK_M,) expert-sorted row ids
    if RAGGED_OUT:
        tokens = tl.load(row_to_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        a_offsets = tokens[:, None] * hidden + ks[None, :]  # (BLOCK_M, BLOCK_K)
        b_offsets = (width_start + cols[None, :]).to(tl.int64) * hidden + ks[:, None]  # (BLOCK_K, BLOCK_N)
        b_step = BLOCK_K
        out_offsets = h_start + expert_rows[:, None].to(tl.int64) * width + cols[None, :]
        a_rows_offsets = rows[:, None].to(tl.int64) * hidden + ks[None, :]  # (BLOCK_M, BLOCK_K)
        # One program per row tile copies: column tile 0, as a mask (a branch in the loop costs the pipeline).
        copies_rows = (ks[None, :] * 0 + col_tile) == 0  # (1, BLOCK_K)
        b_tma_row = (width_start + col_tile * BLOCK_N).to(tl.int32)  # TMA coordinates of B_eᵀ's tile: int32
        b_tma_col = 0
    else:
        a_offsets = h_start + expert_rows[:, None].to(tl.int64) * width + ks[None, :]  # (BLOCK_M, BLOCK_K)
        b_offsets = (width_start + ks[:, None]).to(tl.int64) * hidden + cols[None, :]  # (BLOCK_K, BLOCK_N)
        b_step = BLOCK_K * hidden
        out_offsets = rows[:, None].to(tl.int64) * hidden + cols[None, :]  # (BLOCK_M, BLOCK_N)

    if EPILOGUE != "store" and HAS_ROW_WEIGHTS:
        # Loaded before the K loop, the two dependent loads (slot, then weight) wait alongside the GEMM rather than
        # at its end, where they cost the up projection at hidden 2048 up to 0.04 ms with 3 pipeline stages and
        # 0.07-0.11 ms with 4 (up_epilogue.md).
        weight_slots = rows
        if INDEXED_ROW_WEIGHTS:
            weight_slots = tl.load(row_weight_index_ptr + rows, mask=row_mask, other=0)
        row_weights = tl.load(row_weights_ptr + weight_slots, mask=row_mask, other=0.0)  # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SECOND_PRODUCT == "shared_a":
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, reduce_size, BLOCK_K):
        k_mask = ks < reduce_size - k_start
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_mask = k_mask[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + a_offsets, mask=a_mask, other=0.0)
        if B_TMA:
            tl.static_assert(RAGGED_OUT, "only the hidden -> width layout reads B by TMA")
            b = b_desc.load([b_tma_row, b_tma_col]).T
        else:
            b = tl.load(b_ptr + b_offsets, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if COPY_A_ROWS:
            tl.static_assert(RAGGED_OUT, "only the gathered A rows are copied")
            # A load of its own (from L2, and none in the other column tiles, whose mask is empty): storing the
            # dot's own `a` tile as well made the H100's dot results wrong (triton 3.6).
            copy_mask = a_mask & copies_rows
            tl.store(a_rows_ptr + a_rows_offsets, tl.load(a_ptr + a_offsets, mask=copy_mask), mask=copy_mask)
            a_rows_offsets += BLOCK_K
        if SECOND_PRODUCT == "shared_a":
            if B_TMA:
                b2 = b2_desc.load([b_tma_row, b_tma_col]).T
            else:
                b2 = tl.load(b2_ptr + b_offsets, mask=b_mask, other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
        a_offsets += BLOCK_K
        b_offsets += b_step
        if B_TMA:
            b_tma_col += BLOCK_K
    if SECOND_PRODUCT == "summed":
        # The second product in a K loop of its own, after the first: one operand pair in flight per step, so
        # this launch takes the wide tiles of the one-product GEMMs, which two pairs a step did not fit. The
        # offsets are computed afresh: rewound by subtraction, they lost what the compiler knew of their
        # contiguity, and the GEMM ran at 22-216 TFLOP/s (sweep_dx_swiglu.md).
        tl.static_assert(not RAGGED_OUT, "summed: the expert width -> hidden layout")
        a_offsets = h_start + expert_rows[:, None].to(tl.int64) * width + ks[None, :]  # (BLOCK_M, BLOCK_K)
        b_offsets = (width_start + ks[:, None]).to(tl.int64) * hidden + cols[None, :]  # (BLOCK_K, BLOCK_N)
        for k_start in range(0, reduce_size, BLOCK_K):
            k_mask = ks < reduce_size - k_start
            a2 = tl.load(a2_ptr + a_offsets, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptr + b_offsets, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
            a_offsets += BLOCK_K
            b_offsets += b_step

    out_mask = row_mask[:, None] & col_mask[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if EPILOGUE == "act_forward":
        # The activation reads h_pre (and h_up) as stored, so the backward pass recomputes exactly this h_act.
        h_pre = acc.to(out_dtype)
        tl.store(out_ptr + out_offsets, h_pre, mask=out_mask)
        h_up = None
        if GATED:
            h_up = acc2.to(out_dtype)
            tl.store(out2_ptr + out_offsets, h_up, mask=out_mask)
            h_up = h_up.to(tl.float32)
        h_act = activation_forward(h_pre.to(tl.float32), h_up, ACTIVATION)
        if HAS_ROW_WEIGHTS:
            # Scaled here, the routing weight costs the down projection nothing, and the down projection's
            # weight gradient reads these same values as a plain operand.
            h_act = h_act * row_weights[:, None]
        tl.store(out3_ptr + out_offsets, h_act.to(out_dtype), mask=out_mask)
    elif EPILOGUE == "act_backward":
        tl.static_assert(RAGGED_OUT and not GATED, "act_backward: the dA GEMM of a one-projection activation")
        d_act = acc.to(out_dtype).to(tl.float32)
        h_pre = tl.load(h_pre_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        if HAS_ROW_WEIGHTS:
            # Masked: past the width, B's TMA tiles may have put the next expert's products in dA.
            partial = tl.sum(tl.where(out_mask, d_act * activation_forward(h_pre, None, ACTIVATION), 0.0), 1)
            partial_offsets = weight_slots.to(tl.int64) * partial_tiles  # (BLOCK_M,)
            tl.store(partials_ptr + partial_offsets + col_tile, partial, mask=row_mask)
            if col_tile == col_tiles - 1:
                for zero_tile in range(col_tiles, partial_tiles):
                    tl.store(partials_ptr + partial_offsets + zero_tile, tl.zeros_like(partial), mask=row_mask)
            d_act = d_act * row_weights[:, None]
        d_act_d_pre, _ = activation_backward(h_pre, None, ACTIVATION)
        tl.store(out_ptr + out_offsets, (d_act * d_act_d_pre).to(out_dtype), mask=out_mask)
    else:
        tl.static_assert(EPILOGUE == "store", "unknown epilogue")
        tl.store(out_ptr + out_offsets, acc.to(out_dtype), mask=out_mask)


@triton.jit
def _weight_grad_gemm(
    a_ptr, a2_ptr, b_ptr, b_desc,
    out_ptr, out2_ptr,
    row_to_token_ptr, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr,
    num_experts, hidden,
    SECOND_OUTPUT: tl.constexpr,
    B_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    """One (expert, width tile, hidden tile) of out[width_off_e + m, n] = sum_r A[r, m] * B[token(r), n].

    A is ragged. With SECOND_OUTPUT, out2 = A2^T @ B with A2 ragged at a2_ptr, sharing the B loads. The reduction
    runs over the expert's rows, BLOCK_K at a time; an expert without rows stores 0. B_ROWS says where row r's
    token row is:
        "gathered": row row_to_token[r] of B [N, H], by masked pointer loads;
        "sorted": row r of B [R, H] (the token rows already in expert-sorted order), by masked pointer loads;
        "sorted_tma": the same through b_desc, a TMA descriptor of B with [BLOCK_K, BLOCK_N] boxes, unmasked: an
            expert's last step reads the next expert's first rows (zeros past R), which A's masked zeros cancel.
            (Only a non-finite value there would leak in, as 0 * inf.)
    """
    tile_id = tl.program_id(0)
    # The tiles depend only on the widths and H: the grid is exact and every program owns a tile.
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    widths = tl.load(expert_width_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        expert_width_offsets_ptr + experts, mask=is_expert, other=0
    )
    hidden_tiles = tl.cdiv(hidden, BLOCK_N)
    tiles_per_expert = (tl.cdiv(widths, BLOCK_M) * hidden_tiles).to(tl.int32)
    expert, first_tile = _expert_of_tile(tile_id, tiles_per_expert, experts)

    row_start, num_rows, width_start, width, h_start = _expert_extent(
        expert, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr, WIDTH_MULTIPLE)
    # Width tiles fastest: the programs running together share the B tiles of one hidden tile, the irregular
    # gather of token rows, while each reads its own contiguous columns of the expert's ragged block.
    width_tiles = tl.cdiv(width, BLOCK_M)
    width_tile = (tile_id - first_tile) % width_tiles
    hidden_tile = (tile_id - first_tile) // width_tiles
    ms = width_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) column within the expert's width
    ns = hidden_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)  # (BLOCK_K,) row within a step over the expert's rows
    m_mask = ms < width
    n_mask = ns < hidden
    a_offsets = h_start + ks[None, :].to(tl.int64) * width + ms[:, None]  # (BLOCK_M, BLOCK_K): A transposed
    # TMA coordinates are int32: R < 2^31 rows (the launcher checks), so are the expert's first row and H.
    b_row = row_start.to(tl.int32)
    b_col = (hidden_tile * BLOCK_N).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SECOND_OUTPUT:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, num_rows, BLOCK_K):
        k_mask = ks < num_rows - k_start
        if B_ROWS == "sorted_tma":
            b = b_desc.load([b_row, b_col])
            b_row += BLOCK_K
        else:
            b_rows = row_start + k_start + ks  # (BLOCK_K,) expert-sorted row ids
            if B_ROWS == "gathered":
                b_rows = tl.load(row_to_token_ptr + b_rows, mask=k_mask, other=0)
            else:
                tl.static_assert(B_ROWS == "sorted", "unknown B_ROWS")
            b_offsets = b_rows[:, None].to(tl.int64) * hidden + ns[None, :]  # (BLOCK_K, BLOCK_N)
            b = tl.load(b_ptr + b_offsets, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_offsets, mask=a_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if SECOND_OUTPUT:
            a2 = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0)
            acc2 = tl.dot(a2, b, acc2, input_precision=DOT_PRECISION)
        a_offsets += BLOCK_K * width

    out_offsets = (width_start + ms[:, None]).to(tl.int64) * hidden + ns[None, :]  # (BLOCK_M, BLOCK_N)
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if SECOND_OUTPUT:
        tl.store(out2_ptr + out_offsets, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _activation_backward_rows(
    d_act_ptr, h_pre_ptr, h_up_ptr, row_weights_ptr, row_weight_index_ptr,
    dh_up_ptr, d_row_weights_ptr,
    expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr,
    num_rows, num_experts,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    INDEXED_ROW_WEIGHTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    UNIFORM_WIDTH: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    """BLOCK_ROWS expert-sorted rows of the ragged dA (the gradient for the rows' unweighted activations), in place.

    With act = act(h_pre[, h_up]) recomputed in fp32: d_row_weights[r] = sum_n dA * act (if HAS_ROW_WEIGHTS),
    then dA becomes dh_pre = row_weights[r] * dA * d act / d h_pre, and dh_up = row_weights[r] * dA * d act / d h_up
    (GATED). Each row has its expert's width and place in the buffer; the rows are walked BLOCK_W columns a step.
    Row r's weight, and its gradient, sit at row_weight_index[r] of row_weights and d_row_weights if
    INDEXED_ROW_WEIGHTS, else at r. UNIFORM_WIDTH > 0: every expert has that width, so row r starts at r * W in
    the ragged buffers, without looking up its expert (which compares the row with every expert's end).
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    row_mask = rows < num_rows
    if UNIFORM_WIDTH > 0:
        row_offsets = rows.to(tl.int64) * UNIFORM_WIDTH  # (BLOCK_ROWS,)
        width = tl.where(row_mask, UNIFORM_WIDTH, 0)
    else:
        experts = tl.arange(0, EXPERTS_POW2)
        is_expert = experts < num_experts
        expert_row_ends = tl.load(expert_row_offsets_ptr + experts + 1, mask=is_expert, other=0)  # (EXPERTS_POW2,)
        expert = tl.sum(((expert_row_ends[None, :] <= rows[:, None]) & is_expert[None, :]).to(tl.int32), 1)
        expert = tl.where(row_mask, expert, 0)  # (BLOCK_ROWS,); rows past the end read expert 0's extent, unused
        row_start, _, _, width, h_start = _expert_extent(
            expert, expert_row_offsets_ptr, expert_width_offsets_ptr, expert_h_offsets_ptr, WIDTH_MULTIPLE)
        row_offsets = h_start + (rows - row_start).to(tl.int64) * width  # (BLOCK_ROWS,)
        width = tl.where(row_mask, width, 0)
    cols = tl.arange(0, BLOCK_W)  # (BLOCK_W,)
    if HAS_ROW_WEIGHTS:
        weight_slots = rows
        if INDEXED_ROW_WEIGHTS:
            weight_slots = tl.load(row_weight_index_ptr + rows, mask=row_mask, other=0)
        row_weights = tl.load(row_weights_ptr + weight_slots, mask=row_mask, other=0.0)[:, None]  # (BLOCK_ROWS, 1)
        row_weight_grads = tl.zeros((BLOCK_ROWS, BLOCK_W), dtype=tl.float32)
    for col_start in range(0, tl.max(width, 0), BLOCK_W):
        mask = cols[None, :] < width[:, None] - col_start  # (BLOCK_ROWS, BLOCK_W)
        offsets = row_offsets[:, None] + col_start + cols[None, :]
        d_act = tl.load(d_act_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h_pre = tl.load(h_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h_up = None
        if GATED:
            h_up = tl.load(h_up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROW_WEIGHTS:
            row_weight_grads += d_act * activation_forward(h_pre, h_up, ACTIVATION)
            d_act = d_act * row_weights
        d_act_d_pre, d_act_d_up = activation_backward(h_pre, h_up, ACTIVATION)
        tl.store(d_act_ptr + offsets, (d_act * d_act_d_pre).to(d_act_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(dh_up_ptr + offsets, (d_act * d_act_d_up).to(dh_up_ptr.dtype.element_ty), mask=mask)
    if HAS_ROW_WEIGHTS:
        tl.store(d_row_weights_ptr + weight_slots, tl.sum(row_weight_grads, 1), mask=row_mask)


@functools.lru_cache(maxsize=64)
def _width_facts(expert_widths: tuple[int, ...]) -> tuple[int, int, dict]:
    """(total width, smallest width, the compile-time constants every kernel here takes) of the expert widths.

    Computed once per set of widths rather than per launch: with 64 or 128 experts the Python loops over the widths
    were a good part of a launcher's host time.
    """
    constants = dict(EXPERTS_POW2=next_power_of_2(len(expert_widths)),
                     WIDTH_MULTIPLE=math.gcd(WIDTH_ALIGNMENT, *expert_widths))
    return sum(expert_widths), min(expert_widths, default=0), constants


def _total_width(expert_widths) -> int:
    return _width_facts(tuple(expert_widths))[0]


def _uniform_width(expert_widths) -> int:
    """The experts' one width, or 0 when they differ (then expert_h_offsets are not simply rows times a width)."""
    total, smallest, _ = _width_facts(tuple(expert_widths))
    return smallest if smallest * len(expert_widths) == total else 0


@functools.lru_cache(maxsize=256)
def _tiles_per_row_block(expert_widths: tuple[int, ...], block: int) -> tuple[int, int]:
    """(largest, sum) over the experts of cdiv(W_e, block): the tiles of one block of rows (or of one row of
    blocks) across the experts' widths."""
    tiles = [ceil_div(width, block) for width in expert_widths]
    return max(tiles), sum(tiles)


def _check_token_rows(name, tensor, dtypes):
    """`tensor` is a contiguous [N, H] matrix of token rows with a dtype in `dtypes`."""
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [N, H], got shape {tuple(tensor.shape)}")
    check_tensor_shape(name, tensor, tensor.shape, dtypes)


def _check_row_weights(row_weights, row_weight_index, num_rows):
    """`row_weights` is None or R fp32 routing weights, of the expert-sorted rows in order, or in any order with
    `row_weight_index` [R] giving each row's place among them."""
    if row_weights is not None:
        check_tensor_shape("row_weights", row_weights, (num_rows,), (torch.float32,))
    if row_weight_index is not None:
        if row_weights is None:
            raise ValueError("row_weight_index needs row_weights")
        check_tensor_shape("row_weight_index", row_weight_index, (num_rows,), INDEX_DTYPES)


def _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, total_width):
    """Validate the layout arguments against weights of `total_width` rows."""
    num_experts = len(expert_widths)
    widths_total, smallest_width, _ = _width_facts(tuple(expert_widths))
    if num_experts == 0 or smallest_width < 1:
        raise ValueError(f"expert_widths must list at least one expert, each >= 1, got {expert_widths}")
    if widths_total != total_width:
        raise ValueError(f"expert_widths sum to {widths_total}, but the weights have {total_width} rows")
    check_tensor_shape("expert_row_offsets", expert_row_offsets, (num_experts + 1,), INDEX_DTYPES)
    check_tensor_shape("expert_width_offsets", expert_width_offsets, (num_experts + 1,), INDEX_DTYPES)
    check_tensor_shape("expert_h_offsets", expert_h_offsets, (num_experts + 1,), (torch.int64,))


def _check_row_copy(name, rows, token_rows, num_rows):
    """`rows` is None or the [R, H] destination of the expert-sorted copy of `token_rows` [N, H]."""
    if rows is not None:
        check_tensor_shape(name, rows, (num_rows, token_rows.shape[1]), (token_rows.dtype,))


def _check_gated_pair(name, tensor, activation, shape, dtype):
    """`tensor` (the second projection or its grad) is given exactly when `activation` is gated."""
    if tensor is None:
        if is_gated(activation):
            raise ValueError(f"{name} is required for the gated activation {activation!r}")
    elif not is_gated(activation):
        raise ValueError(f"{name} must be None for the activation {activation!r}")
    else:
        check_tensor_shape(name, tensor, shape, (dtype,))


def _layout_constants(expert_widths):
    """The compile-time facts of the layout that every kernel here takes."""
    return _width_facts(tuple(expert_widths))[2]


def _launch_options(dtype, blocks, expert_widths):
    """The compile-time arguments and launch options both GEMM kernels share."""
    return dict(
        # fp32 must match an fp64 reference to 1e-4, which TF32 products (~1e-3) would miss. For 16-bit operands
        # the setting does not apply and Triton's default is passed.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        **_layout_constants(expert_widths),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


def _expert_rows_gemm_launch(
    *, a, b, out, num_rows, ragged_out, epilogue, expert_row_offsets, expert_width_offsets, expert_widths,
    expert_h_offsets, blocks, role, a2=None, b2=None, second_product="none", out2=None, out3=None,
    row_weights=None, row_weight_index=None, row_to_token=None, activation=None, a_rows=None, h_pre=None,
    partials=None,
):
    """Launch `_expert_rows_gemm` over a grid bounding the (unknown on the host) tiles of all experts.

    The hidden -> width layout reads the weights by TMA where tuning.weights_by_tma says so."""
    hidden = b.shape[1]
    blocks = blocks or gemm_blocks(a.dtype, role, gated=b2 is not None, rows_x_hidden=num_rows * hidden,
                                   hidden=hidden)
    if ragged_out:
        most_col_tiles, col_tiles_sum = _tiles_per_row_block(tuple(expert_widths), blocks.block_n)
    else:
        most_col_tiles = ceil_div(hidden, blocks.block_n)
        col_tiles_sum = most_col_tiles * len(expert_widths)
    # cdiv(rows_e, M) <= rows_e // M + 1 and sum_e rows_e // M <= cdiv(R, M): an upper bound on the tiles;
    # programs past the last tile exit at once.
    grid = (ceil_div(num_rows, blocks.block_m) * most_col_tiles + col_tiles_sum,)
    b_desc = b2_desc = None  # TMA descriptors of the weights, in boxes of BLOCK_N weight rows x BLOCK_K
    if ragged_out and weights_by_tma(b, num_rows) and (b2 is None or weights_by_tma(b2, num_rows)):
        box = [blocks.block_n, blocks.block_k]
        b_desc = TensorDescriptor(b, list(b.shape), [hidden, 1], box)
        b2_desc = None if b2 is None else TensorDescriptor(b2, list(b2.shape), [hidden, 1], box)
    _expert_rows_gemm[grid](
        a, a2, b, b2, b_desc, b2_desc,
        out, out2, out3, a_rows, h_pre, partials,
        row_weights, row_weight_index,
        row_to_token, expert_row_offsets, expert_width_offsets, expert_h_offsets,
        len(expert_widths), hidden, 0 if partials is None else partials.shape[1],
        RAGGED_OUT=ragged_out,
        SECOND_PRODUCT=second_product,
        EPILOGUE=epilogue,
        ACTIVATION=activation,
        GATED=activation is not None and is_gated(activation),
        HAS_ROW_WEIGHTS=row_weights is not None,
        INDEXED_ROW_WEIGHTS=row_weight_index is not None,
        COPY_A_ROWS=a_rows is not None,
        B_TMA=b_desc is not None,
        **_launch_options(a.dtype, blocks, expert_widths),
    )


def up_projection(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor | None,
    row_to_token: torch.Tensor,
    expert_row_offsets: torch.Tensor,
    expert_width_offsets: torch.Tensor,
    expert_widths: Sequence[int],
    expert_h_offsets: torch.Tensor,
    h_numel: int,
    activation: str,
    row_weights: torch.Tensor | None = None,
    *,
    row_weight_index: torch.Tensor | None = None,
    x_rows: torch.Tensor | None = None,
    blocks: GemmBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Up projection of every expert-sorted row, and the expert activation, into ragged buffers.

    For row r (token t = row_to_token[r]) of expert e: h_pre[r, n] = x[t] . w1[width_off_e + n],
    h_up[r, n] = x[t] . v1[width_off_e + n], h_act = act(h_pre[, h_up]) * row_weights[r], for n < W_e.

    Args:
        x: [N, H] fp32/fp16/bf16 token activations.
        w1: [TW, H] like x: the up projection (the gate for swiglu).
        v1: [TW, H] like x: the up projection of a gated activation; None otherwise.
        h_numel: sum_e count_e * W_e, the length of the ragged buffers.
        activation: a name in activation.ACTIVATIONS.
        row_weights: [R] fp32 routing weight of each row; None leaves h_act unscaled. The activation is computed
            in fp32 from h_pre (and h_up) as stored, scaled, then rounded once to x.dtype.
        row_weight_index: [R] int32/int64, a permutation of the rows: row r's weight is
            row_weights[row_weight_index[r]] (the sort's row_to_flat, for weights in (token, slot) order); None:
            row_weights[r].
        x_rows: [R, H] like x, or None. Given, the GEMM also writes into it the rows it gathers, x_rows[r] = x[t]
            (the token rows in expert-sorted order, which weight_grad reads).
        (layout arguments and blocks: see the module docstring)
    Returns:
        h_pre, h_up (None unless gated), h_act: ragged [h_numel] buffers of x.dtype.
    """
    check_activation(activation)
    _check_token_rows("x", x, FLOAT_DTYPES)
    check_tensor_shape("w1", w1, (_total_width(expert_widths), x.shape[1]), (x.dtype,))
    _check_gated_pair("v1", v1, activation, w1.shape, x.dtype)
    check_tensor_shape("row_to_token", row_to_token, (row_to_token.numel(),), INDEX_DTYPES)
    _check_row_weights(row_weights, row_weight_index, row_to_token.numel())
    _check_row_copy("x_rows", x_rows, x, row_to_token.numel())
    _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, w1.shape[0])
    h_pre = torch.empty(h_numel, dtype=x.dtype, device=x.device)  # (h_numel,) ragged
    h_up = torch.empty_like(h_pre) if is_gated(activation) else None  # (h_numel,) ragged
    h_act = torch.empty_like(h_pre)  # (h_numel,) ragged
    if row_to_token.numel() > 0:
        _expert_rows_gemm_launch(
            role="up",
            a=x, b=w1, b2=v1, second_product="shared_a" if is_gated(activation) else "none",
            out=h_pre, out2=h_up, out3=h_act, num_rows=row_to_token.numel(), ragged_out=True,
            epilogue="act_forward", activation=activation, row_weights=row_weights,
            row_weight_index=row_weight_index, row_to_token=row_to_token, a_rows=x_rows,
            expert_row_offsets=expert_row_offsets, expert_width_offsets=expert_width_offsets,
            expert_widths=expert_widths, expert_h_offsets=expert_h_offsets, blocks=blocks,
        )
    return h_pre, h_up, h_act


def down_projection(
    h_act: torch.Tensor,
    w2: torch.Tensor,
    expert_row_offsets: torch.Tensor,
    expert_width_offsets: torch.Tensor,
    expert_widths: Sequence[int],
    expert_h_offsets: torch.Tensor,
    num_rows: int,
    *,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """Down projection of every expert-sorted row.

    For row r of expert e (i = r - expert_row_offsets[e]): y[r] = sum_k h_act_e[i, k] * w2[width_off_e + k],
    with h_act_e expert e's [count_e, W_e] block.

    Args:
        h_act: ragged [sum_e count_e * W_e] fp32/fp16/bf16 activations (up_projection's, already scaled by the
            routing weights when it was given them).
        w2: [TW, H] like h_act: the down projection.
        num_rows: R, the number of expert-sorted rows.
        (layout arguments and blocks: see the module docstring)
    Returns:
        y: [R, H] of h_act.dtype, one row per expert-sorted row (combine_rows sums them per token).
    """
    check_tensor_shape("h_act", h_act, (h_act.numel(),), FLOAT_DTYPES)
    check_tensor_shape("w2", w2, (_total_width(expert_widths), w2.shape[-1]), (h_act.dtype,))
    _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, w2.shape[0])
    y = torch.empty((num_rows, w2.shape[1]), dtype=h_act.dtype, device=h_act.device)  # (R, H)
    if num_rows > 0:
        _expert_rows_gemm_launch(
            role="down",
            a=h_act, b=w2, out=y, num_rows=num_rows, ragged_out=False, epilogue="store",
            expert_row_offsets=expert_row_offsets, expert_width_offsets=expert_width_offsets,
            expert_widths=expert_widths, expert_h_offsets=expert_h_offsets, blocks=blocks,
        )
    return y


def down_projection_backward(
    grad_out: torch.Tensor,
    w2: torch.Tensor,
    h_pre: torch.Tensor,
    h_up: torch.Tensor | None,
    row_to_token: torch.Tensor,
    expert_row_offsets: torch.Tensor,
    expert_width_offsets: torch.Tensor,
    expert_widths: Sequence[int],
    expert_h_offsets: torch.Tensor,
    row_weights: torch.Tensor | None,
    activation: str,
    *,
    row_weight_index: torch.Tensor | None = None,
    grad_out_rows: torch.Tensor | None = None,
    blocks: GemmBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients through the down projection and the activation, back to the ragged pre-activations.

    With dA[r, n] = grad_out[row_to_token[r]] . w2[width_off_e + n] (r of expert e, n < W_e) and
    a = act(h_pre[, h_up]) recomputed: d_row_weights[r] = sum_n dA[r, n] * a[r, n],
    dh_pre = row_weights[r] * dA * d act / d h_pre, dh_up = row_weights[r] * dA * d act / d h_up.
    dA is rounded to grad_out.dtype before the activation's derivative, as stored. Two ways:
    - Large problems (tuning.fused_dh_pays_off) with a one-projection activation (relu², gelu): the GEMM's epilogue
      finishes dh_pre and writes per-column-tile partial sums of d_row_weights, which a sum over the [R, column
      tiles] partials completes (one more small launch, none with a single column tile). Against the two launches
      below, at hidden 2048 on the H100: 1.27 -> 1.20 ms at 128x768, 1.50 -> 1.36 ms at 64x1024, 1.61 -> 1.45 ms
      with variable widths (h100-2026-11-26/rows_ab.md, a probe copy of the kernel, medians, the grad_out copy
      included).
    - Otherwise: the grouped GEMM stores dA in dh_pre's buffer, then a row-wise kernel turns it into dh_pre (and
      dh_up) in place. A gated epilogue (two more tiles, a sigmoid) took 3.6 ms with the 128x256 tiles and 1.76 ms
      with 128x128 ones, against 1.47 for the two launches at 128x768 (h100-2026-11-26/rows_variants.md); in the
      seed configs the fused epilogue and the partial sums' launch cost more than the row pass (tuning.py).

    Args:
        grad_out: [N, H] fp32/fp16/bf16 gradient of the combined output (combine_rows sums rows per token,
            so each row's gradient is its token's).
        w2: [TW, H] like grad_out.
        h_pre, h_up: ragged [sum_e count_e * W_e] like grad_out, from up_projection; h_up None unless gated.
        row_weights, row_weight_index: as given to up_projection (None if they were); d_row_weights comes out in
            row_weights' order (each row writes its own slot, hence the permutation).
        activation: the name given to up_projection.
        grad_out_rows: [R, H] like grad_out, or None. Given, the dA GEMM also writes into it the rows it gathers,
            grad_out_rows[r] = grad_out[row_to_token[r]] (what weight_grad reads for dW2).
        (layout arguments and blocks: see the module docstring)
    Returns:
        dh_pre, dh_up (None unless gated): ragged like h_pre; d_row_weights: [R] fp32, None without row_weights.
    """
    check_activation(activation)
    _check_token_rows("grad_out", grad_out, FLOAT_DTYPES)
    check_tensor_shape("w2", w2, (_total_width(expert_widths), grad_out.shape[1]), (grad_out.dtype,))
    check_tensor_shape("h_pre", h_pre, (h_pre.numel(),), (grad_out.dtype,))
    _check_gated_pair("h_up", h_up, activation, h_pre.shape, grad_out.dtype)
    num_rows = row_to_token.numel()
    check_tensor_shape("row_to_token", row_to_token, (num_rows,), INDEX_DTYPES)
    _check_row_weights(row_weights, row_weight_index, num_rows)
    _check_row_copy("grad_out_rows", grad_out_rows, grad_out, num_rows)
    _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, w2.shape[0])
    dh_pre = torch.empty_like(h_pre)  # (h_numel,) ragged (gated: dA, then dh_pre in place)
    dh_up = None if h_up is None else torch.empty_like(h_up)  # (h_numel,) ragged
    d_row_weights = None if row_weights is None else torch.empty(num_rows, dtype=torch.float32,
                                                                 device=grad_out.device)  # (R,)
    if num_rows == 0:
        return dh_pre, dh_up, d_row_weights
    gemm_arguments = dict(
        role="down_backward", a=grad_out, b=w2, out=dh_pre, num_rows=num_rows, ragged_out=True,
        row_to_token=row_to_token, a_rows=grad_out_rows, expert_row_offsets=expert_row_offsets,
        expert_width_offsets=expert_width_offsets, expert_widths=expert_widths, expert_h_offsets=expert_h_offsets,
        blocks=blocks or gemm_blocks(grad_out.dtype, "down_backward", rows_x_hidden=num_rows * grad_out.shape[1],
                                     hidden=grad_out.shape[1]),
    )
    if not is_gated(activation) and fused_dh_pays_off(num_rows, grad_out.shape[1]):
        partials = None
        if row_weights is not None:
            column_tiles = _tiles_per_row_block(tuple(expert_widths), gemm_arguments["blocks"].block_n)[0]
            partials = (d_row_weights.view(num_rows, 1) if column_tiles == 1 else  # (R, T): rows' tiles' sums
                        torch.empty(num_rows, column_tiles, dtype=torch.float32, device=grad_out.device))
        _expert_rows_gemm_launch(**gemm_arguments, epilogue="act_backward", activation=activation, h_pre=h_pre,
                                 partials=partials, row_weights=row_weights, row_weight_index=row_weight_index)
        if partials is not None and partials.shape[1] > 1:
            torch.sum(partials, dim=1, out=d_row_weights)
        return dh_pre, dh_up, d_row_weights
    _expert_rows_gemm_launch(**gemm_arguments, epilogue="store")
    block_w = permute_block_h(max(expert_widths))
    block_rows = ROW_PASS_ELEMENTS // block_w if ROW_PASS_ELEMENTS > block_w else 1
    _activation_backward_rows[(ceil_div(num_rows, block_rows),)](
        dh_pre, h_pre, h_up, row_weights, row_weight_index,
        dh_up, d_row_weights,
        expert_row_offsets, expert_width_offsets, expert_h_offsets,
        num_rows, len(expert_widths),
        ACTIVATION=activation,
        GATED=is_gated(activation),
        HAS_ROW_WEIGHTS=row_weights is not None,
        INDEXED_ROW_WEIGHTS=row_weight_index is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_W=block_w,
        UNIFORM_WIDTH=_uniform_width(expert_widths),
        **_layout_constants(expert_widths),
        num_warps=PERMUTE_NUM_WARPS,
    )
    return dh_pre, dh_up, d_row_weights


def input_grad_rows(
    dh_pre: torch.Tensor,
    w1: torch.Tensor,
    dh_up: torch.Tensor | None,
    v1: torch.Tensor | None,
    expert_row_offsets: torch.Tensor,
    expert_width_offsets: torch.Tensor,
    expert_widths: Sequence[int],
    expert_h_offsets: torch.Tensor,
    num_rows: int,
    *,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """Gradient of each expert-sorted row's input: dx_rows[r] = dh_pre_e[i] @ w1_e (+ dh_up_e[i] @ v1_e).

    Args:
        dh_pre: ragged [sum_e count_e * W_e] fp32/fp16/bf16, from down_projection_backward.
        w1: [TW, H] like dh_pre.
        dh_up, v1: ragged like dh_pre and [TW, H], both given for a gated activation or both None.
        num_rows: R, the number of expert-sorted rows.
        (layout arguments and blocks: see the module docstring)
    Returns:
        dx_rows: [R, H] of dh_pre.dtype (combine_rows sums them per token into dx).
    """
    check_tensor_shape("dh_pre", dh_pre, (dh_pre.numel(),), FLOAT_DTYPES)
    check_tensor_shape("w1", w1, (_total_width(expert_widths), w1.shape[-1]), (dh_pre.dtype,))
    if (dh_up is None) != (v1 is None):
        raise ValueError("dh_up and v1 must be given together (gated activation) or both be None")
    if dh_up is not None:
        check_tensor_shape("dh_up", dh_up, dh_pre.shape, (dh_pre.dtype,))
        check_tensor_shape("v1", v1, w1.shape, (dh_pre.dtype,))
    _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, w1.shape[0])
    dx_rows = torch.empty((num_rows, w1.shape[1]), dtype=dh_pre.dtype, device=dh_pre.device)  # (R, H)
    if num_rows > 0:
        _expert_rows_gemm_launch(
            role="input_grad",
            a=dh_pre, b=w1, a2=dh_up, b2=v1, second_product="none" if dh_up is None else "summed", out=dx_rows,
            num_rows=num_rows, ragged_out=False, epilogue="store", expert_row_offsets=expert_row_offsets,
            expert_width_offsets=expert_width_offsets, expert_widths=expert_widths,
            expert_h_offsets=expert_h_offsets, blocks=blocks,
        )
    return dx_rows


def weight_grad(
    ragged: torch.Tensor,
    ragged2: torch.Tensor | None,
    token_rows: torch.Tensor,
    row_to_token: torch.Tensor | None,
    expert_row_offsets: torch.Tensor,
    expert_width_offsets: torch.Tensor,
    expert_widths: Sequence[int],
    expert_h_offsets: torch.Tensor,
    *,
    blocks: GemmBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight gradient of a projection: dw[width_off_e + m] = sum over rows r of e of ragged[r, m] * token_rows[t].

    t = row_to_token[r]. This is the gradient of both projections: dw2 from the weighted activations and grad_out,
    dw1 from dh_pre and x (and dv1 from dh_up, as `ragged2`, in the same launch: the token-row loads are shared).
    The token rows come gathered through row_to_token, or already in expert-sorted order (row_to_token None: the
    copies up_projection and down_projection_backward write on request), which from Hopper on load by TMA: a gather
    cannot, and holds the GEMM to ~350-410 TFLOP/s at hidden 2048 where sorted rows reach 510-640 on the H100
    (session8/dw_sorted_rows.md). tuning.sorted_rows_pay_off says when the copies are worth their cost.

    Args:
        ragged: ragged [sum_e count_e * W_e] fp32/fp16/bf16, expert e's rows a [count_e, W_e] block.
        ragged2: ragged like `ragged` for a second gradient over the same token rows, or None.
        token_rows: [N, H] like ragged, gathered per row by row_to_token; or, with row_to_token None, [R, H]: row r
            is the token row of expert-sorted row r.
        row_to_token: [R] int32/int64, or None (token_rows are sorted).
        (layout arguments and blocks: see the module docstring)
    Returns:
        dw, dw_2 (None without ragged2): [TW, H] of ragged.dtype; experts without rows get zeros.
    """
    check_tensor_shape("ragged", ragged, (ragged.numel(),), FLOAT_DTYPES)
    if ragged2 is not None:
        check_tensor_shape("ragged2", ragged2, ragged.shape, (ragged.dtype,))
    _check_token_rows("token_rows", token_rows, (ragged.dtype,))
    if row_to_token is not None:
        check_tensor_shape("row_to_token", row_to_token, (row_to_token.numel(),), INDEX_DTYPES)
    total_width = _total_width(expert_widths)
    _check_layout(expert_row_offsets, expert_width_offsets, expert_widths, expert_h_offsets, total_width)
    num_rows = token_rows.shape[0] if row_to_token is None else row_to_token.numel()
    hidden = token_rows.shape[1]
    shape = (total_width, hidden)
    if num_rows == 0:
        dw = ragged.new_zeros(shape)  # (TW, H)
        return dw, None if ragged2 is None else torch.zeros_like(dw)
    dw = ragged.new_empty(shape)  # (TW, H)
    dw_2 = None if ragged2 is None else torch.empty_like(dw)  # (TW, H)
    if row_to_token is not None:
        b_rows, role = "gathered", "weight_grad"
    elif tma_readable(token_rows):
        b_rows, role = "sorted_tma", "weight_grad_sorted"
    else:
        b_rows, role = "sorted", "weight_grad"
    blocks = blocks or gemm_blocks(ragged.dtype, role, gated=ragged2 is not None, rows_x_hidden=num_rows * hidden,
                                   hidden=hidden)
    rows_desc = None  # a TMA descriptor of the sorted rows, in boxes of BLOCK_K rows x BLOCK_N columns
    if b_rows == "sorted_tma":
        rows_desc = TensorDescriptor(token_rows, list(token_rows.shape), [hidden, 1], [blocks.block_k, blocks.block_n])
    # The grid is exact: the tiles depend only on the widths and H, sum_e cdiv(W_e, BLOCK_M) * cdiv(H, BLOCK_N).
    grid = (_tiles_per_row_block(tuple(expert_widths), blocks.block_m)[1] * ceil_div(hidden, blocks.block_n),)
    _weight_grad_gemm[grid](
        ragged, ragged2, token_rows, rows_desc,
        dw, dw_2,
        row_to_token, expert_row_offsets, expert_width_offsets, expert_h_offsets,
        len(expert_widths), hidden,
        SECOND_OUTPUT=ragged2 is not None,
        B_ROWS=b_rows,
        **_launch_options(ragged.dtype, blocks, expert_widths),
    )
    return dw, dw_2
