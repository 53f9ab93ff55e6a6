"""The expert sort: a stable counting sort of the (token, slot) assignments by expert, in a few launches.

R = N * k assignments cut into segments of B assignments:
    _count_expert_segments_kernel     per segment: assignments per expert, and the rank of each assignment among the
                                    earlier ones of its segment with the same expert (the route gives both already:
                                    route.py), then _segment_table_kernel
    _segment_table_kernel             per chunk of experts: scans the [segments, E] counts over the segments (each
                                    segment's start per expert, assignments per expert); the last program to finish
                                    scans the experts' totals (expert_row_offsets), and, for the route, adds up the
                                    aux loss
    _scatter_sorted_rows_kernel     per assignment: row = expert_row_offsets[e] + segment_expert_starts[b, e] + rank
Every reduction runs in a fixed order, so every result is bitwise reproducible: the one atomic, a counter, only
elects which program of _segment_table_kernel does the final sums. Every size follows from the input shapes, so
nothing synchronises with the host.
"""

import torch
import triton
import triton.language as tl

from triton_moe.kernels.host import (INDEX_DTYPES, ceil_div, check_int, check_tensor_dim, check_tensor_shape,
                                     next_power_of_2, traceable)
from triton_moe.kernels.tuning import (RANK_CHUNK, SCATTER_ASSIGNMENTS, SORT_SEGMENT_ASSIGNMENTS, SORT_NUM_WARPS,
                                       TABLE_EXPERT_CHUNK, TABLE_NUM_WARPS, TABLE_SCAN_CHUNK, TABLE_TILE_ELEMENTS,
                                       ZERO_CHUNK)
from triton_moe.routing import sort_key_dtype


