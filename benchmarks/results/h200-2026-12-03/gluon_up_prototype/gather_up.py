"""Prototype: Hopper (sm_90) Gluon kernel for the MoE up projection with gathered rows.

    h_pre[r, n] = sum_k x[row_to_token[r], k] * w1[woff[e] + n, k]        for rows r of expert e, n < W_e
    h_act[r, n] = relu(acc)^2 * rw[r]  (from the fp32 accumulator; ACT_FROM_ROUNDED=True: from bf16(h_pre))
    columns >= W_e are never written.

Structure (one CTA per SM, persistent over a device-built tile table):
    tile t -> (expert, expert's first tile); local = t - first; col tiles fastest:
        row_tile = local // cdiv(W_e, BN), col_tile = local % cdiv(W_e, BN)
    gl.warp_specialize with three 4-warp partitions (12 warps, 384 threads):
      - default  : consumer warp group 0, rows [0, BM/2) of the tile: wgmma + epilogue
      - worker 0 : consumer warp group 1, rows [BM/2, BM) of the tile: wgmma + epilogue
      - worker 1 : producer: cp.async gather of the A rows (x[row_to_token[r]], two [BM/2, BK] halves per stage)
                   into an NVMMA-swizzled ring; W tile [BN, BK] by TMA (host TensorDescriptor).
    Barriers per stage s (NUM_STAGES-deep ring):
      a_ready[s]: count = producer threads (128); every producer thread does
                  cp.async.mbarrier.arrive.noinc (async_copy.mbarrier_arrive(increment_count=False)).
      b_ready[s]: count = 1; mbarrier.expect(tx bytes) + TMA copy.
      empty[s]  : count = 2 (one arrive per consumer warp group, issued after warpgroup_mma_wait shows the
                  wgmma that read the stage complete; gl mbarrier.arrive lowers to one elected thread per partition).
    Consumer: wait a_ready & b_ready, fence_async_shared (cp.async = generic proxy -> wgmma = async proxy),
    async wgmma, wait(1) (previous stage's wgmma done) -> arrive empty[previous stage].

Importable without torch (compile_check.py runs with Triton 3.6 only); the launcher needs torch + a GPU.
Triton 3.6 names are used (async_copy_global_to_shared); 3.9 renamed them (async_load), handled by getattr.
"""
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (tma, mbarrier, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.language.nvidia.ampere import async_copy

try:  # the launcher only
    import torch
except ImportError:  # compile_check.py (no torch in /tmp/v36)
    torch = None

# Triton 3.6: async_copy_global_to_shared; 3.9: async_load (the old names raise there).
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

PRODUCER_WARPS = 4  # the gather needs many threads in flight: 128 threads, 16-byte cp.async each
PRODUCER_REGS = 56  # SonicMoE's split for gathering producers (56 load / 224 MMA)
CONSUMER_REGS = 224  # worker-0 consumer; the default partition gets what remains (see compile_check output)


# ----------------------------------------------------------------------------------------------------------------
# Tile table (plain Triton): tile_table[t] = (expert, expert's first tile), num_tiles = sum_e tiles_e,
# tiles_e = cdiv(rows_e, BM) * cdiv(W_e, BN). Experts one after another; within an expert, row tiles, col tiles
# fastest (so the 132 programs running together share A row tiles and sweep the expert's weight slice in L2).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _up_tile_table_kernel(row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, num_experts, max_tiles,
                          BM: tl.constexpr, BN: tl.constexpr, BLOCK: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    experts = tl.arange(0, EXPERTS_POW2)
    is_expert = experts < num_experts
    rows = tl.load(row_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        row_offsets_ptr + experts, mask=is_expert, other=0)
    widths = tl.load(width_offsets_ptr + experts + 1, mask=is_expert, other=0) - tl.load(
        width_offsets_ptr + experts, mask=is_expert, other=0)
    tiles_per_expert = (tl.cdiv(rows, BM) * tl.cdiv(widths, BN)).to(tl.int32)  # (EXPERTS_POW2,)
    tile_ends = tl.cumsum(tiles_per_expert, 0)
    tile_ids = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    expert = tl.sum((tile_ends[None, :] <= tile_ids[:, None]).to(tl.int32), 1)  # (BLOCK,)
    first_tile = tl.sum(tl.where(experts[None, :] < expert[:, None], tiles_per_expert[None, :], 0), 1)
    in_table = tile_ids < max_tiles
    tl.store(tile_table_ptr + 2 * tile_ids, expert, mask=in_table)
    tl.store(tile_table_ptr + 2 * tile_ids + 1, first_tile, mask=in_table)
    if tl.program_id(0) == 0:
        tl.store(num_tiles_ptr, tl.sum(tiles_per_expert, 0))


# ----------------------------------------------------------------------------------------------------------------
# Gluon kernel
# ----------------------------------------------------------------------------------------------------------------
@gluon.jit
def _decode_tile(tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BM: gl.constexpr, BN: gl.constexpr,
                 WIDTH_MULTIPLE: gl.constexpr):
    """(row_start, num_rows, width_start, width, row_tile, col_tile) of tile `tile_id` (all int32)."""
    expert = gl.load(tile_table_ptr + 2 * tile_id)
    first_tile = gl.load(tile_table_ptr + 2 * tile_id + 1)
    row_start = gl.load(row_offsets_ptr + expert).to(gl.int32)
    num_rows = gl.load(row_offsets_ptr + expert + 1).to(gl.int32) - row_start
    width_start = gl.load(width_offsets_ptr + expert).to(gl.int32)
    # Every W_e is a multiple of WIDTH_MULTIPLE (the launcher's contract): without the hint the column mask
    # splits the epilogue's stores into 2-byte ones.
    width = gl.multiple_of(gl.load(width_offsets_ptr + expert + 1).to(gl.int32) - width_start, WIDTH_MULTIPLE)
    col_tiles = gl.cdiv(width, BN)
    local = tile_id - first_tile
    row_tile = local // col_tiles
    col_tile = local % col_tiles
    return row_start, num_rows, width_start, width, row_tile, col_tile


@gluon.jit
def _producer(x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
              tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr, P_WARPS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr):
    HALF: gl.constexpr = BM // 2
    # 8 bf16 = 16 B per lane: one cp.async.cg 16 B per lane and row chunk; 8 lanes span a 64-element (128 B) row.
    TPW_K: gl.constexpr = BK // 8
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [P_WARPS, 1], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, ld)
    col_l: gl.constexpr = gl.SliceLayout(0, ld)
    cols = gl.arange(0, BK, layout=col_l)
    half_rows = gl.arange(0, HALF, layout=row_l)
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    it = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BM, BN, WIDTH_MULTIPLE)
        n0 = width_start + col_tile * BN  # TMA row coordinate in w1 (int32)
        # Rows past the expert's end gather token 0 (any valid row: their outputs are masked).
        er_lo = row_tile * BM + half_rows
        er_hi = er_lo + HALF
        tok_lo = gl.load(row_to_token_ptr + row_start + er_lo, mask=er_lo < num_rows, other=0).to(gl.int64)
        tok_hi = gl.load(row_to_token_ptr + row_start + er_hi, mask=er_hi < num_rows, other=0).to(gl.int64)
        base_lo = tok_lo * H
        base_hi = tok_hi * H
        for k in range(k_tiles):
            s = it % NUM_STAGES
            ph = (it // NUM_STAGES) & 1
            # A fresh barrier passes a wait on parity 1: the first NUM_STAGES waits do not block.
            mbarrier.wait(empty.index(s), ph ^ 1)
            # W tile by TMA (one elected thread): its own barrier, count 1, completed by the tx bytes.
            mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
            _tma_load(b_desc, [n0, k * BK], b_ready.index(s), b_bufs.index(s))
            # A rows by cp.async, every producer thread; each thread's arrive fires when its copies land.
            kcols = k * BK + cols
            _cp_async(a_bufs.index(2 * s), x_ptr + base_lo[:, None] + kcols[None, :])
            _cp_async(a_bufs.index(2 * s + 1), x_ptr + base_hi[:, None] + kcols[None, :])
            async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
            it += 1


@gluon.jit
def _consumer(a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr,
              tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
              HALF_IDX: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
              NUM_STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, EPI_BLOCKED: gl.constexpr,
              ACT_FROM_ROUNDED: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr):
    HALF: gl.constexpr = BM // 2
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    # Store layout for EPI_BLOCKED: 16 B per lane along a row.
    TPW_N: gl.constexpr = 32 if BN >= 256 else BN // 8
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [4, 1], [1, 0])
    if EPI_BLOCKED:
        epi_layout: gl.constexpr = st_layout
    else:
        epi_layout: gl.constexpr = mma_layout
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    it = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BM, BN, WIDTH_MULTIPLE)
        # Row indices and routing weights before the K loop: their loads wait alongside the GEMM.
        er_m = row_tile * BM + HALF_IDX * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma_layout))
        rw = gl.load(rw_ptr + row_start + er_m, mask=er_m < num_rows, other=0.0)
        acc = gl.zeros((HALF, BN), gl.float32, layout=mma_layout)
        for k in range(k_tiles):
            s = it % NUM_STAGES
            ph = (it // NUM_STAGES) & 1
            mbarrier.wait(a_ready.index(s), ph)
            mbarrier.wait(b_ready.index(s), ph)
            # cp.async wrote through the generic proxy; wgmma reads through the async proxy.
            fence_async_shared()
            acc = warpgroup_mma(a_bufs.index(2 * s + HALF_IDX), b_bufs.index(s).permute((1, 0)), acc,
                                is_async=True)
            # <= 1 wgmma in flight: the previous step's wgmma (which read the previous stage) is complete.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES), pred=k > 0)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES))

        # Epilogue, in the wgmma layout: h_pre and h_act rounded once from fp32 (ACT_FROM_ROUNDED: h_act from the
        # rounded h_pre, as the repo's kernel does). EPI_BLOCKED: the two bf16 tiles go through shared memory
        # (convert_layout) to a layout of 16-byte stores per lane; otherwise 4-byte stores from the wgmma layout.
        h_pre = acc.to(gl.bfloat16)
        if ACT_FROM_ROUNDED:
            relu = gl.maximum(h_pre.to(gl.float32), 0.0)
        else:
            relu = gl.maximum(acc, 0.0)
        h_act = (relu * relu * rw[:, None]).to(gl.bfloat16)
        if EPI_BLOCKED:
            h_pre = gl.convert_layout(h_pre, st_layout)
            h_act = gl.convert_layout(h_act, st_layout)
        # Masked stores: rows past the expert's end and columns past W_e are not written.
        er = row_tile * BM + HALF_IDX * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, epi_layout))
        cols = col_tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, epi_layout))
        offs = (row_start + er)[:, None].to(gl.int64) * max_width + cols[None, :]
        mask = (er < num_rows)[:, None] & (cols < width)[None, :]
        gl.store(h_pre_ptr + offs, h_pre, mask=mask)
        gl.store(h_act_ptr + offs, h_act, mask=mask)


