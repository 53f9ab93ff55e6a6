"""Grouped GEMMs over expert-sorted rows: the one building block of every MoE projection, forward and backward.

Two kernels, each called in several roles by the launchers below (R = N * top_k expert-sorted rows, E experts,
H hidden; hidden activations are [R, max_width] matrices, see layout.py):
- `_expert_rows_gemm`: per expert e, out[rows of e] = A[rows of e] @ B_e, in one of two layouts:
  RAGGED_OUT (hidden -> expert width): A rows gathered from a [N, H] source by row_to_token,
      B_e[k, n] = weight[width_off_e + n, k], out = columns 0:W_e of expert e's rows of a hidden-activation
      matrix; on request it also writes the rows it gathers, in expert-sorted order, for the weight gradient. For
      large 16-bit problems from Hopper on, B loads by TMA.
      Roles: up projection (+ activation and routing weight), down projection backward (dA = dL/d act; for large
      problems and one-projection activations + the activation's backward and the routing weight's gradient, in
      partial sums per column tile).
  not RAGGED_OUT (expert width -> hidden): A = columns 0:W_e of expert e's rows of a hidden-activation matrix,
      B_e[k, n] = weight[width_off_e + k, n], out = rows [R, H].
      Roles: down projection, input grad rows (dX before combine).
- `_weight_grad_gemm`: per expert e, dW[width_off_e + m, n] = sum over rows r of e of A[r, m] * B[token(r), n],
  A a hidden-activation matrix, B gathered from a [N, H] source, or the [R, H] token rows already in expert-sorted
  order (the copies above), which load by TMA from Hopper on. Roles: dW2 (A = the weighted activations the forward
  kept, B = grad_out's rows), dW1 (B = x's rows; + dV1 in the same launch). Its tiles follow from the widths and H
  alone; where they are too few to fill the GPU (few experts, small H), each expert's rows split into runs whose
  fp32 sums `_sum_row_splits` adds up in order.
On Hopper, large 16-bit problems run the expert width -> hidden GEMMs of one product (down, dX rows), and the
weight gradients of one output over sorted rows, in `persistent.py`'s warp-specialised kernels instead, with the
same sums in the same order. Every GEMM accumulates in fp32 and never uses atomics, so every result is bitwise
reproducible. A third, row-wise kernel, `_activation_backward_rows`, finishes the down projection's backward on dA
where the dA GEMM does not (gated activations, small problems): the activation's derivative, the routing weight and
the routing weight's gradient (a whole row's dot product, so no partial sums).

Every launcher takes the batch's `layout.ExpertLayout` (row and width offsets, widths, R) and `tiles`, the tile
sizes of whichever kernel the launch takes (when None: tuning.gemm_tiles(dtype, role, ...), each launcher being one
role, or tuning.PERSISTENT_TILES for a persistent kernel). All tensors are contiguous and on one device; float
operands of one call share one dtype (fp32, fp16, bf16).
"""

import torch
import triton
import triton.language as tl

from triton_moe.kernels.activation import activation_backward, activation_forward, check_activation, is_gated
from triton_moe.kernels.host import (FLOAT_DTYPES, INDEX_DTYPES, ceil_div, check_int, check_tensor_shape,
                                    row_major_descriptor, traceable)
from triton_moe.kernels.layout import ExpertLayout
from triton_moe.kernels.persistent import grouped_tile, persistent_rows_gemm, persistent_weight_grad
from triton_moe.kernels.tuning import (PERMUTE_NUM_WARPS, PERSISTENT_TILES, SUM_SPLITS_ELEMENTS, GemmTiles,
                                       gemm_tiles, fused_dh_pays_off, row_group, row_pass_tiles, rows_per_program,
                                       takes_persistent_kernel, tma_readable, weight_grad_row_splits, weights_by_tma,
                                       widths_fit_k_steps)

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
def _store_zero_padding(out_ptr, rows, row_mask, tile_start, width, max_width, TILE_M: tl.constexpr,
                        TILE_N: tl.constexpr):
    """Zeros in columns width : max_width of `rows` of a hidden-activation matrix, from the expert's last column
    tile, which starts at column tile_start, on."""
    row_offsets = rows[:, None].to(tl.int64) * max_width  # (TILE_M, 1)
    zeros = tl.zeros((TILE_M, TILE_N), dtype=out_ptr.dtype.element_ty)
    for col_start in range(tile_start, max_width, TILE_N):
        cols = col_start + tl.arange(0, TILE_N)  # (TILE_N,)
        mask = row_mask[:, None] & (cols[None, :] >= width) & (cols[None, :] < max_width)
        tl.store(out_ptr + row_offsets + cols[None, :], zeros, mask=mask)


@triton.jit
def _act_forward_epilogue(acc, acc2, out_ptr, out2_ptr, out3_ptr, out_offsets, out_mask, rows, row_mask,
                          routing_weights, col_tile, col_tiles, num_cols, max_width, ACTIVATION: tl.constexpr,
                          GATED: tl.constexpr, HAS_ROUTING_WEIGHTS: tl.constexpr, ZERO_PADDING: tl.constexpr,
                          TILE_M: tl.constexpr, TILE_N: tl.constexpr):
    """The up projection's tile: h_pre = acc (and h_up = acc2), then act(h_pre[, h_up]) times the rows' routing
    weights; the last column tile also zeroes the padding past the expert's width (ZERO_PADDING)."""
    out_dtype = out_ptr.dtype.element_ty
    # The activation reads h_pre (and h_up) as stored, so the backward pass recomputes exactly this h_act.
    h_pre = acc.to(out_dtype)
    tl.store(out_ptr + out_offsets, h_pre, mask=out_mask)
    h_up = None
    if GATED:
        h_up = acc2.to(out_dtype)
        tl.store(out2_ptr + out_offsets, h_up, mask=out_mask)
        h_up = h_up.to(tl.float32)
    h_act = activation_forward(h_pre.to(tl.float32), h_up, ACTIVATION)
    if HAS_ROUTING_WEIGHTS:
        # Scaled here, the routing weight costs the down projection nothing, and the down projection's weight
        # gradient reads these same values as a plain operand.
        h_act = h_act * routing_weights[:, None]
    tl.store(out3_ptr + out_offsets, h_act.to(out_dtype), mask=out_mask)
    if ZERO_PADDING and col_tile == col_tiles - 1:
        tile_start = col_tile * TILE_N
        _store_zero_padding(out_ptr, rows, row_mask, tile_start, num_cols, max_width, TILE_M, TILE_N)
        if GATED:
            _store_zero_padding(out2_ptr, rows, row_mask, tile_start, num_cols, max_width, TILE_M, TILE_N)
        _store_zero_padding(out3_ptr, rows, row_mask, tile_start, num_cols, max_width, TILE_M, TILE_N)