@triton.jit
def _segment_table_kernel(
    segment_expert_counts_ptr, segment_prob_sums_ptr, segment_lse_sq_sums_ptr,
    segment_expert_starts_ptr, tokens_per_expert_ptr, expert_row_offsets_ptr, chunk_balance_ptr, table_ticket_ptr,
    aux_loss_ptr,
    num_segments, num_experts, num_assignments, num_tokens, load_balance_coef, z_loss_coef,
    AUX: tl.constexpr,
    SEGMENTS_PER_STEP: tl.constexpr,
    EXPERT_CHUNK: tl.constexpr,
    SCAN_CHUNK: tl.constexpr,
):
    """One chunk of EXPERT_CHUNK experts of the [segments, E] tables, its segments SEGMENTS_PER_STEP at a time.

    segment_expert_starts[b, e] = sum_{b' < b} counts[b', e] (int32) and tokens_per_expert [E] int64. With AUX, also
    the chunk's share of the load-balancing sum, sum_e f_e * P_e with f_e = count_e / (N * k) and P_e = sum of p_e
    / N (num_assignments and num_tokens as floats, N > 0), into chunk_balance [chunks] fp32.

    Then each program counts itself done on table_ticket (zeroed by the launch before), and the last one writes
    expert_row_offsets [E + 1] int64, the exclusive scan of tokens_per_expert with the total at the end, and with
    AUX aux_loss = load_balance_coef * E * sum of chunk_balance + z_loss_coef * sum(lse²) / N. It reads the other
    programs' results from L2, past its own L1. All sums run in a fixed order: the result does not depend on
    which program finishes last.
    """
    chunk = tl.program_id(0)
    experts = chunk * EXPERT_CHUNK + tl.arange(0, EXPERT_CHUNK)  # (EXPERT_CHUNK,)
    expert_mask = experts < num_experts
    step_segments = tl.arange(0, SEGMENTS_PER_STEP)
    counted = tl.zeros((EXPERT_CHUNK,), dtype=tl.int32)  # assignments in the segments before the step
    prob_sums = tl.zeros((EXPERT_CHUNK,), dtype=tl.float32)
    for segment_start in range(0, num_segments, SEGMENTS_PER_STEP):
        segments = segment_start + step_segments
        offsets = segments[:, None].to(tl.int64) * num_experts + experts[None, :]  # (SEGMENTS_PER_STEP, EXPERT_CHUNK)
        mask = (segments < num_segments)[:, None] & expert_mask[None, :]
        counts = tl.load(segment_expert_counts_ptr + offsets, mask=mask, other=0)
        tl.store(segment_expert_starts_ptr + offsets, tl.cumsum(counts, axis=0) - counts + counted[None, :], mask=mask)
        counted += tl.sum(counts, axis=0)
        if AUX:
            prob_sums += tl.sum(tl.load(segment_prob_sums_ptr + offsets, mask=mask, other=0.0), axis=0)
    tl.store(tokens_per_expert_ptr + experts, counted.to(tl.int64), mask=expert_mask)
    if AUX:
        balance = (counted.to(tl.float32) / num_assignments) * (prob_sums / num_tokens)
        tl.store(chunk_balance_ptr + chunk, tl.sum(balance, axis=0))

    # Every thread's stores are issued before the counter moves; acq_rel orders them before it for the last program.
    tl.debug_barrier()
    num_chunks = tl.num_programs(0)
    if tl.atomic_add(table_ticket_ptr, 1, sem="acq_rel") == num_chunks - 1:
        scan_experts = tl.arange(0, SCAN_CHUNK)
        rows_before = tl.zeros((1,), dtype=tl.int64)  # assignments of the experts before the step
        tl.store(expert_row_offsets_ptr + tl.arange(0, 1), rows_before)
        for expert_start in range(0, num_experts, SCAN_CHUNK):
            scan_mask = expert_start + scan_experts < num_experts
            totals = tl.load(tokens_per_expert_ptr + expert_start + scan_experts, mask=scan_mask, other=0,
                             cache_modifier=".cg")
            tl.store(expert_row_offsets_ptr + expert_start + 1 + scan_experts, rows_before + tl.cumsum(totals, axis=0),
                     mask=scan_mask)
            rows_before += tl.sum(totals, axis=0)
        if AUX:
            balance_sum = tl.zeros((SCAN_CHUNK,), dtype=tl.float32)
            for chunk_start in range(0, num_chunks, SCAN_CHUNK):
                chunks = chunk_start + scan_experts
                balance_sum += tl.load(chunk_balance_ptr + chunks, mask=chunks < num_chunks, other=0.0,
                                       cache_modifier=".cg")
            lse_sq_sums = tl.zeros((SCAN_CHUNK,), dtype=tl.float32)
            for segment_start in range(0, num_segments, SCAN_CHUNK):
                segments = segment_start + scan_experts
                lse_sq_sums += tl.load(segment_lse_sq_sums_ptr + segments, mask=segments < num_segments, other=0.0)
            load_balance_loss = num_experts * tl.sum(balance_sum, axis=0)
            z_loss = tl.sum(lse_sq_sums, axis=0) / num_tokens
            tl.store(aux_loss_ptr, load_balance_coef * load_balance_loss + z_loss_coef * z_loss)


