"""Session 21's draft (run in h200-2026-12-04/sixth/gluon_draft.txt; copied here unchanged but for these lines and
the command below, for gluon_pingpong.py to import): Hopper (sm_90) Gluon kernel of the MoE gathered up projection,
for triton 3.6 (torch 2.11, H200).

For rows r of expert e (rows expert_row_offsets[e]:[e+1], weight rows expert_width_offsets[e]:[e+1] of w1):
    h_pre[r, n] = bf16( sum_k x[row_to_token[r], k] * w1[woff_e + n, k] )                     n < W_e
    h_act[r, n] = bf16( relu(h_pre[r, n])^2 * routing_weights_rows[r] )   (from the ROUNDED h_pre, as the repo)
Columns >= W_e: zeros when the widths differ (as the repo's up_projection), nothing to write when uniform.

Two kernels:
  * `_gathered_up_kernel` (the priority, non-persistent): one program per (expert, 128-row tile, BN-column tile)
    from a device tile table, 8 warps (two wgmma warp groups of 64 rows each), one partition:
      A (gathered x rows)   -> cp.async (ampere async_copy) into an NVMMA-swizzled ring, commit_group / wait_group
      B (w1 rows of expert) -> TMA (host TensorDescriptor, box [BN, BK]) into the ring, one mbarrier per stage
      per k step: wait_group(S-3) ; fence_async_shared ; thread_barrier ; mbarrier.wait(B) ; async wgmma ;
                  warpgroup_mma_wait(1) ; issue the loads of step k+S-2 into the stage of step k-2
      (the one thread_barrier per step both publishes every thread's cp.async data and proves that every warp
      group finished the wgmma of step k-2, whose stage is then refilled; so S-2 steps are loaded ahead.)
  * `_gathered_up_ws_kernel` (persistent + warp-specialised): the prototype of benchmarks/results/h200-2026-12-03/
    gluon_up_prototype/gather_up.py (ran correct on an H200 with triton 3.6.0), copied with its epilogue
    options reduced to this draft's: 1 producer warp group (cp.async + TMA, mbarrier ring), 2 consumer warp groups.

Run on the GPU (from the repository root):
    PYTHONPATH=$PWD python benchmarks/results/h200-2026-12-05/scripts/gathered_up.py
Name differences: triton 3.6 spells the copies async_copy_global_to_shared (ampere async_copy and hopper tma);
3.9 renamed them async_load (the old names raise there). `_cp_async` / `_tma_load` pick whichever exists.
"""
import math
import sys

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

try:
    import torch
except ImportError:  # the compile check runs with a bare triton 3.6 venv
    torch = None

# 3.6: async_copy_global_to_shared; 3.9: async_load (and the 3.6 names raise RuntimeError there).
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# CTA-wide bar.sync: gl.thread_barrier in 3.6, gl.barrier in 3.9.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

DEFAULT_CONFIG = dict(BM=128, BN=128, BK=64, NUM_STAGES=5, num_warps=8)


# ------------------------------------------------------------------------------------------------------------------
# Tile table (plain Triton): table[t] = (expert, expert's first tile); num_tiles = sum_e cdiv(rows_e, BM) *
# cdiv(W_e, BN); experts in order, column tiles fastest within a row tile (as the repo's kernels: the programs
# running together share one gathered A row tile and sweep the expert's weight slice in L2). No host sync.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _up_tile_table_kernel(row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, num_experts, max_tiles,
                          BM: tl.constexpr, BN: tl.constexpr, BLOCK: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    rows = tl.load(row_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        row_offsets_ptr + experts, mask=is_expert, other=0)
    widths = tl.load(width_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        width_offsets_ptr + experts, mask=is_expert, other=0)
    tiles_per_expert = (tl.cdiv(rows, BM) * tl.cdiv(widths, BN)).to(tl.int32)
    tile_ends = tl.cumsum(tiles_per_expert, 0)
    tile_ids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.sum((tile_ends[None, :] <= tile_ids[:, None]).to(tl.int32), 1)
    first_tile = tl.sum(tl.where(experts[None, :] < expert[:, None], tiles_per_expert[None, :], 0), 1)
    in_table = tile_ids < max_tiles
    tl.store(tile_table_ptr + 2 * tile_ids, expert, mask=in_table)
    tl.store(tile_table_ptr + 2 * tile_ids + 1, first_tile, mask=in_table)
    if tl.program_id(0) == 0:
        tl.store(num_tiles_ptr, tl.sum(tiles_per_expert, 0))


