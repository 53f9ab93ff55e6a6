"""Persistent, warp-specialised grouped GEMMs for large 16-bit problems on Hopper, both operands by TMA through
device-side descriptors. Two kernels (grouped_gemm.py decides when, through tuning.takes_persistent_kernel, and
keeps its portable kernels for every other case):
- `_persistent_rows_gemm`, the expert width -> hidden layout: per expert e, out[rows of e] = A[rows of e, :W_e] @
  B[width_off_e : width_off_e + W_e], A a [R, max_width] hidden-activation matrix, B a [TW, H] weight, out [R, H].
  Roles: the down projection, the input gradient's rows (one product).
- `_persistent_weight_grad`: per expert e, dW[width_off_e + m] = sum over rows r of e of A[r, m] * B[r], A a
  hidden-activation matrix, B the [R, H] token rows in expert-sorted order. Roles: dW2, and dW1 without a gate
  (one output: with two accumulators sharing B, Triton 3.6's warp specialisation computes wrong sums).

One program per SM walks the tiles in a loop that Triton's Hopper warp specialisation splits into a producer,
which loads the operands, and two consumer warp groups, which run the MMAs and the epilogue: the producer loads the
next tile while the consumers store the last, which the portable kernels, one tile a program, cannot overlap.
`_tile_table_kernel` lists the tiles on the device first (expert, the expert's first tile), since the
warp-specialised loop takes no scan of its own: a row GEMM's tiles depend on the routing. Every output element is
the same sum, in the same order (K steps of TILE_K), as the portable kernel's with the same TILE_K.

TMA reads whole boxes. In the row GEMM an expert's last row tile takes the next expert's first rows, which only
reach output rows the store masks; a K step past W_e would multiply A's padding columns by the next expert's
weight rows, so the launcher requires every width to be a multiple of TILE_K, or one width (where the columns past
it are outside the matrix, which TMA reads as zeros). The weight gradient reduces over the expert's rows: its
descriptors end at the expert's last row, so that a K step past it reads zeros, and its width tiles past W_e
reach only output rows the store masks.
"""

from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from triton_moe.kernels.host import ceil_div, running_in_interpreter, traceable
from triton_moe.kernels.layout import ExpertLayout
from triton_moe.kernels.tuning import TILE_TABLE_BLOCK, GemmTiles, hidden_group, multiprocessors