@triton.jit
def _count_expert_segments_kernel(
    expert_indices_ptr, segment_expert_counts_ptr, ranks_in_segment_ptr, table_ticket_ptr,
    num_assignments, num_experts, segment_assignments,
    SEGMENT_POW2: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    ZERO_CHUNK: tl.constexpr,
):
    """One segment of segment_assignments flat assignments: row `segment` of segment_expert_counts [segments, E] int32,
    and for each assignment its rank among the segment's earlier assignments to the same expert (ranks_in_segment).

    Every pair of the segment is compared, RANK_CHUNK columns at a time, which gives each assignment its rank and
    its expert's count in the segment without a [segment, E] one-hot, for any E and any indices (a token may list an
    expert twice). The row is zeroed, then each assignment writes its expert's count: the same value for all the
    assignments of one expert, so the order of those stores does not matter. Program 0 zeroes
    _segment_table_kernel's counter, table_ticket.
    """
    segment = tl.program_id(0).to(tl.int64)
    if segment == 0:
        tl.store(table_ticket_ptr, 0)
    segment_start = segment * segment_assignments
    lanes = tl.arange(0, SEGMENT_POW2)  # (SEGMENT_POW2,) position in the segment
    lane_mask = (lanes < segment_assignments) & (segment_start + lanes < num_assignments)
    # Lanes past the end hold expert -1, which no real assignment has.
    lane_experts = tl.load(expert_indices_ptr + segment_start + lanes, mask=lane_mask, other=-1).to(tl.int32)
    ranks = tl.zeros((SEGMENT_POW2,), dtype=tl.int32)
    counts = tl.zeros((SEGMENT_POW2,), dtype=tl.int32)  # of each lane's expert in the segment
    for chunk_start in range(0, segment_assignments, RANK_CHUNK):
        others = chunk_start + tl.arange(0, RANK_CHUNK)  # (RANK_CHUNK,)
        other_mask = (others < segment_assignments) & (segment_start + others < num_assignments)
        other_experts = tl.load(expert_indices_ptr + segment_start + others, mask=other_mask, other=-1).to(tl.int32)
        same = other_experts[None, :] == lane_experts[:, None]  # (SEGMENT_POW2, RANK_CHUNK)
        ranks += tl.sum((same & (others[None, :] < lanes[:, None])).to(tl.int32), axis=1)
        counts += tl.sum(same.to(tl.int32), axis=1)
    tl.store(ranks_in_segment_ptr + segment_start + lanes, ranks, mask=lane_mask)
    counts_row_ptr = segment_expert_counts_ptr + segment * num_experts
    for expert_start in range(0, num_experts, ZERO_CHUNK):
        experts = expert_start + tl.arange(0, ZERO_CHUNK)
        tl.store(counts_row_ptr + experts, tl.zeros((ZERO_CHUNK,), dtype=tl.int32), mask=experts < num_experts)
    # The zeros must land before the counts, which other threads of the program store.
    tl.debug_barrier()
    tl.store(counts_row_ptr + lane_experts, counts, mask=lane_mask)


@triton.jit
def _scatter_sorted_rows_kernel(
    expert_indices_ptr, ranks_in_segment_ptr, segment_expert_starts_ptr, expert_row_offsets_ptr,
    row_to_flat_ptr, row_to_token_ptr, row_expert_ptr, flat_to_row_ptr,
    num_assignments, num_experts, top_k, segment_assignments,
    ASSIGNMENTS_PER_PROGRAM: tl.constexpr,
):
    """Each flat assignment f = token * top_k + slot of expert e, in segment b = f // segment_assignments, goes to
    row = expert_row_offsets[e] + segment_expert_starts[b, e] + ranks_in_segment[f]; writes the four row maps."""
    # (ASSIGNMENTS_PER_PROGRAM,)
    flat = tl.program_id(0).to(tl.int64) * ASSIGNMENTS_PER_PROGRAM + tl.arange(0, ASSIGNMENTS_PER_PROGRAM)
    mask = flat < num_assignments
    expert = tl.load(expert_indices_ptr + flat, mask=mask, other=0).to(tl.int64)
    count_segment = flat // segment_assignments
    row = (tl.load(expert_row_offsets_ptr + expert, mask=mask, other=0)
           + tl.load(segment_expert_starts_ptr + count_segment * num_experts + expert, mask=mask, other=0)
           + tl.load(ranks_in_segment_ptr + flat, mask=mask, other=0))
    tl.store(row_to_flat_ptr + row, flat, mask=mask)
    tl.store(row_to_token_ptr + row, flat // top_k, mask=mask)
    tl.store(row_expert_ptr + row, expert.to(row_expert_ptr.dtype.element_ty), mask=mask)
    tl.store(flat_to_row_ptr + flat, row, mask=mask)


def no_sort_tables(num_experts, ranks_in_segment):
    """What topk_softmax and count_expert_segments return for the sort when there are no assignments: an empty table,
    the (empty) ranks, zero tokens per expert and zero row offsets."""
    device = ranks_in_segment.device
    segment_expert_starts = torch.empty((0, num_experts), dtype=torch.int32, device=device)  # (0, E)
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=device)  # (E,)
    expert_row_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)  # (E + 1,)
    return segment_expert_starts, ranks_in_segment, tokens_per_expert, expert_row_offsets