@gluon.jit
def gluon_up_kernel(x_ptr, row_to_token_ptr, b_desc, h_pre_ptr, h_act_ptr, rw_ptr,
                    row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, H, max_width,
                    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                    NUM_PROGRAMS: gl.constexpr, EPI_BLOCKED: gl.constexpr, ACT_FROM_ROUNDED: gl.constexpr,
                    P_WARPS: gl.constexpr, P_REGS: gl.constexpr, C_REGS: gl.constexpr,
                    WIDTH_MULTIPLE: gl.constexpr):
    gl.static_assert(BM == 128, "two consumer warp groups of 64 rows each")
    gl.static_assert(b_desc.block_type.shape[0] == BN)
    gl.static_assert(b_desc.block_type.shape[1] == BK)
    HALF: gl.constexpr = BM // 2
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BK], gl.bfloat16)
    # A ring: stage s holds halves 2s (rows 0:64, consumer 0) and 2s+1 (rows 64:128, consumer 1).
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [2 * NUM_STAGES, HALF, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BN, BK], b_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(a_ready.index(i), count=P_WARPS * 32)  # every producer thread arrives (noinc)
        mbarrier.init(b_ready.index(i), count=1)  # expect_tx arrival + TMA bytes
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
    gl.warp_specialize([
        (_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr,
                     tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                     0, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, EPI_BLOCKED, ACT_FROM_ROUNDED, WIDTH_MULTIPLE)),
        (_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, h_pre_ptr, h_act_ptr, rw_ptr,
                     tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                     1, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, EPI_BLOCKED, ACT_FROM_ROUNDED, WIDTH_MULTIPLE)),
        (_producer, (x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                     tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H,
                     BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, P_WARPS, WIDTH_MULTIPLE)),
    ], [4, P_WARPS], [C_REGS, P_REGS])