@triton.jit
def grouped_tile(local_tile, fast_tiles, slow_tiles, GROUP: tl.constexpr):
    """(slow, fast) coordinates of an expert's `local_tile`-th tile on a grid of slow_tiles x fast_tiles. GROUP 1:
    the fast coordinate steps fastest. Else the slow tiles go in groups of GROUP: consecutive tiles step through the
    group's slow tiles at one fast tile, then move to the next fast tile, so that the programs running together
    share a fast tile's operand and read each once for the group (the last group may be short)."""
    if GROUP == 1:
        slow = local_tile // fast_tiles
        fast = local_tile % fast_tiles
    else:
        group_tiles = GROUP * fast_tiles
        group_first = (local_tile // group_tiles) * GROUP
        group_size = tl.minimum(slow_tiles - group_first, GROUP)
        slow = group_first + (local_tile % group_tiles) % group_size
        fast = (local_tile % group_tiles) // group_size
    return slow, fast


@triton.jit
def _tile_table_kernel(offsets_ptr, tile_table_ptr, num_tiles_ptr, num_experts, col_tiles, max_tiles,
                       TILE_M: tl.constexpr, BLOCK: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    """tile_table[t] = (expert, the expert's first tile) for the tiles t of this program's block, and num_tiles =
    their number: experts one after another, each cdiv(size_e, TILE_M) * col_tiles tiles, size_e =
    offsets[e+1] - offsets[e] (its rows for a row GEMM, its width for a weight gradient)."""
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    sizes = tl.load(offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        offsets_ptr + experts, mask=is_expert, other=0)
    tiles_per_expert = (tl.cdiv(sizes, TILE_M) * col_tiles).to(tl.int32)  # (EXPERTS_POW2,)
    tile_ends = tl.cumsum(tiles_per_expert, 0)
    tile_ids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    expert = tl.sum((tile_ends[None, :] <= tile_ids[:, None]).to(tl.int32), 1)  # (BLOCK,)
    first_tile = tl.sum(tl.where(experts[None, :] < expert[:, None], tiles_per_expert[None, :], 0), 1)  # (BLOCK,)
    in_table = tile_ids < max_tiles
    tl.store(tile_table_ptr + 2 * tile_ids, expert, mask=in_table)
    tl.store(tile_table_ptr + 2 * tile_ids + 1, first_tile, mask=in_table)
    if tl.program_id(0) == 0:
        tl.store(num_tiles_ptr, tl.sum(tiles_per_expert, 0))


@triton.jit
def _persistent_rows_gemm(
    a_ptr, b_ptr, out_ptr,
    expert_row_offsets_ptr, expert_width_offsets_ptr, tile_table_ptr, num_tiles_ptr,
    num_rows, total_width, hidden, max_width,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """Tiles program_id, program_id + NUM_PROGRAMS, ... of out = A @ B_e (see the module docstring)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_rows, max_width], strides=[max_width, 1],
                                       block_shape=[TILE_M, TILE_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[total_width, hidden], strides=[hidden, 1],
                                       block_shape=[TILE_K, TILE_N])
    num_tiles = tl.load(num_tiles_ptr)
    # warp_specialize: the producer/consumer split described above (Hopper: with 4 warps, which it makes 12)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, warp_specialize=True):
        expert = tl.load(tile_table_ptr + 2 * tile_id)
        first_tile = tl.load(tile_table_ptr + 2 * tile_id + 1)
        # TMA coordinates are int32: R < 2^31 rows and TW < 2^31 weight rows (the launcher's tuning checks)
        row_start = tl.load(expert_row_offsets_ptr + expert).to(tl.int32)
        expert_num_rows = tl.load(expert_row_offsets_ptr + expert + 1).to(tl.int32) - row_start
        width_start = tl.load(expert_width_offsets_ptr + expert).to(tl.int32)
        width = tl.load(expert_width_offsets_ptr + expert + 1).to(tl.int32) - width_start
        # Hidden tiles fastest, as in the portable kernel: the programs running together share A's row tile.
        col_tiles = tl.cdiv(hidden, TILE_N)
        row_tile = (tile_id - first_tile) // col_tiles
        col_tile = (tile_id - first_tile) % col_tiles
        a_row = row_start + row_tile * TILE_M
        acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
        for k_start in range(0, width, TILE_K):
            a = a_desc.load([a_row, k_start])
            b = b_desc.load([width_start + k_start, col_tile * TILE_N])
            acc = tl.dot(a, b, acc)
        expert_rows = row_tile * TILE_M + tl.arange(0, TILE_M)  # (TILE_M,) row index within the expert
        cols = col_tile * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,)
        out_offsets = (row_start + expert_rows)[:, None].to(tl.int64) * hidden + cols[None, :]  # (TILE_M, TILE_N)
        out_mask = (expert_rows < expert_num_rows)[:, None] & (cols < hidden)[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _persistent_weight_grad(
    a_ptr, b_ptr, out_ptr,
    expert_row_offsets_ptr, expert_width_offsets_ptr, tile_table_ptr, num_tiles_ptr,
    hidden, max_width,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    HIDDEN_GROUP: tl.constexpr,
):
    """Tiles program_id, program_id + NUM_PROGRAMS, ... of dW_e = A_eᵀ @ B_e (see the module docstring).

    HIDDEN_GROUP: an expert's tiles run in groups of HIDDEN_GROUP hidden tiles (grouped_tile), each width tile taken
    by the group's hidden tiles in turn (1: one hidden tile's width tiles, then the next hidden tile's)."""
    num_tiles = tl.load(num_tiles_ptr)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, warp_specialize=True):
        expert = tl.load(tile_table_ptr + 2 * tile_id)
        first_tile = tl.load(tile_table_ptr + 2 * tile_id + 1)
        row_start = tl.load(expert_row_offsets_ptr + expert).to(tl.int32)
        row_end = tl.load(expert_row_offsets_ptr + expert + 1).to(tl.int32)
        width_start = tl.load(expert_width_offsets_ptr + expert).to(tl.int32)
        width = tl.load(expert_width_offsets_ptr + expert + 1).to(tl.int32) - width_start
        # Width tiles fastest, as in the portable kernel: the programs running together share B's hidden tile and
        # sweep A_e, which stays in L2 across the hidden tiles where it takes a few MiB. An A_e larger than L2 would
        # come from DRAM again for every hidden tile: there the launcher asks for groups of HIDDEN_GROUP hidden
        # tiles, which read each A tile once for the group.
        hidden_tile, width_tile = grouped_tile(tile_id - first_tile, tl.cdiv(width, TILE_M), tl.cdiv(hidden, TILE_N),
                                               HIDDEN_GROUP)
        # Descriptors that end at the expert's last row: a K step past it reads zeros. (At least one row: an
        # expert without rows, which loads nothing, still makes a valid descriptor.)
        rows_end = tl.maximum(row_end, 1)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[rows_end, max_width], strides=[max_width, 1],
                                           block_shape=[TILE_K, TILE_M])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[rows_end, hidden], strides=[hidden, 1],
                                           block_shape=[TILE_K, TILE_N])
        acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
        for k_start in range(row_start, row_end, TILE_K):
            a = a_desc.load([k_start, width_tile * TILE_M])  # (TILE_K, TILE_M)
            b = b_desc.load([k_start, hidden_tile * TILE_N])  # (TILE_K, TILE_N)
            acc = tl.dot(a.T, b, acc)
        ms = width_tile * TILE_M + tl.arange(0, TILE_M)  # (TILE_M,) column within the expert's width
        ns = hidden_tile * TILE_N + tl.arange(0, TILE_N)  # (TILE_N,)
        out_offsets = (width_start + ms)[:, None].to(tl.int64) * hidden + ns[None, :]  # (TILE_M, TILE_N)
        out_mask = (ms < width)[:, None] & (ns < hidden)[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextmanager
def _descriptor_scratch():
    """Triton's allocator for the launch's device-side TMA descriptors (global scratch, which it allocates per
    launch): torch's caching allocator, so that CUDA-graph capture takes the memory from the graph's pool. Set for
    the launch only: Triton keeps its allocator in a context variable, which the autograd engine's threads do not
    inherit, and the caller may have set their own."""
    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _num_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM; a few under the interpreter, each walking several tiles."""
    if running_in_interpreter():
        return 3
    return multiprocessors(device)


def _tile_table(offsets: torch.Tensor, layout: ExpertLayout, col_tiles: int, max_tiles: int, tile_m: int):
    """[max_tiles, 2] int32 (expert, the expert's first tile) and [1] int32 the number of tiles, listed on the device
    from the experts' sizes in `offsets` (see _tile_table_kernel)."""
    tile_table = torch.empty((max_tiles, 2), dtype=torch.int32, device=offsets.device)  # (max_tiles, 2)
    num_tiles = torch.empty(1, dtype=torch.int32, device=offsets.device)  # (1,)
    traceable(_tile_table_kernel)[(ceil_div(max_tiles, TILE_TABLE_BLOCK),)](
        offsets, tile_table, num_tiles, layout.num_experts, col_tiles, max_tiles,
        TILE_M=tile_m, BLOCK=TILE_TABLE_BLOCK, EXPERTS_POW2=layout.facts.kernel_constants["EXPERTS_POW2"],
        num_warps=4,
    )
    return tile_table, num_tiles


def persistent_rows_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, layout: ExpertLayout,
                         tiles: GemmTiles) -> None:
    """out [R, H] = per expert, a [R, max_width]'s rows @ b [TW, H]'s rows of the expert (see the module docstring).
    The caller checks the shapes, dtypes and TMA's rules (tuning.takes_persistent_kernel)."""
    hidden, num_rows = b.shape[1], layout.num_rows
    col_tiles = ceil_div(hidden, tiles.tile_n)
    # cdiv(rows_e, M) <= rows_e // M + 1 and sum_e rows_e // M <= cdiv(R, M): an upper bound on the tiles
    max_tiles = (ceil_div(num_rows, tiles.tile_m) + layout.num_experts) * col_tiles
    tile_table, num_tiles = _tile_table(layout.expert_row_offsets, layout, col_tiles, max_tiles, tiles.tile_m)
    num_programs = min(_num_programs(a.device), max_tiles)
    with _descriptor_scratch():
        traceable(_persistent_rows_gemm)[(num_programs,)](
            a, b, out, layout.expert_row_offsets, layout.expert_width_offsets, tile_table, num_tiles,
            num_rows, b.shape[0], hidden, layout.max_width,
            TILE_M=tiles.tile_m, TILE_N=tiles.tile_n, TILE_K=tiles.tile_k, NUM_PROGRAMS=num_programs,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )


def persistent_weight_grad(hidden_rows: torch.Tensor, sorted_rows: torch.Tensor, dw: torch.Tensor,
                           layout: ExpertLayout, tiles: GemmTiles) -> None:
    """dw [TW, H] = per expert, hidden_rows [R, max_width]'s rows of the expert, transposed, @ sorted_rows [R, H]'s
    (see the module docstring). The caller checks the shapes, dtypes and TMA's rules."""
    hidden = sorted_rows.shape[1]
    col_tiles = ceil_div(hidden, tiles.tile_n)
    max_tiles = layout.tiles_per_row_tile(tiles.tile_m)[1] * col_tiles  # exact: the tiles follow from the widths
    tile_table, num_tiles = _tile_table(layout.expert_width_offsets, layout, col_tiles, max_tiles, tiles.tile_m)
    num_programs = min(_num_programs(hidden_rows.device), max_tiles)
    # the hidden activations of an expert of the mean rows and the widest width
    slice_bytes = layout.num_rows // layout.num_experts * layout.max_width * hidden_rows.element_size()
    with _descriptor_scratch():
        traceable(_persistent_weight_grad)[(num_programs,)](
            hidden_rows, sorted_rows, dw, layout.expert_row_offsets, layout.expert_width_offsets, tile_table,
            num_tiles, hidden, layout.max_width,
            TILE_M=tiles.tile_m, TILE_N=tiles.tile_n, TILE_K=tiles.tile_k, NUM_PROGRAMS=num_programs,
            HIDDEN_GROUP=hidden_group(slice_bytes), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