@gluon.jit
def _decode_tile(tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN: gl.constexpr,
                 WIDTH_MULTIPLE: gl.constexpr):
    """(row_start, num_rows, width_start, width, row_tile, col_tile) of tile `tile_id`, all int32."""
    expert = gl.load(tile_table_ptr + 2 * tile_id)
    first_tile = gl.load(tile_table_ptr + 2 * tile_id + 1)
    row_start = gl.load(row_offsets_ptr + expert).to(gl.int32)
    num_rows = gl.load(row_offsets_ptr + expert + 1).to(gl.int32) - row_start
    width_start = gl.load(width_offsets_ptr + expert).to(gl.int32)
    # Without the hint the column mask splits the epilogue's stores into 2-byte ones (seen in the prototype's PTX).
    width = gl.multiple_of(gl.load(width_offsets_ptr + expert + 1).to(gl.int32) - width_start, WIDTH_MULTIPLE)
    col_tiles = gl.cdiv(width, BN)
    local = tile_id - first_tile
    return row_start, num_rows, width_start, width, local // col_tiles, local % col_tiles


@gluon.jit
def _issue_loads(step, k_tiles, x_ptr, a_base, a_cols, b_desc, b_row, a_bufs, b_bufs, b_ready,
                 BK: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Loads of k step `step` into stage step % NUM_STAGES (nothing past the last step), then one commit_group
    (always, possibly empty, so that wait_group's count of outstanding groups stays uniform)."""
    s = step % NUM_STAGES
    if step < k_tiles:
        mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
        _tma_load(b_desc, [b_row, step * BK], b_ready.index(s), b_bufs.index(s))
        _cp_async(a_bufs.index(s), x_ptr + a_base[:, None] + (step * BK + a_cols)[None, :])
    async_copy.commit_group()


@gluon.jit
def _gathered_up_kernel(x_ptr, row_to_token_ptr, b_desc, h_pre_ptr, h_act_ptr, rw_ptr,
                        row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, H, max_width,
                        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                        WIDTH_MULTIPLE: gl.constexpr):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    gl.static_assert(NUM_STAGES >= 3, "S-2 steps are loaded ahead")
    gl.static_assert(BM == 16 * NUM_WARPS, "wgmma: 4 warps (one warp group) per 64 rows")
    gl.static_assert(b_desc.block_type.shape[0] == BN)
    gl.static_assert(b_desc.block_type.shape[1] == BK)
    tile_id = gl.program_id(0)
    if tile_id >= gl.load(num_tiles_ptr):  # the grid is an upper bound on the tiles
        return
    row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
        tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN, WIDTH_MULTIPLE)

    # Gather layout: 8 bf16 = 16 B per lane (one cp.async.cg each); BK // 8 lanes span one row's BK columns.
    TPW_K: gl.constexpr = BK // 8
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [NUM_WARPS, 1], [1, 0])
    a_rows = row_tile * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
    # Rows past the expert's end gather token 0 (any valid row): their outputs are masked at the store.
    tokens = gl.load(row_to_token_ptr + row_start + a_rows, mask=a_rows < num_rows, other=0).to(gl.int64)
    a_base = tokens * H
    a_cols = gl.arange(0, BK, layout=gl.SliceLayout(0, ld))
    b_row = width_start + col_tile * BN  # past W_e: the next expert's rows (or TMA zeros), masked at the store

    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BN, BK], b_desc.layout)
    b_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(b_ready.index(i), count=1)
    fence_async_shared()  # the barrier inits, before the TMA unit uses them (as the Gluon tutorials do)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                         instr_shape=[16, BN, 16])
    # Routing weights before the K loop, so that their latency hides behind the GEMM.
    st_rows_l: gl.constexpr = gl.SliceLayout(1, mma_layout)
    rw_rows = row_tile * BM + gl.arange(0, BM, layout=st_rows_l)
    rw = gl.load(rw_ptr + row_start + rw_rows, mask=rw_rows < num_rows, other=0.0)

    k_tiles = gl.cdiv(H, BK)
    for i in gl.static_range(NUM_STAGES - 2):
        _issue_loads(i, k_tiles, x_ptr, a_base, a_cols, b_desc, b_row, a_bufs, b_bufs, b_ready, BK, NUM_STAGES)

    acc = gl.zeros((BM, BN), gl.float32, layout=mma_layout)
    for k in range(k_tiles):
        s = k % NUM_STAGES
        # This thread's copies of step k landed (S-3 later groups may still fly), fenced from the generic proxy
        # (cp.async) to the async proxy (wgmma), then published to every warp by the CTA barrier. The barrier
        # also shows that every warp group's wgmma of step k-2 is done (each waited for it in step k-1).
        async_copy.wait_group(NUM_STAGES - 3)
        fence_async_shared()
        _cta_barrier()
        mbarrier.wait(b_ready.index(s), (k // NUM_STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        _issue_loads(k + NUM_STAGES - 2, k_tiles, x_ptr, a_base, a_cols, b_desc, b_row, a_bufs, b_bufs, b_ready,
                     BK, NUM_STAGES)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    async_copy.wait_group(0)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(b_ready.index(i))

    # Epilogue: h_act from the rounded h_pre (as the repo's kernel, so the backward recomputes the same h_act),
    # then both tiles through a layout conversion to 16-byte stores per lane (faster in the prototype's runs).
    h_pre = acc.to(gl.bfloat16)
    relu = gl.maximum(h_pre.to(gl.float32), 0.0)
    h_act = (relu * relu * rw[:, None]).to(gl.bfloat16)
    TPW_N: gl.constexpr = 32 if BN >= 256 else BN // 8
    st: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [NUM_WARPS, 1], [1, 0])
    h_pre = gl.convert_layout(h_pre, st)
    h_act = gl.convert_layout(h_act, st)
    er = row_tile * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, st))
    cols = col_tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
    offs = (row_start + er)[:, None].to(gl.int64) * max_width + cols[None, :]
    mask = (er < num_rows)[:, None] & (cols < width)[None, :]
    gl.store(h_pre_ptr + offs, h_pre, mask=mask)
    gl.store(h_act_ptr + offs, h_act, mask=mask)