@triton.jit
def _act_backward_epilogue(acc, out_ptr, h_pre_ptr, partials_ptr, out_offsets, out_mask, row_mask, routing_weights,
                           weight_slots, col_tile, col_tiles, partial_tiles, ACTIVATION: tl.constexpr,
                           HAS_ROUTING_WEIGHTS: tl.constexpr):
    """The dA GEMM's tile of a one-projection activation: dh_pre = w_r * dA * act'(h_pre), and the tile's share of
    each row's routing-weight gradient, sum_n dA * act(h_pre), into partials."""
    out_dtype = out_ptr.dtype.element_ty
    d_act = acc.to(out_dtype).to(tl.float32)  # rounded as the row pass reads dA
    h_pre = tl.load(h_pre_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_ROUTING_WEIGHTS:
        # Masked: past the width, B's TMA tiles may have put the next expert's products in dA.
        partial = tl.sum(tl.where(out_mask, d_act * activation_forward(h_pre, None, ACTIVATION), 0.0), 1)
        partial_offsets = weight_slots.to(tl.int64) * partial_tiles  # (TILE_M,)
        tl.store(partials_ptr + partial_offsets + col_tile, partial, mask=row_mask)
        if col_tile == col_tiles - 1:
            for zero_tile in range(col_tiles, partial_tiles):
                tl.store(partials_ptr + partial_offsets + zero_tile, tl.zeros_like(partial), mask=row_mask)
        d_act = d_act * routing_weights[:, None]
    d_act_d_pre, _ = activation_backward(h_pre, None, ACTIVATION)
    tl.store(out_ptr + out_offsets, (d_act * d_act_d_pre).to(out_dtype), mask=out_mask)


@triton.jit
def _expert_rows_gemm(
    a_ptr, a2_ptr, b_ptr, b2_ptr, b_desc, b2_desc,
    out_ptr, out2_ptr, out3_ptr, a_rows_ptr, h_pre_ptr, partials_ptr,
    routing_weights_ptr, routing_weight_index_ptr,
    row_to_token_ptr, expert_row_offsets_ptr, expert_width_offsets_ptr,
    num_experts, hidden, max_width, partial_tiles,
    RAGGED_OUT: tl.constexpr,
    SECOND_PRODUCT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_ROUTING_WEIGHTS: tl.constexpr,
    INDEXED_ROUTING_WEIGHTS: tl.constexpr,
    COPY_A_ROWS: tl.constexpr,
    ZERO_PADDING: tl.constexpr,
    B_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
    ROW_GROUP: tl.constexpr,
):
    """One (expert, row tile, column tile) of out = A @ B_e; see the module docstring for the two layouts.

    ROW_GROUP: an expert's tiles run in groups of ROW_GROUP row tiles: consecutive tiles step through the group's
    row tiles at one column tile, then move to the next column tile (1: one row tile's column tiles, then the next
    row tile's).

    ZERO_PADDING ("act_forward" only): the program of an expert's last column tile also writes zeros past the
    expert's width up to max_width, so that the forward's outputs are the same whatever the memory held before.
    COPY_A_ROWS (RAGGED_OUT only): the program of column tile 0 of each row tile also stores the A rows it gathers,
    a_rows[r] = A[row_to_token[r]] ([R, H], rows in expert-sorted order), for the weight gradient to read.
    B_TMA (RAGGED_OUT only): B_e's tiles (and B2_e's) load through b_desc (b2_desc), TMA descriptors of the [TW, H]
    weights in boxes of TILE_N weight rows x TILE_K; past the expert's width they hold the next expert's rows,
    which only reach output columns the store masks.

    SECOND_PRODUCT: "none"; "shared_a": acc2 = A @ B2_e from the same A tiles (swiglu gate and up);
        "summed": acc += A2 @ B2_e (dX of swiglu: dh_gate @ w1_e + dh_up @ v1_e), in a second K loop.
    EPILOGUE:
        "act_forward": out = h_pre = acc, out2 = h_up = acc2 (GATED), out3 = act(h_pre[, h_up]), times row r's
            routing weight if HAS_ROUTING_WEIGHTS: routing_weights[routing_weight_index[r]] if
            INDEXED_ROUTING_WEIGHTS, else routing_weights[r].
        "act_backward" (not GATED): acc is dA, the gradient for the rows' unweighted activations; with
            a = act(h_pre) recomputed from h_pre: out = dh_pre = w_r * dA * act'(h_pre), and, if
            HAS_ROUTING_WEIGHTS, partials[slot_r, col_tile] = the tile's columns of sum_n dA * a (partials is
            [R, partial_tiles], rows in routing_weights' order; the launcher sums each row, the routing weight's
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
        col_tiles_per_expert = tl.cdiv(widths, TILE_N)
    else:
        col_tiles_per_expert = tl.cdiv(hidden, TILE_N)
    tiles_per_expert = (tl.cdiv(rows_per_expert, TILE_M) * col_tiles_per_expert).to(tl.int32)
    expert, first_tile = _expert_of_tile(tile_id, tiles_per_expert, experts)
    if expert >= num_experts:
        return

    # The expert's first row, rows, first weight row and width, loaded here rather than in a helper: Inductor's
    # mutation analysis counts a pointer handed to a helper as written when the helper's results address a store.
    row_start = tl.load(expert_row_offsets_ptr + expert)
    num_rows = tl.load(expert_row_offsets_ptr + expert + 1) - row_start
    width_start = tl.load(expert_width_offsets_ptr + expert)
    # Every width is a multiple of WIDTH_MULTIPLE. Loaded from memory, the compiler cannot know it: without the
    # hint the masks of each hidden-activation row split its accesses into 2-byte ones.
    width = tl.multiple_of(tl.load(expert_width_offsets_ptr + expert + 1) - width_start, WIDTH_MULTIPLE)
    if RAGGED_OUT:
        num_cols = width
        reduce_size = hidden
    else:
        num_cols = hidden
        reduce_size = width
    # Column tiles fastest: consecutive programs, which run at the same time, share one tile of A rows (a
    # gather of token rows, or a slab of a hidden-activation matrix) and sweep the expert's weight slice, which
    # stays in L2 across the expert's row tiles where it takes a few MiB. Row tiles fastest would instead re-read
    # every A row once per column tile, far apart in time, from DRAM for large experts. A weight slice larger than
    # L2 would come from DRAM again for every row tile: there the launcher asks for groups of ROW_GROUP row tiles,
    # which the programs running together sweep at once, reading each weight tile once for the group.
    col_tiles = tl.cdiv(num_cols, TILE_N)
    row_tile, col_tile = grouped_tile(tile_id - first_tile, col_tiles, tl.cdiv(num_rows, TILE_M), ROW_GROUP)
    expert_rows = row_tile * TILE_M + tl.arange(0, TILE_M)  # (TILE_M,) row index within the expert
    cols = col_tile * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,)
    ks = tl.arange(0, TILE_K)  # (TILE_K,)
    row_mask = expert_rows < num_rows
    col_mask = cols < num_cols
    rows = row_start + expert_rows  # (TILE_M,) expert-sorted row ids
    if RAGGED_OUT:
        tokens = tl.load(row_to_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        a_offsets = tokens[:, None] * hidden + ks[None, :]  # (TILE_M, TILE_K)
        b_offsets = (width_start + cols[None, :]).to(tl.int64) * hidden + ks[:, None]  # (TILE_K, TILE_N)
        b_step = TILE_K
        out_offsets = rows[:, None].to(tl.int64) * max_width + cols[None, :]  # (TILE_M, TILE_N)
        a_rows_offsets = rows[:, None].to(tl.int64) * hidden + ks[None, :]  # (TILE_M, TILE_K)
        # One program per row tile copies: column tile 0, as a mask (a branch in the loop costs the pipeline).
        copies_rows = (ks[None, :] * 0 + col_tile) == 0  # (1, TILE_K)
        b_tma_row = (width_start + col_tile * TILE_N).to(tl.int32)  # TMA coordinates of B_eᵀ's tile: int32
        b_tma_col = 0
    else:
        a_offsets = rows[:, None].to(tl.int64) * max_width + ks[None, :]  # (TILE_M, TILE_K)
        b_offsets = (width_start + ks[:, None]).to(tl.int64) * hidden + cols[None, :]  # (TILE_K, TILE_N)
        b_step = TILE_K * hidden
        out_offsets = rows[:, None].to(tl.int64) * hidden + cols[None, :]  # (TILE_M, TILE_N)

    routing_weights = None  # (TILE_M,) fp32 where an epilogue applies them
    weight_slots = None  # (TILE_M,): each row's place in routing_weights
    if EPILOGUE != "store" and HAS_ROUTING_WEIGHTS:
        # Loaded before the K loop, the two dependent loads (slot, then weight) wait alongside the GEMM rather than
        # at its end, where nothing hides their latency.
        weight_slots = rows
        if INDEXED_ROUTING_WEIGHTS:
            weight_slots = tl.load(routing_weight_index_ptr + rows, mask=row_mask, other=0)
        routing_weights = tl.load(routing_weights_ptr + weight_slots, mask=row_mask, other=0.0)  # (TILE_M,)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    acc2 = None
    if SECOND_PRODUCT == "shared_a":
        acc2 = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for k_start in range(0, reduce_size, TILE_K):
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
            # dot's own `a` tile as well gives wrong dot results on Hopper with triton 3.6.
            copy_mask = a_mask & copies_rows
            tl.store(a_rows_ptr + a_rows_offsets, tl.load(a_ptr + a_offsets, mask=copy_mask), mask=copy_mask)
            a_rows_offsets += TILE_K
        if SECOND_PRODUCT == "shared_a":
            if B_TMA:
                b2 = b2_desc.load([b_tma_row, b_tma_col]).T
            else:
                b2 = tl.load(b2_ptr + b_offsets, mask=b_mask, other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
        a_offsets += TILE_K
        b_offsets += b_step
        if B_TMA:
            b_tma_col += TILE_K
    if SECOND_PRODUCT == "summed":
        # The second product in a K loop of its own, after the first: one operand pair in flight per step, so
        # this launch takes the wide tiles of the one-product GEMMs, which two pairs a step did not fit. The
        # offsets are computed afresh: rewound by subtraction, they lose what the compiler knows of their
        # contiguity, which slows the GEMM several-fold (docs/tuning.md).
        tl.static_assert(not RAGGED_OUT, "summed: the expert width -> hidden layout")
        a_offsets = rows[:, None].to(tl.int64) * max_width + ks[None, :]  # (TILE_M, TILE_K)
        b_offsets = (width_start + ks[:, None]).to(tl.int64) * hidden + cols[None, :]  # (TILE_K, TILE_N)
        for k_start in range(0, reduce_size, TILE_K):
            k_mask = ks < reduce_size - k_start
            a2 = tl.load(a2_ptr + a_offsets, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptr + b_offsets, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
            a_offsets += TILE_K
            b_offsets += b_step

    out_mask = row_mask[:, None] & col_mask[None, :]
    if EPILOGUE == "act_forward":
        _act_forward_epilogue(acc, acc2, out_ptr, out2_ptr, out3_ptr, out_offsets, out_mask, rows, row_mask,
                              routing_weights, col_tile, col_tiles, num_cols, max_width, ACTIVATION, GATED,
                              HAS_ROUTING_WEIGHTS, ZERO_PADDING, TILE_M, TILE_N)
    elif EPILOGUE == "act_backward":
        tl.static_assert(RAGGED_OUT and not GATED, "act_backward: the dA GEMM of a one-projection activation")
        _act_backward_epilogue(acc, out_ptr, h_pre_ptr, partials_ptr, out_offsets, out_mask, row_mask,
                               routing_weights, weight_slots, col_tile, col_tiles, partial_tiles, ACTIVATION,
                               HAS_ROUTING_WEIGHTS)
    else:
        tl.static_assert(EPILOGUE == "store", "unknown epilogue")
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grad_gemm(
    a_ptr, a2_ptr, b_ptr, b_desc,
    out_ptr, out2_ptr, partials_ptr,
    routing_weights_ptr, routing_weight_index_ptr,
    row_to_token_ptr, expert_row_offsets_ptr, expert_width_offsets_ptr,
    num_experts, hidden, max_width, total_width,
    ROW_SPLITS: tl.constexpr,
    SECOND_OUTPUT: tl.constexpr,
    A_ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    INDEXED_ROUTING_WEIGHTS: tl.constexpr,
    B_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    """One (expert, width tile, hidden tile) of out[width_off_e + m, n] = sum_r A[r, m] * B[token(r), n].

    A is a hidden-activation matrix. With SECOND_OUTPUT, out2 = A2^T @ B with A2 like A at a2_ptr, sharing the B
    loads. With A_ACTIVATION (an activation's name; not with SECOND_OUTPUT), A is computed as it loads from the
    pre-activations at a_ptr (and, GATED, at a2_ptr): A = act(h_pre[, h_up]) * row r's routing weight
    (routing_weights[routing_weight_index[r]] if INDEXED_ROUTING_WEIGHTS, else routing_weights[r]), in fp32 and
    rounded once, as the up projection's epilogue computes it: the down projection's weight gradient without keeping
    its operand. The reduction runs over the expert's rows, TILE_K at a time; an expert without rows stores 0.
    B_ROWS says where row r's token row is:
        "gathered": row row_to_token[r] of B [N, H], by masked pointer loads;
        "sorted": row r of B [R, H] (the token rows already in expert-sorted order), by masked pointer loads;
        "sorted_tma": the same through b_desc, a TMA descriptor of B with [TILE_K, TILE_N] boxes, unmasked: an
            expert's last step reads the next expert's first rows (zeros past R), which A's masked zeros cancel.
            (Only a non-finite value there would leak in, as 0 * inf.)
    With ROW_SPLITS > 1 the grid's second axis splits each expert's rows into ROW_SPLITS runs of whole K steps, and
    program (tile, s) stores its run's fp32 sum to partials [1 or 2 outputs, ROW_SPLITS, TW, H] at (output, s),
    which _sum_row_splits adds up in order: more programs where an exact grid of tiles would leave SMs idle.
    """
    tile_id = tl.program_id(0)
    row_split = tl.program_id(1)
    # The tiles depend only on the widths and H: the grid is exact and every program owns a tile (and a run).
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    widths = tl.load(expert_width_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        expert_width_offsets_ptr + experts, mask=is_expert, other=0
    )
    hidden_tiles = tl.cdiv(hidden, TILE_N)
    tiles_per_expert = (tl.cdiv(widths, TILE_M) * hidden_tiles).to(tl.int32)
    expert, first_tile = _expert_of_tile(tile_id, tiles_per_expert, experts)

    # The expert's first row, rows, first weight row and width, loaded here rather than in a helper: Inductor's
    # mutation analysis counts a pointer handed to a helper as written when the helper's results address a store.
    row_start = tl.load(expert_row_offsets_ptr + expert)
    num_rows = tl.load(expert_row_offsets_ptr + expert + 1) - row_start
    # This program's run of the expert's rows: whole K steps, the last run ending at the expert's last row
    split_rows = tl.cdiv(tl.cdiv(num_rows, ROW_SPLITS), TILE_K) * TILE_K
    k_begin = row_split * split_rows
    k_end = tl.minimum(num_rows, k_begin + split_rows)
    width_start = tl.load(expert_width_offsets_ptr + expert)
    # Every width is a multiple of WIDTH_MULTIPLE. Loaded from memory, the compiler cannot know it: without the
    # hint the masks of each hidden-activation row split its accesses into 2-byte ones.
    width = tl.multiple_of(tl.load(expert_width_offsets_ptr + expert + 1) - width_start, WIDTH_MULTIPLE)
    # Width tiles fastest: the programs running together share the B tiles of one hidden tile, the irregular
    # gather of token rows, while each reads its own contiguous columns of the expert's rows of A.
    width_tiles = tl.cdiv(width, TILE_M)
    width_tile = (tile_id - first_tile) % width_tiles
    hidden_tile = (tile_id - first_tile) // width_tiles
    ms = width_tile * TILE_M + tl.arange(0, TILE_M)  # (TILE_M,) column within the expert's width
    ns = hidden_tile * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,)
    ks = tl.arange(0, TILE_K)  # (TILE_K,) row within a step over the expert's rows
    m_mask = ms < width
    n_mask = ns < hidden
    a_offsets = (row_start + k_begin + ks[None, :]).to(tl.int64) * max_width + ms[:, None]  # (TILE_M, TILE_K): Aᵀ
    # TMA coordinates are int32: R < 2^31 rows (the launcher checks), so are the expert's first row and H.
    b_row = (row_start + k_begin).to(tl.int32)
    b_col = (hidden_tile * TILE_N).to(tl.int32)

    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    if SECOND_OUTPUT:
        acc2 = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for k_start in range(k_begin, k_end, TILE_K):
        k_mask = ks < num_rows - k_start  # a run ends at a K step's end, or at the expert's last row
        if B_ROWS == "sorted_tma":
            b = b_desc.load([b_row, b_col])
            b_row += TILE_K
        else:
            b_rows = row_start + k_start + ks  # (TILE_K,) expert-sorted row ids
            if B_ROWS == "gathered":
                b_rows = tl.load(row_to_token_ptr + b_rows, mask=k_mask, other=0)
            else:
                tl.static_assert(B_ROWS == "sorted", "unknown B_ROWS")
            b_offsets = b_rows[:, None].to(tl.int64) * hidden + ns[None, :]  # (TILE_K, TILE_N)
            b = tl.load(b_ptr + b_offsets, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_offsets, mask=a_mask, other=0.0)
        if A_ACTIVATION is not None:
            tl.static_assert(not SECOND_OUTPUT, "A_ACTIVATION: one product")
            h_up = None
            if GATED:
                h_up = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32)
            weight_slots = row_start + k_start + ks  # (TILE_K,) expert-sorted row ids
            if INDEXED_ROUTING_WEIGHTS:
                weight_slots = tl.load(routing_weight_index_ptr + weight_slots, mask=k_mask, other=0)
            routing_weights = tl.load(routing_weights_ptr + weight_slots, mask=k_mask, other=0.0)  # (TILE_K,)
            a = (activation_forward(a.to(tl.float32), h_up, A_ACTIVATION) * routing_weights[None, :]).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if SECOND_OUTPUT:
            a2 = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0.0)
            acc2 = tl.dot(a2, b, acc2, input_precision=DOT_PRECISION)
        a_offsets += TILE_K * max_width

    out_offsets = (width_start + ms[:, None]).to(tl.int64) * hidden + ns[None, :]  # (TILE_M, TILE_N)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ROW_SPLITS == 1:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        if SECOND_OUTPUT:
            tl.store(out2_ptr + out_offsets, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)
    else:
        # int64 from the program id on (a scalar argument may reach the compiler as a Python int)
        partial_offsets = row_split.to(tl.int64) * total_width * hidden + out_offsets
        tl.store(partials_ptr + partial_offsets, acc, mask=out_mask)
        if SECOND_OUTPUT:
            partial_offsets = (ROW_SPLITS + row_split).to(tl.int64) * total_width * hidden + out_offsets
            tl.store(partials_ptr + partial_offsets, acc2, mask=out_mask)


@triton.jit
def _sum_row_splits(partials_ptr, out_ptr, out2_ptr, gradient_size, ROW_SPLITS: tl.constexpr,
                    SECOND_OUTPUT: tl.constexpr, BLOCK: tl.constexpr):
    """out (and out2) = the sum over s, in order, of the weight gradient's partials [1 or 2, ROW_SPLITS, TW, H]
    fp32, rounded once to out's dtype; one block of BLOCK elements a program."""
    elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = elements < gradient_size
    partial_offsets = elements  # (BLOCK,) int64: into one run's partials, then the next run's
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in tl.static_range(ROW_SPLITS):
        acc += tl.load(partials_ptr + partial_offsets, mask=mask, other=0.0)
        partial_offsets += gradient_size
    tl.store(out_ptr + elements, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if SECOND_OUTPUT:  # the second gradient's partials follow the first's
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in tl.static_range(ROW_SPLITS):
            acc2 += tl.load(partials_ptr + partial_offsets, mask=mask, other=0.0)
            partial_offsets += gradient_size
        tl.store(out2_ptr + elements, acc2.to(out2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_rows(
    d_act_ptr, h_pre_ptr, h_up_ptr, routing_weights_ptr, routing_weight_index_ptr,
    dh_up_ptr, d_routing_weights_ptr,
    expert_row_offsets_ptr, expert_width_offsets_ptr,
    num_rows, num_experts, max_width,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_ROUTING_WEIGHTS: tl.constexpr,
    INDEXED_ROUTING_WEIGHTS: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    TILE_W: tl.constexpr,
    UNIFORM_WIDTH: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    """TILE_ROWS expert-sorted rows of dA [R, max_width] (the gradient for the rows' unweighted activations), in place.

    With act = act(h_pre[, h_up]) recomputed in fp32: d_routing_weights[r] = sum_n dA * act (if HAS_ROUTING_WEIGHTS),
    then dA becomes dh_pre = routing_weights[r] * dA * d act / d h_pre, and dh_up = routing_weights[r] * dA *
    d act / d h_up (GATED). Each row holds its expert's width of values; the rows are walked TILE_W columns a step.
    Row r's weight, and its gradient, sit at routing_weight_index[r] of routing_weights and d_routing_weights if
    INDEXED_ROUTING_WEIGHTS, else at r. UNIFORM_WIDTH > 0: every expert has that width, so every row is full,
    without looking up its expert (which compares the row with every expert's end).
    """
    rows = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)  # (TILE_ROWS,)
    row_mask = rows < num_rows
    row_offsets = rows.to(tl.int64) * max_width  # (TILE_ROWS,)
    if UNIFORM_WIDTH > 0:
        width = tl.where(row_mask, UNIFORM_WIDTH, 0)
    else:
        experts = tl.arange(0, EXPERTS_POW2)
        is_expert = experts < num_experts
        expert_row_ends = tl.load(expert_row_offsets_ptr + experts + 1, mask=is_expert, other=0)  # (EXPERTS_POW2,)
        expert = tl.sum(((expert_row_ends[None, :] <= rows[:, None]) & is_expert[None, :]).to(tl.int32), 1)
        expert = tl.where(row_mask, expert, 0)  # (TILE_ROWS,); rows past the end read expert 0's extent, unused
        width = tl.load(expert_width_offsets_ptr + expert + 1) - tl.load(expert_width_offsets_ptr + expert)
        width = tl.where(row_mask, width, 0)
    cols = tl.arange(0, TILE_W)  # (TILE_W,)
    if HAS_ROUTING_WEIGHTS:
        weight_slots = rows
        if INDEXED_ROUTING_WEIGHTS:
            weight_slots = tl.load(routing_weight_index_ptr + rows, mask=row_mask, other=0)
        # (TILE_ROWS, 1)
        routing_weights = tl.load(routing_weights_ptr + weight_slots, mask=row_mask, other=0.0)[:, None]
        routing_weight_grads = tl.zeros((TILE_ROWS, TILE_W), dtype=tl.float32)
    for col_start in range(0, tl.max(width, 0), TILE_W):
        mask = cols[None, :] < width[:, None] - col_start  # (TILE_ROWS, TILE_W)
        offsets = row_offsets[:, None] + col_start + cols[None, :]
        d_act = tl.load(d_act_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h_pre = tl.load(h_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h_up = None
        if GATED:
            h_up = tl.load(h_up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROUTING_WEIGHTS:
            routing_weight_grads += d_act * activation_forward(h_pre, h_up, ACTIVATION)
            d_act = d_act * routing_weights
        d_act_d_pre, d_act_d_up = activation_backward(h_pre, h_up, ACTIVATION)
        tl.store(d_act_ptr + offsets, (d_act * d_act_d_pre).to(d_act_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(dh_up_ptr + offsets, (d_act * d_act_d_up).to(dh_up_ptr.dtype.element_ty), mask=mask)
    if HAS_ROUTING_WEIGHTS:
        tl.store(d_routing_weights_ptr + weight_slots, tl.sum(routing_weight_grads, 1), mask=row_mask)


def _check_token_rows(name, tensor, dtypes):
    """`tensor` is a contiguous [N, H] matrix of token rows with a dtype in `dtypes`."""
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [N, H], got shape {tuple(tensor.shape)}")
    check_tensor_shape(name, tensor, tensor.shape, dtypes)


def _check_row_to_token(row_to_token, layout: ExpertLayout):
    check_tensor_shape("row_to_token", row_to_token, (layout.num_rows,), INDEX_DTYPES)


def _check_routing_weights(routing_weights, routing_weight_index, num_rows):
    """`routing_weights` is None or R fp32 routing weights, of the expert-sorted rows in order, or in any order with
    `routing_weight_index` [R] giving each row's place among them."""
    if routing_weights is not None:
        check_tensor_shape("routing_weights", routing_weights, (num_rows,), (torch.float32,))
    if routing_weight_index is not None:
        if routing_weights is None:
            raise ValueError("routing_weight_index needs routing_weights")
        check_tensor_shape("routing_weight_index", routing_weight_index, (num_rows,), INDEX_DTYPES)


def _check_row_copy(name, rows, token_rows, num_rows):
    """`rows` is None or the [R, H] destination of the expert-sorted copy of `token_rows` [N, H]."""
    if rows is not None:
        check_tensor_shape(name, rows, (num_rows, token_rows.shape[1]), (token_rows.dtype,))


def _check_gated_pair(name, tensor, activation, check):
    """`tensor` (the second projection or its grad) is given exactly when `activation` is gated; check(name, tensor)
    checks its shape and dtype."""
    if tensor is None:
        if is_gated(activation):
            raise ValueError(f"{name} is required for the gated activation {activation!r}")
    elif not is_gated(activation):
        raise ValueError(f"{name} must be None for the activation {activation!r}")
    else:
        check(name, tensor)


def _launch_options(dtype, tiles, layout: ExpertLayout):
    """The compile-time arguments and launch options both GEMM kernels share."""
    return dict(
        # fp32 must match an fp64 reference to 1e-4, which TF32 products (~1e-3) would miss. For 16-bit operands
        # the setting does not apply and Triton's default is passed.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        TILE_M=tiles.tile_m,
        TILE_N=tiles.tile_n,
        TILE_K=tiles.tile_k,
        **layout.facts.kernel_constants,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def _expert_rows_gemm_launch(
    *, a, b, out, layout: ExpertLayout, ragged_out, epilogue, tiles, role, a2=None, b2=None, second_product="none",
    out2=None, out3=None, routing_weights=None, routing_weight_index=None, row_to_token=None, activation=None,
    a_rows=None, h_pre=None, partials=None,
):
    """Launch `_expert_rows_gemm` over a grid bounding the (unknown on the host) tiles of all experts.

    The hidden -> width layout reads the weights by TMA where tuning.weights_by_tma says so."""
    hidden, num_rows = b.shape[1], layout.num_rows
    tiles = tiles or gemm_tiles(a.dtype, role, gated=b2 is not None, rows_x_hidden=num_rows * hidden,
                                   hidden=hidden)
    if ragged_out:
        most_col_tiles, col_tiles_sum = layout.tiles_per_row_tile(tiles.tile_n)
    else:
        most_col_tiles = ceil_div(hidden, tiles.tile_n)
        col_tiles_sum = most_col_tiles * layout.num_experts
    # cdiv(rows_e, M) <= rows_e // M + 1 and sum_e rows_e // M <= cdiv(R, M): an upper bound on the tiles;
    # programs past the last tile exit at once.
    grid = (ceil_div(num_rows, tiles.tile_m) * most_col_tiles + col_tiles_sum,)
    b_desc = b2_desc = None  # TMA descriptors of the weights, in boxes of TILE_N weight rows x TILE_K
    if ragged_out and weights_by_tma(b, num_rows) and (b2 is None or weights_by_tma(b2, num_rows)):
        box = [tiles.tile_n, tiles.tile_k]
        b_desc = row_major_descriptor(b, box)
        b2_desc = None if b2 is None else row_major_descriptor(b2, box)
    traceable(_expert_rows_gemm)[grid](
        a, a2, b, b2, b_desc, b2_desc,
        out, out2, out3, a_rows, h_pre, partials,
        routing_weights, routing_weight_index,
        row_to_token, layout.expert_row_offsets, layout.expert_width_offsets,
        layout.num_experts, hidden, layout.max_width, 0 if partials is None else partials.shape[1],
        RAGGED_OUT=ragged_out,
        SECOND_PRODUCT=second_product,
        EPILOGUE=epilogue,
        ACTIVATION=activation,
        GATED=activation is not None and is_gated(activation),
        HAS_ROUTING_WEIGHTS=routing_weights is not None,
        INDEXED_ROUTING_WEIGHTS=routing_weight_index is not None,
        COPY_A_ROWS=a_rows is not None,
        ZERO_PADDING=epilogue == "act_forward" and not layout.uniform,
        B_TMA=b_desc is not None,
        ROW_GROUP=row_group(layout.max_width * hidden * b.element_size()),
        **_launch_options(a.dtype, tiles, layout),
    )


def _hidden_rows_gemm(role, a, b, out, layout: ExpertLayout, tiles):
    """out = the expert width -> hidden GEMM of one product (down; dX rows without a gate): the persistent kernel
    where tuning.takes_persistent_kernel says so (large 16-bit problems on Hopper), else the portable one."""
    persistent_tiles = tiles or PERSISTENT_TILES
    if takes_persistent_kernel(a, b) and widths_fit_k_steps(layout.expert_widths, persistent_tiles.tile_k):
        persistent_rows_gemm(a, b, out, layout, persistent_tiles)
    else:
        _expert_rows_gemm_launch(role=role, a=a, b=b, out=out, layout=layout, ragged_out=False, epilogue="store",
                                 tiles=tiles)


def up_projection(
    x: torch.Tensor,
    w1: torch.Tensor,
    v1: torch.Tensor | None,
    row_to_token: torch.Tensor,
    layout: ExpertLayout,
    activation: str,
    routing_weights: torch.Tensor | None = None,
    *,
    routing_weight_index: torch.Tensor | None = None,
    sorted_x: torch.Tensor | None = None,
    tiles: GemmTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Up projection of every expert-sorted row, and the expert activation, into hidden-activation matrices.

    For row r (token t = row_to_token[r]) of expert e: h_pre[r, n] = x[t] . w1[width_off_e + n],
    h_up[r, n] = x[t] . v1[width_off_e + n], h_act = act(h_pre[, h_up]) * routing_weights[r], for n < W_e.

    Args:
        x: [N, H] fp32/fp16/bf16 token activations.
        w1: [TW, H] like x: the up projection (the gate for swiglu).
        v1: [TW, H] like x: the up projection of a gated activation; None otherwise.
        row_to_token: [R] int32/int64, token of each expert-sorted row.
        activation: a name in activation.ACTIVATIONS.
        routing_weights: [R] fp32 routing weight of each row; None leaves h_act unscaled. The activation is computed
            in fp32 from h_pre (and h_up) as stored, scaled, then rounded once to x.dtype.
        routing_weight_index: [R] int32/int64, a permutation of the rows: row r's weight is
            routing_weights[routing_weight_index[r]] (the sort's row_to_flat, for weights in (token, slot) order); None:
            routing_weights[r].
        sorted_x: [R, H] like x, or None. Given, the GEMM also writes into it the rows it gathers, sorted_x[r] = x[t]
            (the token rows in expert-sorted order, which weight_grad reads).
        (layout and tiles: see the module docstring)
    Returns:
        h_pre, h_up (None unless gated), h_act: [R, max_width] of x.dtype.
    """
    check_activation(activation)
    _check_token_rows("x", x, FLOAT_DTYPES)
    layout.check_weight("w1", w1, x.shape[1], x.dtype)
    _check_gated_pair("v1", v1, activation, lambda name, v1: layout.check_weight(name, v1, x.shape[1], x.dtype))
    _check_row_to_token(row_to_token, layout)
    _check_routing_weights(routing_weights, routing_weight_index, layout.num_rows)
    _check_row_copy("sorted_x", sorted_x, x, layout.num_rows)
    h_pre = torch.empty(layout.hidden_shape, dtype=x.dtype, device=x.device)  # (R, max_width)
    h_up = torch.empty_like(h_pre) if is_gated(activation) else None  # (R, max_width)
    h_act = torch.empty_like(h_pre)  # (R, max_width)
    if layout.num_rows > 0:
        _expert_rows_gemm_launch(
            role="up",
            a=x, b=w1, b2=v1, second_product="shared_a" if is_gated(activation) else "none",
            out=h_pre, out2=h_up, out3=h_act, layout=layout, ragged_out=True,
            epilogue="act_forward", activation=activation, routing_weights=routing_weights,
            routing_weight_index=routing_weight_index, row_to_token=row_to_token, a_rows=sorted_x, tiles=tiles,
        )
    return h_pre, h_up, h_act


def down_projection(
    h_act: torch.Tensor,
    w2: torch.Tensor,
    layout: ExpertLayout,
    *,
    tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """Down projection of every expert-sorted row.

    For row r of expert e: y[r] = sum_k h_act[r, k] * w2[width_off_e + k], k < W_e.

    Args:
        h_act: [R, max_width] fp32/fp16/bf16 activations (up_projection's, already scaled by the routing weights
            when it was given them).
        w2: [TW, H] like h_act: the down projection.
        (layout and tiles: see the module docstring)
    Returns:
        y: [R, H] of h_act.dtype, one row per expert-sorted row (combine_rows sums them per token).
    """
    layout.check_hidden("h_act", h_act, FLOAT_DTYPES)
    layout.check_weight("w2", w2, w2.shape[-1], h_act.dtype)
    y = torch.empty((layout.num_rows, w2.shape[1]), dtype=h_act.dtype, device=h_act.device)  # (R, H)
    if layout.num_rows > 0:
        _hidden_rows_gemm("down", h_act, w2, y, layout, tiles)
    return y


def down_projection_backward(
    grad_out: torch.Tensor,
    w2: torch.Tensor,
    h_pre: torch.Tensor,
    h_up: torch.Tensor | None,
    row_to_token: torch.Tensor,
    layout: ExpertLayout,
    routing_weights: torch.Tensor | None,
    activation: str,
    *,
    routing_weight_index: torch.Tensor | None = None,
    sorted_grad_out: torch.Tensor | None = None,
    tiles: GemmTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients through the down projection and the activation, back to the pre-activations.

    With dA[r, n] = grad_out[row_to_token[r]] . w2[width_off_e + n] (r of expert e, n < W_e) and
    a = act(h_pre[, h_up]) recomputed: d_routing_weights[r] = sum_n dA[r, n] * a[r, n],
    dh_pre = routing_weights[r] * dA * d act / d h_pre, dh_up = routing_weights[r] * dA * d act / d h_up.
    dA is rounded to grad_out.dtype before the activation's derivative, as stored. Two ways:
    - Large problems (tuning.fused_dh_pays_off) with a one-projection activation (relu², gelu): the GEMM's epilogue
      finishes dh_pre and writes per-column-tile partial sums of d_routing_weights, which a sum over the [R, column
      tiles] partials completes (one more small launch, none with a single column tile).
    - Otherwise: the grouped GEMM stores dA in dh_pre's buffer, then a row-wise kernel turns it into dh_pre (and
      dh_up) in place. For gated activations a fused epilogue needs two more tiles and a sigmoid, which cost more
      than the row pass; in small problems the partial sums' launch costs more than the row pass (docs/tuning.md).

    Args:
        grad_out: [N, H] fp32/fp16/bf16 gradient of the combined output (combine_rows sums rows per token,
            so each row's gradient is its token's).
        w2: [TW, H] like grad_out.
        h_pre, h_up: [R, max_width] like grad_out, from up_projection; h_up None unless gated.
        row_to_token: [R] int32/int64, token of each expert-sorted row.
        routing_weights, routing_weight_index: as given to up_projection (None if they were); d_routing_weights
            comes out in routing_weights' order (each row writes its own slot, hence the permutation).
        activation: the name given to up_projection.
        sorted_grad_out: [R, H] like grad_out, or None. Given, the dA GEMM also writes into it the rows it gathers,
            sorted_grad_out[r] = grad_out[row_to_token[r]] (what weight_grad reads for dW2).
        (layout and tiles: see the module docstring)
    Returns:
        dh_pre, dh_up (None unless gated): [R, max_width] like h_pre; d_routing_weights: [R] fp32, None without
        routing_weights.
    """
    check_activation(activation)
    _check_token_rows("grad_out", grad_out, FLOAT_DTYPES)
    layout.check_weight("w2", w2, grad_out.shape[1], grad_out.dtype)
    layout.check_hidden("h_pre", h_pre, (grad_out.dtype,))
    _check_gated_pair("h_up", h_up, activation,
                      lambda name, h_up: layout.check_hidden(name, h_up, (grad_out.dtype,)))
    _check_row_to_token(row_to_token, layout)
    num_rows = layout.num_rows
    _check_routing_weights(routing_weights, routing_weight_index, num_rows)
    _check_row_copy("sorted_grad_out", sorted_grad_out, grad_out, num_rows)
    dh_pre = torch.empty_like(h_pre)  # (R, max_width) (gated: dA, then dh_pre in place)
    dh_up = None if h_up is None else torch.empty_like(h_up)  # (R, max_width)
    d_routing_weights = None if routing_weights is None else torch.empty(num_rows, dtype=torch.float32,
                                                                 device=grad_out.device)  # (R,)
    if num_rows == 0:
        return dh_pre, dh_up, d_routing_weights
    gemm_arguments = dict(
        role="down_backward", a=grad_out, b=w2, out=dh_pre, layout=layout, ragged_out=True,
        row_to_token=row_to_token, a_rows=sorted_grad_out,
        tiles=tiles or gemm_tiles(grad_out.dtype, "down_backward", rows_x_hidden=num_rows * grad_out.shape[1],
                                     hidden=grad_out.shape[1]),
    )
    if not is_gated(activation) and fused_dh_pays_off(num_rows, grad_out.shape[1]):
        partials = None
        if routing_weights is not None:
            column_tiles = layout.tiles_per_row_tile(gemm_arguments["tiles"].tile_n)[0]
            partials = (d_routing_weights.view(num_rows, 1) if column_tiles == 1 else  # (R, T): rows' tiles' sums
                        torch.empty(num_rows, column_tiles, dtype=torch.float32, device=grad_out.device))
        _expert_rows_gemm_launch(**gemm_arguments, epilogue="act_backward", activation=activation, h_pre=h_pre,
                                 partials=partials, routing_weights=routing_weights,
                                 routing_weight_index=routing_weight_index)
        if partials is not None and partials.shape[1] > 1:
            torch.sum(partials, dim=1, out=d_routing_weights)
        return dh_pre, dh_up, d_routing_weights
    _expert_rows_gemm_launch(**gemm_arguments, epilogue="store")
    block_w, tile_rows, num_warps = row_pass_tiles(layout.max_width)
    traceable(_activation_backward_rows)[(ceil_div(num_rows, tile_rows),)](
        dh_pre, h_pre, h_up, routing_weights, routing_weight_index,
        dh_up, d_routing_weights,
        layout.expert_row_offsets, layout.expert_width_offsets,
        num_rows, layout.num_experts, layout.max_width,
        ACTIVATION=activation,
        GATED=is_gated(activation),
        HAS_ROUTING_WEIGHTS=routing_weights is not None,
        INDEXED_ROUTING_WEIGHTS=routing_weight_index is not None,
        TILE_ROWS=tile_rows,
        TILE_W=block_w,
        UNIFORM_WIDTH=layout.max_width if layout.uniform else 0,
        **layout.facts.kernel_constants,
        num_warps=num_warps,
    )
    return dh_pre, dh_up, d_routing_weights


def input_grad_rows(
    dh_pre: torch.Tensor,
    w1: torch.Tensor,
    dh_up: torch.Tensor | None,
    v1: torch.Tensor | None,
    layout: ExpertLayout,
    *,
    tiles: GemmTiles | None = None,
) -> torch.Tensor:
    """Gradient of each expert-sorted row's input: dx_rows[r] = dh_pre[r, :W_e] @ w1_e (+ dh_up[r, :W_e] @ v1_e).

    Args:
        dh_pre: [R, max_width] fp32/fp16/bf16, from down_projection_backward.
        w1: [TW, H] like dh_pre.
        dh_up, v1: like dh_pre and w1, both given for a gated activation or both None.
        (layout and tiles: see the module docstring)
    Returns:
        dx_rows: [R, H] of dh_pre.dtype (combine_rows sums them per token into dx).
    """
    layout.check_hidden("dh_pre", dh_pre, FLOAT_DTYPES)
    layout.check_weight("w1", w1, w1.shape[-1], dh_pre.dtype)
    if (dh_up is None) != (v1 is None):
        raise ValueError("dh_up and v1 must be given together (gated activation) or both be None")
    if dh_up is not None:
        layout.check_hidden("dh_up", dh_up, (dh_pre.dtype,))
        layout.check_weight("v1", v1, w1.shape[1], dh_pre.dtype)
    dx_rows = torch.empty((layout.num_rows, w1.shape[1]), dtype=dh_pre.dtype, device=dh_pre.device)  # (R, H)
    if layout.num_rows > 0 and dh_up is None:
        _hidden_rows_gemm("input_grad", dh_pre, w1, dx_rows, layout, tiles)
    elif layout.num_rows > 0:
        _expert_rows_gemm_launch(
            role="input_grad", a=dh_pre, b=w1, a2=dh_up, b2=v1, second_product="summed", out=dx_rows, layout=layout,
            ragged_out=False, epilogue="store", tiles=tiles,
        )
    return dx_rows


def weight_grad(
    hidden_rows: torch.Tensor,
    hidden_rows2: torch.Tensor | None,
    token_rows: torch.Tensor,
    row_to_token: torch.Tensor | None,
    layout: ExpertLayout,
    *,
    activation: str | None = None,
    routing_weights: torch.Tensor | None = None,
    routing_weight_index: torch.Tensor | None = None,
    tiles: GemmTiles | None = None,
    row_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight gradient of a projection: dw[width_off_e + m] = sum over rows r of e of hidden_rows[r, m] * token_rows[t],
    t = row_to_token[r].

    This is the gradient of both projections: dw2 from the weighted activations and grad_out,
    dw1 from dh_pre and x (and dv1 from dh_up, as `hidden_rows2`, in the same launch: the token-row loads are
    shared). The token rows come gathered through row_to_token, or already in expert-sorted order (row_to_token
    None: the copies up_projection and down_projection_backward write on request), which from Hopper on load by TMA:
    a gather cannot, and holds the GEMM well below the sorted rows' rate at hidden 2048 (docs/tuning.md).
    tuning.sorted_rows_pay_off says when the copies are worth their cost.

    Args:
        hidden_rows: [R, max_width] fp32/fp16/bf16, row r holding its expert's W_e values.
        hidden_rows2: like `hidden_rows` for a second gradient over the same token rows, or None.
        activation, routing_weights, routing_weight_index: with an activation's name, dw2 from the pre-activations:
            hidden_rows is h_pre, hidden_rows2 h_up (gated) or None, and the operand is what up_projection's h_act
            would hold with these routing weights (given as to up_projection), computed on load. Only one
            gradient then.
        token_rows: [N, H] like hidden_rows, gathered per row by row_to_token; or, with row_to_token None, [R, H]:
            row r is the token row of expert-sorted row r.
        row_to_token: [R] int32/int64, or None (token_rows are sorted).
        row_splits: runs each expert's rows are split into, summed in fp32 by a second launch (None:
            tuning.weight_grad_row_splits, which splits where the tiles alone would leave the GPU idle).
        out_dtype: the gradients' dtype, fp32/fp16/bf16 (None: hidden_rows.dtype): the fp32 sums are rounded once
            to it (fp32 for the fp32 parameters of a layer computing in bf16), except in the persistent kernel
            (large 16-bit problems on Hopper), which rounds them to hidden_rows.dtype first.
        (layout and tiles: see the module docstring)
    Returns:
        dw, dw_2 (None without hidden_rows2, or with an activation): [TW, H] of out_dtype; experts without rows get
        zeros.
    """
    layout.check_hidden("hidden_rows", hidden_rows, FLOAT_DTYPES)
    if row_splits is not None:
        check_int("row_splits", row_splits, 1)
    out_dtype = hidden_rows.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    if activation is not None:
        check_activation(activation)
        _check_gated_pair("hidden_rows2", hidden_rows2, activation,
                          lambda name, h_up: layout.check_hidden(name, h_up, (hidden_rows.dtype,)))
        if routing_weights is None:
            raise ValueError("weight_grad with an activation needs the routing_weights")
        _check_routing_weights(routing_weights, routing_weight_index, layout.num_rows)
    elif routing_weights is not None:
        raise ValueError("routing_weights are for weight_grad with an activation")
    elif hidden_rows2 is not None:
        layout.check_hidden("hidden_rows2", hidden_rows2, (hidden_rows.dtype,))
    _check_token_rows("token_rows", token_rows, (hidden_rows.dtype,))
    if row_to_token is not None:
        _check_row_to_token(row_to_token, layout)
    elif token_rows.shape[0] != layout.num_rows:
        raise ValueError(f"token_rows must have one row per expert-sorted row ({layout.num_rows}) when row_to_token "
                         f"is None, got shape {tuple(token_rows.shape)}")
    num_rows, hidden = layout.num_rows, token_rows.shape[1]
    shape = (layout.total_width, hidden)
    if num_rows == 0:
        dw = hidden_rows.new_zeros(shape, dtype=out_dtype)  # (TW, H)
        return dw, None if hidden_rows2 is None or activation is not None else torch.zeros_like(dw)
    two_gradients = hidden_rows2 is not None and activation is None
    if (row_to_token is None and hidden_rows2 is None and activation is None
            and takes_persistent_kernel(hidden_rows, token_rows)):
        # The persistent kernel's epilogue holds a 16-bit tile in shared memory beside its pipeline; a 32-bit one
        # does not fit, so a 32-bit gradient is its 16-bit result cast.
        dw = hidden_rows.new_empty(shape)  # (TW, H)
        persistent_weight_grad(hidden_rows, token_rows, dw, layout, tiles or PERSISTENT_TILES)
        return dw.to(out_dtype), None
    dw = hidden_rows.new_empty(shape, dtype=out_dtype)  # (TW, H)
    dw_2 = torch.empty_like(dw) if two_gradients else None  # (TW, H)
    if row_to_token is not None:
        b_rows, role = "gathered", "weight_grad"
    elif tma_readable(token_rows):
        b_rows, role = "sorted_tma", "weight_grad_sorted"
    else:
        b_rows, role = "sorted", "weight_grad"
    tiles = tiles or gemm_tiles(hidden_rows.dtype, role, gated=two_gradients, rows_x_hidden=num_rows * hidden,
                                hidden=hidden, uniform_weight_elements=dw.numel() if layout.uniform else None)
    rows_desc = None  # a TMA descriptor of the sorted rows, in boxes of TILE_K rows x TILE_N columns
    if b_rows == "sorted_tma":
        rows_desc = row_major_descriptor(token_rows, [tiles.tile_k, tiles.tile_n])
    # The grid is exact: the tiles depend only on the widths and H, sum_e cdiv(W_e, TILE_M) * cdiv(H, TILE_N).
    num_tiles = layout.tiles_per_row_tile(tiles.tile_m)[1] * ceil_div(hidden, tiles.tile_n)
    if row_splits is None:
        row_splits = weight_grad_row_splits(num_tiles, num_rows, layout.num_experts, tiles.tile_k, hidden_rows.dtype,
                                            hidden_rows.device)
    partials = None  # (gradients, row_splits, TW, H) fp32: each run's sum
    if row_splits > 1:
        partials = torch.empty((1 + two_gradients, row_splits, *shape), dtype=torch.float32, device=dw.device)
    traceable(_weight_grad_gemm)[(num_tiles, row_splits)](
        hidden_rows, hidden_rows2, token_rows, rows_desc,
        dw, dw_2, partials,
        routing_weights, routing_weight_index,
        row_to_token, layout.expert_row_offsets, layout.expert_width_offsets,
        layout.num_experts, hidden, layout.max_width, layout.total_width,
        ROW_SPLITS=row_splits,
        SECOND_OUTPUT=two_gradients,
        A_ACTIVATION=activation,
        GATED=activation is not None and is_gated(activation),
        INDEXED_ROUTING_WEIGHTS=routing_weight_index is not None,
        B_ROWS=b_rows,
        **_launch_options(hidden_rows.dtype, tiles, layout),
    )
    if row_splits > 1:
        gradient_size = dw.numel()
        block = rows_per_program(1, SUM_SPLITS_ELEMENTS)
        traceable(_sum_row_splits)[(ceil_div(gradient_size, block),)](
            partials, dw, dw_2, gradient_size, ROW_SPLITS=row_splits, SECOND_OUTPUT=two_gradients, BLOCK=block,
            num_warps=PERMUTE_NUM_WARPS,
        )
    return dw, dw_2