# ----------------------------------------------------------------------------------------------------------------
# Host side (torch)
# ----------------------------------------------------------------------------------------------------------------
DEFAULT_CONFIG = dict(BM=128, BN=256, BK=64, NUM_STAGES=3, EPI_BLOCKED=False, ACT_FROM_ROUNDED=False)


def b_smem_layout(BN, BK):
    return gl.NVMMASharedLayout.get_default_for([BN, BK], gl.bfloat16)


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def build_tile_table(expert_row_offsets, expert_width_offsets, num_rows, max_width, BM, BN):
    """Device tile table ([max_tiles, 2] int32) and num_tiles ([1] int32), no host sync."""
    num_experts = expert_row_offsets.numel() - 1
    max_tiles = (triton.cdiv(num_rows, BM) + num_experts) * triton.cdiv(max_width, BN)
    dev = expert_row_offsets.device
    tile_table = torch.empty((max_tiles, 2), dtype=torch.int32, device=dev)
    num_tiles = torch.empty(1, dtype=torch.int32, device=dev)
    BLOCK = 256
    _up_tile_table_kernel[(triton.cdiv(max_tiles, BLOCK),)](
        expert_row_offsets, expert_width_offsets, tile_table, num_tiles, num_experts, max_tiles,
        BM=BM, BN=BN, BLOCK=BLOCK, EXPERTS_POW2=_next_pow2(num_experts), num_warps=4)
    return tile_table, num_tiles, max_tiles