# ------------------------------------------------------------------------------------------------------------------
# Persistent warp-specialised variant (from the H200-tested prototype; see the module docstring)
# ------------------------------------------------------------------------------------------------------------------
@gluon.jit
def _ws_producer(x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                 tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                 NUM_PROGRAMS: gl.constexpr, P_WARPS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr):
    HALF: gl.constexpr = BM // 2
    TPW_K: gl.constexpr = BK // 8
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [P_WARPS, 1], [1, 0])
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, ld))
    half_rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, ld))
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    it = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN, WIDTH_MULTIPLE)
        n0 = width_start + col_tile * BN
        er_lo = row_tile * BM + half_rows
        er_hi = er_lo + HALF
        base_lo = gl.load(row_to_token_ptr + row_start + er_lo, mask=er_lo < num_rows, other=0).to(gl.int64) * H
        base_hi = gl.load(row_to_token_ptr + row_start + er_hi, mask=er_hi < num_rows, other=0).to(gl.int64) * H
        for k in range(k_tiles):
            s = it % NUM_STAGES
            mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
            _tma_load(b_desc, [n0, k * BK], b_ready.index(s), b_bufs.index(s))
            kcols = k * BK + cols
            _cp_async(a_bufs.index(2 * s), x_ptr + base_lo[:, None] + kcols[None, :])
            _cp_async(a_bufs.index(2 * s + 1), x_ptr + base_hi[:, None] + kcols[None, :])
            async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)  # fires when this thread's land
            it += 1


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr,
                 tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                 HALF_IDX: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 NUM_STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr):
    HALF: gl.constexpr = BM // 2
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    TPW_N: gl.constexpr = 32 if BN >= 256 else BN // 8
    st: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [4, 1], [1, 0])
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    it = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN, WIDTH_MULTIPLE)
        er_m = row_tile * BM + HALF_IDX * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma_layout))
        rw = gl.load(rw_ptr + row_start + er_m, mask=er_m < num_rows, other=0.0)
        acc = gl.zeros((HALF, BN), gl.float32, layout=mma_layout)
        for k in range(k_tiles):
            s = it % NUM_STAGES
            ph = (it // NUM_STAGES) & 1
            mbarrier.wait(a_ready.index(s), ph)
            mbarrier.wait(b_ready.index(s), ph)
            fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
            acc = warpgroup_mma(a_bufs.index(2 * s + HALF_IDX), b_bufs.index(s).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES), pred=k > 0)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES))
        h_pre = acc.to(gl.bfloat16)
        relu = gl.maximum(h_pre.to(gl.float32), 0.0)
        h_act = gl.convert_layout((relu * relu * rw[:, None]).to(gl.bfloat16), st)
        h_pre = gl.convert_layout(h_pre, st)
        er = row_tile * BM + HALF_IDX * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, st))
        cols = col_tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        offs = (row_start + er)[:, None].to(gl.int64) * max_width + cols[None, :]
        mask = (er < num_rows)[:, None] & (cols < width)[None, :]
        gl.store(h_pre_ptr + offs, h_pre, mask=mask)
        gl.store(h_act_ptr + offs, h_act, mask=mask)