def launch_segment_table(segment_expert_counts, segment_prob_sums, segment_lse_sq_sums, table_ticket, aux_loss,
                        num_assignments, num_tokens, load_balance_coef, z_loss_coef):
    """_segment_table_kernel over segment_expert_counts [segments, E] (with the aux loss's partials unless they are
    None): returns segment_expert_starts [segments, E] int32, tokens_per_expert [E] int64, expert_row_offsets [E + 1]
    int64, and writes aux_loss."""
    num_segments, num_experts = segment_expert_counts.shape
    device = segment_expert_counts.device
    segment_expert_starts = torch.empty_like(segment_expert_counts)  # (segments, E)
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int64, device=device)  # (E,)
    expert_row_offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)  # (E + 1,)
    expert_chunk = min(next_power_of_2(num_experts), TABLE_EXPERT_CHUNK)
    num_chunks = ceil_div(num_experts, expert_chunk)
    chunk_balance = torch.empty(num_chunks, dtype=torch.float32, device=device)  # (chunks,)
    traceable(_segment_table_kernel)[(num_chunks,)](
        segment_expert_counts, segment_prob_sums, segment_lse_sq_sums,
        segment_expert_starts, tokens_per_expert, expert_row_offsets, chunk_balance, table_ticket, aux_loss,
        num_segments, num_experts, float(num_assignments), float(num_tokens), float(load_balance_coef),
        float(z_loss_coef),
        AUX=segment_prob_sums is not None,
        SEGMENTS_PER_STEP=min(next_power_of_2(num_segments), TABLE_TILE_ELEMENTS // expert_chunk),
        EXPERT_CHUNK=expert_chunk, SCAN_CHUNK=TABLE_SCAN_CHUNK, num_warps=TABLE_NUM_WARPS,
    )
    return segment_expert_starts, tokens_per_expert, expert_row_offsets


def check_shape(name, tensor, shape):
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_assignments(expert_indices):
    if expert_indices.numel() >= 2**31:
        raise ValueError(f"expert_indices must hold fewer than 2**31 assignments (int32 counts and ranks), "
                         f"got {expert_indices.numel()}")


def count_expert_segments(expert_indices: torch.Tensor, num_experts: int,
                        segment_assignments: int = SORT_SEGMENT_ASSIGNMENTS) -> tuple[torch.Tensor, ...]:
    """What topk_softmax gives the sort, for any indices: per segment of segment_assignments flat assignments, the count
    of each expert and each assignment's rank among the segment's earlier assignments to the same expert, then their
    scans; two launches (none when N * k = 0).

    Args:
        expert_indices: [N, k] int32/int64 in [0, num_experts); flat assignment f = token * k + slot.
        num_experts: E >= 1.
        segment_assignments: assignments per segment, >= 1 (the rank costs grow with its square).
    Returns:
        segment_expert_starts [cdiv(N * k, segment_assignments), E] int32, ranks_in_segment [N, k] int32,
        tokens_per_expert [E] int64 and expert_row_offsets [E + 1] int64, as topk_softmax returns them.
    """
    check_tensor_dim("expert_indices", expert_indices, 2, INDEX_DTYPES)
    check_int("num_experts", num_experts, 1)
    check_int("segment_assignments", segment_assignments, 1)
    check_assignments(expert_indices)
    num_assignments = expert_indices.numel()
    num_segments = ceil_div(num_assignments, segment_assignments)
    device = expert_indices.device
    ranks_in_segment = torch.empty(expert_indices.shape, dtype=torch.int32, device=device)  # (N, k)
    if num_segments == 0:
        return no_sort_tables(num_experts, ranks_in_segment)
    segment_expert_counts = torch.empty((num_segments, num_experts), dtype=torch.int32, device=device)  # (segments, E)
    table_ticket = torch.empty((), dtype=torch.int32, device=device)  # zeroed by the counting kernel
    traceable(_count_expert_segments_kernel)[(num_segments,)](
        expert_indices, segment_expert_counts, ranks_in_segment, table_ticket,
        num_assignments, num_experts, segment_assignments,
        SEGMENT_POW2=next_power_of_2(segment_assignments), RANK_CHUNK=RANK_CHUNK, ZERO_CHUNK=ZERO_CHUNK,
        num_warps=SORT_NUM_WARPS,
    )
    segment_expert_starts, tokens_per_expert, expert_row_offsets = launch_segment_table(
        segment_expert_counts, None, None, table_ticket, None, num_assignments, expert_indices.shape[0], 0.0, 0.0)
    return segment_expert_starts, ranks_in_segment, tokens_per_expert, expert_row_offsets


def sort_by_expert_segments(expert_indices: torch.Tensor, segment_expert_starts: torch.Tensor,
                          ranks_in_segment: torch.Tensor, expert_row_offsets: torch.Tensor,
                          segment_assignments: int) -> tuple[torch.Tensor, ...]:
    """The stable sort of the assignments by expert, from their per-segment starts and ranks; one launch (none when
    N * k = 0).

    Args:
        expert_indices: [N, k] int32/int64 in [0, E); flat assignment f = token * k + slot.
        segment_expert_starts: [cdiv(N * k, segment_assignments), E] int32, from count_expert_segments or topk_softmax.
        ranks_in_segment: [N, k] int32, and expert_row_offsets: [E + 1] int64, from the same call.
        segment_assignments: the flat assignments per segment of those counts.
    Returns (as the fields of routing.ExpertSort of the same names, whose dtypes they have):
        row_to_flat, row_to_token [N * k] int64; row_expert [N * k] int16 (int32 past 32767 experts);
        flat_to_row [N * k] int64.
    """
    check_tensor_dim("expert_indices", expert_indices, 2, INDEX_DTYPES)
    check_int("segment_assignments", segment_assignments, 1)
    check_assignments(expert_indices)
    check_tensor_dim("segment_expert_starts", segment_expert_starts, 2, (torch.int32,))
    num_assignments = expert_indices.numel()
    num_experts = segment_expert_starts.shape[1]
    if num_experts < 1:
        raise ValueError(f"segment_expert_starts must have at least one expert column, got shape "
                         f"{tuple(segment_expert_starts.shape)}")
    check_shape("segment_expert_starts", segment_expert_starts,
                 (ceil_div(num_assignments, segment_assignments), num_experts))
    check_tensor_dim("ranks_in_segment", ranks_in_segment, 2, (torch.int32,))
    check_shape("ranks_in_segment", ranks_in_segment, expert_indices.shape)
    check_tensor_shape("expert_row_offsets", expert_row_offsets, (num_experts + 1,), (torch.int64,))
    device = expert_indices.device
    row_to_flat = torch.empty(num_assignments, dtype=torch.int64, device=device)  # (R,)
    row_to_token = torch.empty(num_assignments, dtype=torch.int64, device=device)  # (R,)
    row_expert = torch.empty(num_assignments, dtype=sort_key_dtype(num_experts), device=device)  # (R,)
    flat_to_row = torch.empty(num_assignments, dtype=torch.int64, device=device)  # (N * k,)
    if num_assignments > 0:
        traceable(_scatter_sorted_rows_kernel)[(ceil_div(num_assignments, SCATTER_ASSIGNMENTS),)](
            expert_indices, ranks_in_segment, segment_expert_starts, expert_row_offsets,
            row_to_flat, row_to_token, row_expert, flat_to_row,
            num_assignments, num_experts, expert_indices.shape[1], segment_assignments,
            ASSIGNMENTS_PER_PROGRAM=SCATTER_ASSIGNMENTS, num_warps=SORT_NUM_WARPS,
        )
    return row_to_flat, row_to_token, row_expert, flat_to_row
