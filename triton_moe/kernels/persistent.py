"""The persistent, warp-specialised grouped GEMM of the expert width -> hidden layout, for large 16-bit problems on
Hopper: per expert e, out[rows of e] = A[rows of e, :W_e] @ B[width_off_e : width_off_e + W_e], A a [R, max_width]
hidden-activation matrix, B a [TW, H] weight, out [R, H]. Roles: the down projection and the input gradient's
rows (one product; grouped_gemm.py decides, through tuning.persistent_rows_gemm, and keeps the portable kernel for
every other case).

One program per SM walks the tiles (an expert's row tile x a hidden tile) in a loop that Triton's Hopper warp
specialisation splits into a producer, which loads both operands by TMA through device-side descriptors, and two
consumer warp groups, which run the MMAs and the epilogue: the producer loads the next tile while the consumers
store the last, which the portable kernel, one tile a program, cannot overlap. The tiles depend on the routing:
`_tile_table_kernel` lists them on the device first (expert, the expert's first tile), since the warp-specialised
loop takes no scan of its own. Every output element is the same sum, in the same order (K steps of TILE_K), as the
portable kernel's with the same TILE_K.

TMA reads whole boxes: an expert's last row tile takes the next expert's first rows, which only reach output rows
the store masks; a K step past W_e would multiply A's padding columns by the next expert's weight rows, so the
launcher requires every width to be a multiple of TILE_K, or one width (where columns past it are outside the
matrix, which TMA reads as zeros).
"""

import functools
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from triton_moe.kernels.host import ceil_div, running_in_interpreter, traceable
from triton_moe.kernels.layout import ExpertLayout
from triton_moe.kernels.tuning import TILE_TABLE_BLOCK, GemmTiles


@triton.jit
def _tile_table_kernel(expert_row_offsets_ptr, tile_table_ptr, num_tiles_ptr, num_experts, col_tiles, max_tiles,
                       TILE_M: tl.constexpr, BLOCK: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    """tile_table[t] = (expert, the expert's first tile) for the tiles t of this program's block (experts one after
    another, each cdiv(rows_e, TILE_M) * col_tiles tiles, hidden tiles fastest), and num_tiles = their number."""
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    rows_per_expert = tl.load(expert_row_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        expert_row_offsets_ptr + experts, mask=is_expert, other=0)
    tiles_per_expert = (tl.cdiv(rows_per_expert, TILE_M) * col_tiles).to(tl.int32)  # (EXPERTS_POW2,)
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


@functools.lru_cache(maxsize=16)
def _num_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM; a few under the interpreter, each walking several tiles."""
    if running_in_interpreter():
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_rows_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, layout: ExpertLayout,
                         tiles: GemmTiles) -> None:
    """out [R, H] = per expert, a [R, max_width]'s rows @ b [TW, H]'s rows of the expert (see the module docstring).
    The caller checks the shapes, dtypes and TMA's rules (tuning.persistent_rows_gemm)."""
    hidden, num_rows = b.shape[1], layout.num_rows
    col_tiles = ceil_div(hidden, tiles.tile_n)
    # cdiv(rows_e, M) <= rows_e // M + 1 and sum_e rows_e // M <= cdiv(R, M): an upper bound on the tiles
    max_tiles = (ceil_div(num_rows, tiles.tile_m) + layout.num_experts) * col_tiles
    tile_table = torch.empty((max_tiles, 2), dtype=torch.int32, device=a.device)  # (tiles, 2)
    num_tiles = torch.empty(1, dtype=torch.int32, device=a.device)  # (1,)
    traceable(_tile_table_kernel)[(ceil_div(max_tiles, TILE_TABLE_BLOCK),)](
        layout.expert_row_offsets, tile_table, num_tiles, layout.num_experts, col_tiles, max_tiles,
        TILE_M=tiles.tile_m, BLOCK=TILE_TABLE_BLOCK, EXPERTS_POW2=layout.facts.kernel_constants["EXPERTS_POW2"],
        num_warps=4,
    )
    num_programs = min(_num_programs(a.device), max_tiles)
    with _descriptor_scratch():
        traceable(_persistent_rows_gemm)[(num_programs,)](
            a, b, out, layout.expert_row_offsets, layout.expert_width_offsets, tile_table, num_tiles,
            num_rows, b.shape[0], hidden, layout.max_width,
            TILE_M=tiles.tile_m, TILE_N=tiles.tile_n, TILE_K=tiles.tile_k, NUM_PROGRAMS=num_programs,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