@gluon.jit
def _gathered_up_ws_kernel(x_ptr, row_to_token_ptr, b_desc, h_pre_ptr, h_act_ptr, rw_ptr,
                           row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, H, max_width,
                           BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                           NUM_PROGRAMS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr):
    gl.static_assert(BM == 128, "two consumer warp groups of 64 rows each")
    P_WARPS: gl.constexpr = 4
    HALF: gl.constexpr = BM // 2
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BK], gl.bfloat16)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [2 * NUM_STAGES, HALF, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BN, BK], b_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(a_ready.index(i), count=P_WARPS * 32)  # every producer thread arrives (noinc)
        mbarrier.init(b_ready.index(i), count=1)  # expect_tx + TMA bytes
        mbarrier.init(empty.index(i), count=2)  # gl mbarrier.arrive = one arrival per 4-warp partition
    # Each partition's arguments spelled out: a tuple built by `+` holds plain ints, which warp_specialize rejects.
    gl.warp_specialize([
        (_ws_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr, tile_table_ptr,
                        num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                        0, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, WIDTH_MULTIPLE)),
        (_ws_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr, tile_table_ptr,
                        num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                        1, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, WIDTH_MULTIPLE)),
        (_ws_producer, (x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                        tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H,
                        BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, P_WARPS, WIDTH_MULTIPLE)),
    ], [4, P_WARPS], [224, 56])  # 3.6: worker_num_regs is required


WS_CONFIG = dict(BM=128, BN=256, BK=64, NUM_STAGES=3, num_warps=4)


# ------------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------------
def b_smem_layout(BN, BK):
    return gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)


def build_tile_table(expert_row_offsets, expert_width_offsets, num_rows, expert_widths, BM, BN):
    """(table [max_tiles, 2] int32, num_tiles [1] int32, max_tiles): device-built, no host sync. max_tiles bounds
    the tiles as the repo's launcher does: sum_e cdiv(rows_e, BM) <= cdiv(R, BM) + E."""
    num_experts = len(expert_widths)
    col_tiles = [triton.cdiv(w, BN) for w in expert_widths]
    max_tiles = triton.cdiv(num_rows, BM) * max(col_tiles) + sum(col_tiles)
    dev = expert_row_offsets.device
    table = torch.empty((max_tiles, 2), dtype=torch.int32, device=dev)
    num_tiles = torch.empty(1, dtype=torch.int32, device=dev)
    BLOCK = 256
    _up_tile_table_kernel[(triton.cdiv(max_tiles, BLOCK),)](
        expert_row_offsets, expert_width_offsets, table, num_tiles, num_experts, max_tiles,
        BM=BM, BN=BN, BLOCK=BLOCK, EXPERTS_POW2=triton.next_power_of_2(num_experts), num_warps=4)
    return table, num_tiles, max_tiles