def build_tile_table_torch(expert_row_offsets, expert_width_offsets, BM, BN):
    """Reference tile table in torch (host sync; for tests)."""
    rows = (expert_row_offsets[1:] - expert_row_offsets[:-1]).cpu()
    widths = (expert_width_offsets[1:] - expert_width_offsets[:-1]).cpu()
    entries = []
    first = 0
    for e in range(rows.numel()):
        n = ((int(rows[e]) + BM - 1) // BM) * ((int(widths[e]) + BN - 1) // BN)
        entries += [(e, first)] * n
        first += n
    table = torch.tensor(entries if entries else [(0, 0)], dtype=torch.int32).reshape(-1, 2)
    return table.to(expert_row_offsets.device), torch.tensor([first], dtype=torch.int32,
                                                              device=expert_row_offsets.device)


_NUM_SMS = {}


def _num_sms(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def gluon_up(x, w1, row_to_token, expert_row_offsets, expert_width_offsets, routing_weights, max_width, *,
             out=None, tile_table=None, num_programs=None, width_multiple=64, **config):
    """(h_pre, h_act), each [R, max_width] bf16 (see the module docstring). `out`: optional preallocated
    (h_pre, h_act) (columns >= W_e are left as they were). `tile_table`: optional (table, num_tiles, max_tiles).
    config overrides DEFAULT_CONFIG (BM, BN, BK, NUM_STAGES, EPI_BLOCKED, ACT_FROM_ROUNDED).
    width_multiple: every expert width is a multiple of it (not checked here: that would read the device; a
    power of two in [1, 64]; 16 or more gives vector stores)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    cfg = dict(DEFAULT_CONFIG, **config)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    assert x.dtype == torch.bfloat16 and w1.dtype == torch.bfloat16
    assert x.is_contiguous() and w1.is_contiguous() and row_to_token.is_contiguous()
    N, H = x.shape
    TW = w1.shape[0]
    R = row_to_token.shape[0]
    assert w1.shape[1] == H
    assert H % BK == 0, "the cp.async gather does not mask K: H must be a multiple of BK"
    assert (max_width * 2) % 16 == 0
    assert routing_weights.dtype == torch.float32 and routing_weights.shape == (R,)
    if out is None:
        h_pre = torch.empty((R, max_width), dtype=torch.bfloat16, device=x.device)
        h_act = torch.empty((R, max_width), dtype=torch.bfloat16, device=x.device)
    else:
        h_pre, h_act = out
    if R == 0:
        return h_pre, h_act
    if tile_table is None:
        tile_table = build_tile_table(expert_row_offsets, expert_width_offsets, R, max_width, BM, BN)
    table, num_tiles, max_tiles = tile_table
    b_desc = TensorDescriptor(w1, [TW, H], [H, 1], [BN, BK], b_smem_layout(BN, BK))
    grid = min(num_programs or _num_sms(x.device), max_tiles)
    gluon_up_kernel[(grid,)](
        x, row_to_token, b_desc, h_pre, h_act, routing_weights,
        expert_row_offsets, expert_width_offsets, table, num_tiles, H, max_width,
        BM=BM, BN=BN, BK=BK, NUM_STAGES=cfg["NUM_STAGES"], NUM_PROGRAMS=grid,
        EPI_BLOCKED=cfg["EPI_BLOCKED"], ACT_FROM_ROUNDED=cfg["ACT_FROM_ROUNDED"],
        P_WARPS=PRODUCER_WARPS, P_REGS=PRODUCER_REGS, C_REGS=CONSUMER_REGS, WIDTH_MULTIPLE=width_multiple,
        num_warps=4)
    return h_pre, h_act
