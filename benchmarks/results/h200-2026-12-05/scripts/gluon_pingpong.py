"""Session 26: a ping-pong variant of session 21's persistent, warp-specialised Gluon up projection
(`gathered_up.py`, beside this file: its tile table, tile decoding, data, reference and timing are reused).

gathered_up.py's persistent kernel is cooperative: its two consumer warp groups split each 128-row tile, so both
run their epilogue (two stores of the activation tiles) at once and the tensor cores idle meanwhile. Here each
consumer warp group takes whole tiles, the program's tiles in turn (consumer 0 the even ones, consumer 1 the odd
ones). One producer warp group fills a single ring of stages in tile order (x rows by cp.async, weight rows by TMA);
the consumers take the ring in that order, handing it over by a turn barrier after each tile's main loop, so that
one consumer's epilogue runs while the other's MMAs run. The turn barriers also keep a consumer from waiting on a
stage's barrier more than one phase ahead (an mbarrier wait only sees the phase's parity).

Session 27 added the row copy the layer needs for large problems (ROW_COPY: the producer also writes the gathered
rows of an expert's first column tile into sorted_x) and a second epilogue, dA of relu² (EPILOGUE="dA"), with their
checks (against the copy-less run and against the portable down_projection_backward) and their timings beside the
portable kernels with their copies.

    PYTHONPATH=$PWD python3 benchmarks/results/h200-2026-12-05/scripts/gluon_pingpong.py      (GPU: check + bench)
    [EPILOGUE=dA] [ROW_COPY=1] /tmp/v36/bin/python benchmarks/results/h200-2026-12-05/scripts/gluon_pingpong.py \
        --compile                                                                            (sm_90, no GPU)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gathered_up import (_cp_async, _decode_tile, _rel_l2, _time_ms, _tma_load, async_copy, b_smem_layout,  # noqa
                         build_tile_table, fence_async_shared, gathered_up_projection, gl, gluon, make_routing,
                         mbarrier, reference, torch, warpgroup_mma, warpgroup_mma_wait)

P_WARPS = 4  # the producer's warps


@gluon.jit
def _pp_producer(x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                 tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, sorted_x_ptr,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                 NUM_PROGRAMS: gl.constexpr, P_WARPS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr,
                 ROW_COPY: gl.constexpr):
    """Every tile of this program in order: per K step, wait for the stage to be free, then the weight tile by TMA
    and the gathered x rows by cp.async (each producer thread arrives on a_ready when its copies land). ROW_COPY
    (session 27): on an expert's first column tile, also the K step's gathered rows into sorted_x, in chunks of
    rows through registers (loads that hit L2 behind the cp.async), masked to the expert's rows; no barrier."""
    TPW_K: gl.constexpr = BK // 8
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [P_WARPS, 1], [1, 0])
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, ld))
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
    CHUNK: gl.constexpr = (32 // TPW_K) * P_WARPS  # rows a copy chunk takes: one 16-byte vector a thread
    chunk_rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, ld))
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    it = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN, WIDTH_MULTIPLE)
        n0 = width_start + col_tile * BN
        expert_rows = row_tile * BM + tile_rows
        base = gl.load(row_to_token_ptr + row_start + expert_rows, mask=expert_rows < num_rows,
                       other=0).to(gl.int64) * H
        for k in range(k_tiles):
            s = it % NUM_STAGES
            mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
            _tma_load(b_desc, [n0, k * BK], b_ready.index(s), b_bufs.index(s))
            _cp_async(a_bufs.index(s), x_ptr + base[:, None] + (k * BK + cols)[None, :])
            async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
            if ROW_COPY:
                if col_tile == 0:
                    for c in gl.static_range(BM // CHUNK):
                        rows = row_tile * BM + c * CHUNK + chunk_rows
                        in_expert = rows < num_rows
                        tokens = gl.load(row_to_token_ptr + row_start + rows, mask=in_expert, other=0).to(gl.int64)
                        values = gl.load(x_ptr + tokens[:, None] * H + (k * BK + cols)[None, :],
                                         mask=in_expert[:, None])
                        gl.store(sorted_x_ptr + (row_start + rows)[:, None].to(gl.int64) * H
                                 + (k * BK + cols)[None, :], values, mask=in_expert[:, None])
            it += 1


@gluon.jit
def _pp_consumer(a_bufs, b_bufs, a_ready, b_ready, empty, turn, out_ptr, out2_ptr, rw_ptr, h_in_ptr, partials_ptr,
                 tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width, partial_tiles,
                 CONSUMER: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 NUM_STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr,
                 EPILOGUE: gl.constexpr):
    """Tiles CONSUMER, CONSUMER + 2, ... of this program: wait for the turn, the main loop over the ring, hand the
    turn to the other consumer, then the epilogue. EPILOGUE "up": h_pre into out and h_act = relu(h_pre)² · routing
    weight into out2. "dA" (session 27, the down projection's backward, A = grad_out's rows, B = w2): with dA
    rounded to bf16 and h_pre read from h_in, the row's partial sum of dA · relu(h_pre)² into partials[row,
    col_tile] and dh_pre = (dA · routing weight) · 2 relu(h_pre) into out, in the portable kernel's order."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    TPW_N: gl.constexpr = 32 if BN >= 256 else BN // 8
    st: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [4, 1], [1, 0])
    num_tiles = gl.load(num_tiles_ptr)
    k_tiles = gl.cdiv(H, BK)
    j = 0  # this consumer's tile count
    for tile_id in range(gl.program_id(0) + CONSUMER * NUM_PROGRAMS, num_tiles, 2 * NUM_PROGRAMS):
        row_start, num_rows, width_start, width, row_tile, col_tile = _decode_tile(
            tile_id, tile_table_ptr, row_offsets_ptr, width_offsets_ptr, BN, WIDTH_MULTIPLE)
        er_m = row_tile * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
        rw = gl.load(rw_ptr + row_start + er_m, mask=er_m < num_rows, other=0.0)
        # consumer 0's tile j follows consumer 1's tile j - 1; consumer 1's tile j follows consumer 0's tile j
        if CONSUMER == 0:
            mbarrier.wait(turn.index(0), (j & 1) ^ 1)
        else:
            mbarrier.wait(turn.index(1), j & 1)
        it = (2 * j + CONSUMER) * k_tiles  # the ring position of this tile's first K step
        acc = gl.zeros((BM, BN), gl.float32, layout=mma_layout)
        for k in range(k_tiles):
            s = it % NUM_STAGES
            ph = (it // NUM_STAGES) & 1
            mbarrier.wait(a_ready.index(s), ph)
            mbarrier.wait(b_ready.index(s), ph)
            fence_async_shared()  # cp.async (generic proxy) -> wgmma (async proxy)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES), pred=k > 0)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES))
        mbarrier.arrive(turn.index(1 - CONSUMER))
        er = row_tile * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, st))
        cols = col_tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, st))
        offs = (row_start + er)[:, None].to(gl.int64) * max_width + cols[None, :]
        mask = (er < num_rows)[:, None] & (cols < width)[None, :]
        if EPILOGUE == "up":
            h_pre = acc.to(gl.bfloat16)
            relu = gl.maximum(h_pre.to(gl.float32), 0.0)
            h_act = gl.convert_layout((relu * relu * rw[:, None]).to(gl.bfloat16), st)
            h_pre = gl.convert_layout(h_pre, st)
            gl.store(out_ptr + offs, h_pre, mask=mask)
            gl.store(out2_ptr + offs, h_act, mask=mask)
        else:
            d_act = gl.convert_layout(acc.to(gl.bfloat16), st).to(gl.float32)  # rounded as stored
            h_pre = gl.load(h_in_ptr + offs, mask=mask, other=0.0).to(gl.float32)
            relu = gl.maximum(h_pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
            partial = gl.sum(gl.where(mask, d_act * (relu * relu), 0.0), axis=1)  # (BM,)
            gl.store(partials_ptr + (row_start + er).to(gl.int64) * partial_tiles + col_tile, partial,
                     mask=er < num_rows)
            rw_st = gl.convert_layout(rw, gl.SliceLayout(1, st))
            gl.store(out_ptr + offs, ((d_act * rw_st[:, None]) * (2.0 * relu)).to(gl.bfloat16), mask=mask)
        j += 1


@gluon.jit
def _pingpong_kernel(x_ptr, row_to_token_ptr, b_desc, out_ptr, out2_ptr, rw_ptr, h_in_ptr, partials_ptr,
                     row_offsets_ptr, width_offsets_ptr, tile_table_ptr, num_tiles_ptr, H, max_width, sorted_x_ptr,
                     partial_tiles, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NUM_STAGES: gl.constexpr,
                     NUM_PROGRAMS: gl.constexpr, WIDTH_MULTIPLE: gl.constexpr, ROW_COPY: gl.constexpr,
                     EPILOGUE: gl.constexpr):
    """The up projection (EPILOGUE "up": x, w1) or dA (EPILOGUE "dA": grad_out, w2) over gathered rows."""
    P_WARPS: gl.constexpr = 4
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BN, BK], b_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(a_ready.index(i), count=P_WARPS * 32)  # every producer thread arrives (noinc)
        mbarrier.init(b_ready.index(i), count=1)  # expect_tx + TMA bytes
        mbarrier.init(empty.index(i), count=1)  # one consumer partition uses each stage
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    gl.warp_specialize([
        (_pp_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, turn, out_ptr, out2_ptr, rw_ptr, h_in_ptr,
                        partials_ptr, tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                        partial_tiles, 0, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, WIDTH_MULTIPLE, EPILOGUE)),
        (_pp_consumer, (a_bufs, b_bufs, a_ready, b_ready, empty, turn, out_ptr, out2_ptr, rw_ptr, h_in_ptr,
                        partials_ptr, tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, max_width,
                        partial_tiles, 1, BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, WIDTH_MULTIPLE, EPILOGUE)),
        (_pp_producer, (x_ptr, row_to_token_ptr, b_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                        tile_table_ptr, num_tiles_ptr, row_offsets_ptr, width_offsets_ptr, H, sorted_x_ptr,
                        BM, BN, BK, NUM_STAGES, NUM_PROGRAMS, P_WARPS, WIDTH_MULTIPLE, ROW_COPY)),
    ], [4, P_WARPS], [232, 40])  # 3.6: worker_num_regs is required


CONFIGS = {"pp 64x256x64 s4": dict(BM=64, BN=256, BK=64, NUM_STAGES=4),
           "pp 64x256x64 s3": dict(BM=64, BN=256, BK=64, NUM_STAGES=3),
           "pp 128x128x64 s4": dict(BM=128, BN=128, BK=64, NUM_STAGES=4),
           "pp 128x128x64 s5": dict(BM=128, BN=128, BK=64, NUM_STAGES=5)}


def _launch(a, w, row_to_token, row_offsets, width_offsets, rw, tile_table, *, expert_widths, BM, BN, BK,
            NUM_STAGES, epilogue, out, out2=None, h_in=None, partials=None, sorted_rows=None):
    from math import gcd

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    H, widths = a.shape[1], tuple(expert_widths)
    table, num_tiles, max_tiles = tile_table
    b_desc = TensorDescriptor(w, [sum(widths), H], [H, 1], [BN, BK], b_smem_layout(BN, BK))
    grid = min(torch.cuda.get_device_properties(a.device).multi_processor_count, max_tiles)
    _pingpong_kernel[(grid,)](a, row_to_token, b_desc, out, out if out2 is None else out2, rw,
                              out if h_in is None else h_in, rw if partials is None else partials, row_offsets,
                              width_offsets, table, num_tiles, H, max(widths),
                              a if sorted_rows is None else sorted_rows,
                              0 if partials is None else partials.shape[1], BM=BM, BN=BN, BK=BK,
                              NUM_STAGES=NUM_STAGES, NUM_PROGRAMS=grid, WIDTH_MULTIPLE=gcd(64, *widths),
                              ROW_COPY=sorted_rows is not None, EPILOGUE=epilogue, num_warps=4)


def pingpong_up(x, w1, row_to_token, row_offsets, width_offsets, rw, tile_table, out, *, expert_widths,
                BM, BN, BK, NUM_STAGES, sorted_x=None):
    """(h_pre, h_act) into out, as gathered_up_projection (its checks done by the caller's first call of it);
    given sorted_x [R, H], also the gathered rows into it."""
    h_pre, h_act = out
    _launch(x, w1, row_to_token, row_offsets, width_offsets, rw, tile_table, expert_widths=expert_widths, BM=BM,
            BN=BN, BK=BK, NUM_STAGES=NUM_STAGES, epilogue="up", out=h_pre, out2=h_act, sorted_rows=sorted_x)
    return h_pre, h_act


def pingpong_dA(grad_out, w2, h_pre, row_to_token, row_offsets, width_offsets, rw, tile_table, dh_pre, partials, *,
                expert_widths, BM, BN, BK, NUM_STAGES, sorted_grad_out=None):
    """Session 27: (dh_pre, d_rw) of relu², as the portable kernel's fused dA epilogue, the routing weights and
    their gradient per sorted row; partials [R, column tiles of BN] fp32, summed here."""
    _launch(grad_out, w2, row_to_token, row_offsets, width_offsets, rw, tile_table, expert_widths=expert_widths,
            BM=BM, BN=BN, BK=BK, NUM_STAGES=NUM_STAGES, epilogue="dA", out=dh_pre, h_in=h_pre, partials=partials,
            sorted_rows=sorted_grad_out)
    return dh_pre, partials.sum(1)


def check_and_bench(num_tokens=16384, hidden=2048, num_experts=64, width=1024, top_k=8):
    cases = [("uniform", 2048, 512, [256] * 8, 2, None),
             ("ragged+empty", 1000, 256, [64, 128, 192, 256, 320, 64, 128, 512], 3, 5),
             ("64x1024 slice", 4096, 2048, [1024] * 64, 8, None)]
    for label, cfg in CONFIGS.items():
        for name, N, H, widths, k, empty in cases:
            data = make_routing(N, H, widths, k, empty_expert=empty)
            ref_pre, ref_act = reference(*data, widths)
            try:
                alloc = torch.empty if len(set(widths)) == 1 else torch.zeros
                out = tuple(alloc((data[2].shape[0], max(widths)), dtype=torch.bfloat16, device="cuda")
                            for _ in range(2))
                table = build_tile_table(data[3], data[4], data[2].shape[0], widths, cfg["BM"], cfg["BN"])
                # the cooperative kernel's result, against which this one must be equal bit for bit
                coop = gathered_up_projection(*data, expert_widths=widths, persistent=True)
                h_pre, h_act = pingpong_up(*data, table, out, expert_widths=widths, **cfg)
                torch.cuda.synchronize()
                e_pre, e_act = _rel_l2(h_pre, ref_pre), _rel_l2(h_act, ref_act)
                same = torch.equal(h_pre, coop[0]) and torch.equal(h_act, coop[1])
                print(f"check {label:18s} {name:14s} h_pre rel_l2={e_pre:.2e} h_act rel_l2={e_act:.2e} "
                      f"equal to the cooperative kernel's: {same}", flush=True)
                # with the row copy (session 27): the same h_pre and h_act, and sorted_x == x[row_to_token]
                sorted_x = torch.full((data[2].shape[0], H), float("nan"), dtype=torch.bfloat16, device="cuda")
                copied = tuple(torch.empty_like(o) for o in out) if alloc is torch.empty else tuple(
                    torch.zeros_like(o) for o in out)
                pingpong_up(*data, table, copied, expert_widths=widths, sorted_x=sorted_x, **cfg)
                torch.cuda.synchronize()
                print(f"check {label + ' +copy':18s} {name:14s} h_pre, h_act equal without the copy: "
                      f"{torch.equal(copied[0], h_pre) and torch.equal(copied[1], h_act)}; sorted_x equal to "
                      f"x[row_to_token]: {torch.equal(sorted_x, data[0][data[2]])}", flush=True)
            except Exception as exc:
                print(f"check {label} {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                continue
            if len(set(widths)) == 1:  # dA (session 27), one width: against the portable kernel
                try:
                    check_dA(label, name, cfg, data, widths, h_pre, table)
                except Exception as exc:
                    print(f"check {label} dA {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    from triton_moe.kernels.grouped_gemm import down_projection_backward, up_projection
    from triton_moe.kernels.layout import ExpertLayout
    widths = [width] * num_experts
    x, w1, rtt, ro, wo, rw = make_routing(num_tokens, hidden, widths, top_k)
    R = rtt.shape[0]
    flop = 2.0 * R * hidden * width
    layout = ExpertLayout(ro, wo, tuple(widths), R)
    print(f"bench: N={num_tokens} H={hidden} E={num_experts} W={width} top-{top_k}: R={R}, {flop / 1e12:.3f} TFLOP",
          flush=True)
    out = tuple(torch.empty((R, width), dtype=torch.bfloat16, device="cuda") for _ in range(2))
    runs = {"repo up_projection (portable, no row copy)": lambda: up_projection(x, w1, None, rtt, layout,
                                                                                  "relu_squared", rw)}
    coop_table = build_tile_table(ro, wo, R, widths, 128, 256)
    runs["gluon cooperative ws 128x256x64 s3"] = lambda: gathered_up_projection(
        x, w1, rtt, ro, wo, rw, coop_table, expert_widths=widths, out=out, persistent=True)
    sorted_x = torch.empty((R, hidden), dtype=torch.bfloat16, device="cuda")
    runs["repo up_projection (portable, with row copy)"] = lambda: up_projection(x, w1, None, rtt, layout,
                                                                                   "relu_squared", rw,
                                                                                   sorted_x=sorted_x)
    for label, cfg in CONFIGS.items():
        table = build_tile_table(ro, wo, R, widths, cfg["BM"], cfg["BN"])
        runs[f"gluon {label}"] = (lambda t, c: lambda: pingpong_up(x, w1, rtt, ro, wo, rw, t, out,
                                                                   expert_widths=widths, **c))(table, cfg)
        runs[f"gluon {label} +row copy"] = (lambda t, c: lambda: pingpong_up(
            x, w1, rtt, ro, wo, rw, t, out, expert_widths=widths, sorted_x=sorted_x, **c))(table, cfg)
    a = x[rtt]
    runs["cuBLAS dense [R,H]x[H,W] (bound)"] = lambda: a @ w1[:width].T
    # dA (session 27): the same FLOPs; the portable kernel with its fused epilogue and its row copy, as the layer
    grad_out, w2 = torch.randn_like(x), torch.randn_like(w1) / hidden**0.5
    h_pre = up_projection(x, w1, None, rtt, layout, "relu_squared", rw)[0]
    dh_pre = torch.empty_like(h_pre)
    sorted_grad_out = torch.empty((R, hidden), dtype=torch.bfloat16, device="cuda")
    runs["repo dA (portable, fused epilogue, row copy)"] = lambda: down_projection_backward(
        grad_out, w2, h_pre, None, rtt, layout, rw, "relu_squared", sorted_grad_out=sorted_grad_out)
    for label, cfg in CONFIGS.items():
        table = build_tile_table(ro, wo, R, widths, cfg["BM"], cfg["BN"])
        partials = torch.empty((R, triton.cdiv(width, cfg["BN"])), dtype=torch.float32, device="cuda")
        runs[f"gluon dA {label} +row copy"] = (lambda t, c, p: lambda: pingpong_dA(
            grad_out, w2, h_pre, rtt, ro, wo, rw, t, dh_pre, p, expert_widths=widths, sorted_grad_out=sorted_grad_out,
            **c))(table, cfg, partials)
    for _ in range(2):  # two rounds: the spread between them
        for label, fn in runs.items():
            try:
                ms = _time_ms(fn)
                print(f"  {label:44s} {ms:7.3f} ms  {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)
            except Exception as exc:
                print(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def check_dA(label, name, cfg, data, widths, h_pre, table):
    """The ping-pong dA with its row copy against the portable kernel (down_projection_backward) on the same
    operands: dh_pre bit for bit (the same K order; the same dA rounding and epilogue order), the routing weights'
    gradient within rounding (partial sums over other column tiles), and sorted_grad_out == grad_out[row_to_token]."""
    from triton_moe.kernels.grouped_gemm import down_projection_backward
    from triton_moe.kernels.layout import ExpertLayout
    x, w1, rtt, ro, wo, rw = data
    R, H = rtt.shape[0], x.shape[1]
    g = torch.Generator(device="cuda").manual_seed(1)
    grad_out = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
    w2 = (torch.randn(w1.shape, device="cuda", generator=g) / H**0.5).to(torch.bfloat16)
    layout = ExpertLayout(ro, wo, tuple(widths), R)
    want_dh, _, want_drw = down_projection_backward(grad_out, w2, h_pre, None, rtt, layout, rw, "relu_squared")
    partials = torch.empty((R, triton.cdiv(max(widths), cfg["BN"])), dtype=torch.float32, device="cuda")
    sorted_grad_out = torch.full((R, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    dh, drw = pingpong_dA(grad_out, w2, h_pre, rtt, ro, wo, rw, table, torch.empty_like(h_pre), partials,
                          expert_widths=widths, sorted_grad_out=sorted_grad_out, **cfg)
    torch.cuda.synchronize()
    print(f"check {label + ' dA':18s} {name:14s} dh_pre equal to the portable kernel's: {torch.equal(dh, want_dh)} "
          f"(rel_l2 {_rel_l2(dh, want_dh):.2e}); d_rw rel_l2 {_rel_l2(drw, want_drw):.2e}; sorted_grad_out equal "
          f"to grad_out[row_to_token]: {torch.equal(sorted_grad_out, grad_out[rtt])}", flush=True)


def compile_only():
    """Compile every config for sm_90 without a GPU: shared memory, registers and spills from ptxas."""
    import re
    import subprocess
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    os.environ["TRITON_INTERPRET"] = "0"
    for label, cfg in CONFIGS.items():
        BM, BN, BK, S = cfg["BM"], cfg["BN"], cfg["BK"], cfg["NUM_STAGES"]
        sig = dict(x_ptr="*bf16", row_to_token_ptr="*i64",
                   b_desc=f"tensordesc<bf16[{BN},{BK}],{b_smem_layout(BN, BK)!r}>", out_ptr="*bf16",
                   out2_ptr="*bf16", rw_ptr="*fp32", h_in_ptr="*bf16", partials_ptr="*fp32",
                   row_offsets_ptr="*i64", width_offsets_ptr="*i64", tile_table_ptr="*i32", num_tiles_ptr="*i32",
                   H="i32", max_width="i32", sorted_x_ptr="*bf16", partial_tiles="i32")
        epilogue = os.environ.get("EPILOGUE", "up")
        label = f"{label} {epilogue}"
        constexprs = dict(BM=BM, BN=BN, BK=BK, NUM_STAGES=S, NUM_PROGRAMS=132, WIDTH_MULTIPLE=64,
                          ROW_COPY=os.environ.get("ROW_COPY") == "1", EPILOGUE=epilogue)
        sig.update({c: "constexpr" for c in constexprs})
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names[:15] if n != "b_desc"}
        try:
            kernel = triton.compile(GluonASTSource(_pingpong_kernel, sig, constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        except Exception as exc:
            print(f"{label}: COMPILE FAILED {type(exc).__name__}: {str(exc)[:1500]}")
            continue
        ptx = kernel.asm["ptx"]
        path = f"/tmp/pingpong_{BM}x{BN}_s{S}.ptx"
        open(path, "w").write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        result = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path[:-4] + ".cubin"],
                                capture_output=True, text=True)
        text = result.stdout + result.stderr
        print(f"{label}: smem={kernel.metadata.shared} wgmma={ptx.count('wgmma.mma_async')} "
              f"shapes={sorted(set(re.findall(r'wgmma.mma_async.sync.aligned.(m[0-9]+n[0-9]+k[0-9]+)', ptx)))} "
              f"regs={re.findall(r'Used ([0-9]+) registers', text)} "
              f"spills={re.findall(r'([0-9]+) bytes spill stores', text)} rc={result.returncode}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile"]:
        compile_only()
    elif torch is None or not torch.cuda.is_available():
        print("gluon_pingpong.py: no CUDA GPU here; --compile checks the kernels for sm_90")
    else:
        print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
        check_and_bench()