def gathered_up_projection(x, w1, row_to_token, expert_row_offsets, expert_width_offsets, routing_weights_rows,
                           tile_table=None, *, expert_widths, out=None, persistent=False, **config):
    """(h_pre, h_act), [R, max(expert_widths)] bf16. expert_widths: the E widths as host ints (they size the grid
    and outputs without reading the device). tile_table: optional (table, num_tiles, max_tiles) from
    build_tile_table with the same BM/BN. persistent: the warp-specialised kernel (WS_CONFIG) instead."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    cfg = dict(WS_CONFIG if persistent else DEFAULT_CONFIG, **config)
    BM, BN, BK, S = cfg["BM"], cfg["BN"], cfg["BK"], cfg["NUM_STAGES"]
    assert x.dtype == torch.bfloat16 and w1.dtype == torch.bfloat16 and routing_weights_rows.dtype == torch.float32
    assert x.is_contiguous() and w1.is_contiguous() and row_to_token.is_contiguous()
    N, H = x.shape
    R = row_to_token.shape[0]
    widths = tuple(int(w) for w in expert_widths)
    max_width, total_width = max(widths), sum(widths)
    assert w1.shape == (total_width, H) and routing_weights_rows.shape == (R,)
    assert H % BK == 0, "the cp.async gather does not mask K"
    assert R < 2**31 and total_width < 2**31
    width_multiple = math.gcd(64, *widths)
    assert width_multiple % 8 == 0, "16-byte stores need widths that are multiples of 8"
    if out is None:
        alloc = torch.empty if len(set(widths)) == 1 else torch.zeros  # zeros past W_e, as the repo writes
        h_pre = alloc((R, max_width), dtype=torch.bfloat16, device=x.device)
        h_act = alloc((R, max_width), dtype=torch.bfloat16, device=x.device)
    else:
        h_pre, h_act = out
    if R == 0:
        return h_pre, h_act
    if tile_table is None:
        tile_table = build_tile_table(expert_row_offsets, expert_width_offsets, R, widths, BM, BN)
    table, num_tiles, max_tiles = tile_table
    b_desc = TensorDescriptor(w1, [total_width, H], [H, 1], [BN, BK], b_smem_layout(BN, BK))
    args = (x, row_to_token, b_desc, h_pre, h_act, routing_weights_rows, expert_row_offsets, expert_width_offsets,
            table, num_tiles, H, max_width)
    if persistent:
        grid = min(torch.cuda.get_device_properties(x.device).multi_processor_count, max_tiles)
        _gathered_up_ws_kernel[(grid,)](*args, BM=BM, BN=BN, BK=BK, NUM_STAGES=S, NUM_PROGRAMS=grid,
                                        WIDTH_MULTIPLE=width_multiple, num_warps=cfg["num_warps"])
    else:
        _gathered_up_kernel[(max_tiles,)](*args, BM=BM, BN=BN, BK=BK, NUM_STAGES=S, WIDTH_MULTIPLE=width_multiple,
                                          num_warps=cfg["num_warps"])
    return h_pre, h_act


# ------------------------------------------------------------------------------------------------------------------
# Check and benchmark (GPU)
# ------------------------------------------------------------------------------------------------------------------
def make_routing(num_tokens, hidden, expert_widths, top_k, seed=0, device="cuda", empty_expert=None):
    """x, w1, row_to_token (int64), expert_row_offsets, expert_width_offsets (int64), routing weights per sorted row."""
    g = torch.Generator(device=device).manual_seed(seed)
    E = len(expert_widths)
    x = torch.randn(num_tokens, hidden, device=device, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(sum(expert_widths), hidden, device=device, generator=g) / hidden**0.5).to(torch.bfloat16)
    logits = torch.rand(num_tokens, E, device=device, generator=g)
    if empty_expert is not None:
        logits[:, empty_expert] = -1.0
    probs, experts = logits.topk(top_k, dim=1)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_to_token = (order // top_k).to(torch.int64)
    counts = torch.bincount(flat, minlength=E)
    row_offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    row_offsets[1:] = counts.cumsum(0)
    width_offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    width_offsets[1:] = torch.tensor(expert_widths, device=device).cumsum(0)
    rw = torch.softmax(probs, dim=1).reshape(-1)[order].float().contiguous()
    return x, w1, row_to_token, row_offsets, width_offsets, rw


def reference(x, w1, row_to_token, row_offsets, width_offsets, rw, expert_widths):
    """Per-expert torch loop: fp32 h_pre, and h_act from bf16(h_pre) as the kernel."""
    R, W = row_to_token.shape[0], max(expert_widths)
    h_pre = torch.zeros(R, W, device=x.device)
    ro, wo = row_offsets.tolist(), width_offsets.tolist()
    for e in range(len(expert_widths)):
        if ro[e + 1] > ro[e]:
            a = x[row_to_token[ro[e]:ro[e + 1]]].float()
            h_pre[ro[e]:ro[e + 1], :expert_widths[e]] = a @ w1[wo[e]:wo[e + 1]].float().T
    relu = torch.relu(h_pre.to(torch.bfloat16).float())
    return h_pre, relu * relu * rw[:, None]


def _rel_l2(got, ref):
    return ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(tol=1e-2):
    cases = [("uniform", 2048, 512, [256] * 8, 2, None),
             ("ragged+empty", 1000, 256, [64, 128, 192, 256, 320, 64, 128, 512], 3, 5),
             ("64x1024 slice", 4096, 2048, [1024] * 64, 8, None)]
    ok = True
    for persistent in (False, True):
        for name, N, H, widths, k, empty in cases:
            data = make_routing(N, H, widths, k, empty_expert=empty)
            ref_pre, ref_act = reference(*data, widths)
            h_pre, h_act = gathered_up_projection(*data, expert_widths=widths, persistent=persistent)
            torch.cuda.synchronize()
            e_pre, e_act = _rel_l2(h_pre, ref_pre), _rel_l2(h_act, ref_act)
            # columns past each row's width must hold zeros (ref holds zeros there)
            good = e_pre <= tol and e_act <= tol and bool(torch.isfinite(h_pre.float()).all())
            ok &= good
            print(f"check {'ws ' if persistent else 'np '}{name:14s} h_pre rel_l2={e_pre:.2e} h_act rel_l2={e_act:.2e}"
                  f" -> {'OK' if good else 'FAIL'}")
    print("check:", "PASSED" if ok else "FAILED")
    return ok


def _time_ms(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench(num_tokens=16384, hidden=2048, num_experts=64, width=1024, top_k=8):
    from triton_moe.kernels.grouped_gemm import up_projection
    from triton_moe.kernels.layout import ExpertLayout
    widths = [width] * num_experts
    x, w1, rtt, ro, wo, rw = make_routing(num_tokens, hidden, widths, top_k)
    R = rtt.shape[0]
    flop = 2.0 * R * hidden * width
    layout = ExpertLayout(ro, wo, tuple(widths), R)
    print(f"bench: N={num_tokens} H={hidden} E={num_experts} W={width} top-{top_k}: R={R}, {flop / 1e12:.3f} TFLOP")
    results = {}
    results["repo up_projection (relu_squared + rw)"] = _time_ms(
        lambda: up_projection(x, w1, None, rtt, layout, "relu_squared", rw))
    for label, persistent, cfg in [("gluon non-persistent 128x128x64 s5", False, {}),
                                   ("gluon non-persistent 128x128x64 s4", False, dict(NUM_STAGES=4)),
                                   ("gluon non-persistent 128x256x64 s4", False, dict(BN=256, NUM_STAGES=4)),
                                   ("gluon ws persistent 128x256x64 s3", True, {})]:
        c = dict(WS_CONFIG if persistent else DEFAULT_CONFIG, **cfg)
        try:
            table = build_tile_table(ro, wo, R, widths, c["BM"], c["BN"])
            out = gathered_up_projection(x, w1, rtt, ro, wo, rw, table, expert_widths=widths,
                                         persistent=persistent, **cfg)
            results[label] = _time_ms(lambda: gathered_up_projection(x, w1, rtt, ro, wo, rw, table,
                                                                     expert_widths=widths, out=out,
                                                                     persistent=persistent, **cfg))
        except Exception as exc:  # keep benchmarking the others
            print(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    a = x[rtt]
    results["cuBLAS dense [R,H]x[H,W] (bound)"] = _time_ms(lambda: a @ w1[:width].T)
    for label, ms in results.items():
        print(f"  {label:40s} {ms:7.3f} ms  {flop / ms / 1e9:6.1f} TFLOP/s")
    return results


if __name__ == "__main__":
    if torch is None or not torch.cuda.is_available():
        print("gathered_up.py: no CUDA GPU (or no torch) here: nothing to run. Needs an sm_90 GPU and triton 3.6.")
        sys.exit(2)
    if torch.cuda.get_device_capability() != (9, 0):
        print(f"gathered_up.py: needs sm_90 (Hopper), got {torch.cuda.get_device_capability()}")
        sys.exit(2)
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}")
    passed = check()
    bench()
    sys.exit(0 if passed else 1)
