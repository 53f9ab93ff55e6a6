"""Issue 24 experiment: persistent grouped GEMM with TMA operands (device descriptors), with and without Triton's
Hopper warp specialisation, against today's kernels, at the hidden-2048 configs. Device ms from CUDA events over
back-to-back launches; correctness against today's kernel outputs.

    python3 .carry/ws_experiment.py [--configs ...]
"""
import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from harness import build_layer, make_config, triton_operands  # noqa: E402

from triton_moe import kernels  # noqa: E402

NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))


@triton.jit
def _rows_gemm_tma(a_ptr, b_ptr, out_ptr, out2_ptr, rw_ptr, rw_index_ptr, offs_ptr, woffs_ptr, table_ptr,
                   num_tiles_ptr, R, TW, H, max_width,
                   RAGGED_OUT: tl.constexpr, EPILOGUE: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
                   TK: tl.constexpr, WS: tl.constexpr, FLATTEN: tl.constexpr, GRID: tl.constexpr):
    if RAGGED_OUT:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, H], strides=[H, 1], block_shape=[TM, TK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[TW, H], strides=[H, 1], block_shape=[TN, TK])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, max_width], strides=[max_width, 1],
                                           block_shape=[TM, TK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[TW, H], strides=[H, 1], block_shape=[TK, TN])
    num_tiles = tl.load(num_tiles_ptr)
    for tile_id in tl.range(tl.program_id(0), num_tiles, GRID, warp_specialize=WS, flatten=FLATTEN):
        expert = tl.load(table_ptr + 2 * tile_id)
        first = tl.load(table_ptr + 2 * tile_id + 1)
        row_start = tl.load(offs_ptr + expert).to(tl.int32)
        num_rows = tl.load(offs_ptr + expert + 1).to(tl.int32) - row_start
        w_start = tl.load(woffs_ptr + expert).to(tl.int32)
        width = tl.load(woffs_ptr + expert + 1).to(tl.int32) - w_start
        if RAGGED_OUT:
            num_cols = width
            reduce_size = H
        else:
            num_cols = H
            reduce_size = width
        col_tiles = tl.cdiv(num_cols, TN)
        row_tile = (tile_id - first) // col_tiles
        col_tile = (tile_id - first) % col_tiles
        a_row = (row_start + row_tile * TM).to(tl.int32)
        acc = tl.zeros((TM, TN), tl.float32)
        for k in range(0, reduce_size, TK):
            a = a_desc.load([a_row, k])
            if RAGGED_OUT:
                b = b_desc.load([(w_start + col_tile * TN).to(tl.int32), k]).T
            else:
                b = b_desc.load([(w_start + k).to(tl.int32), col_tile * TN])
            acc = tl.dot(a, b, acc)
        expert_rows = row_tile * TM + tl.arange(0, TM)
        cols = col_tile * TN + tl.arange(0, TN)
        rows = row_start + expert_rows
        mask = (expert_rows < num_rows)[:, None] & (cols < num_cols)[None, :]
        if RAGGED_OUT:
            offsets = rows[:, None].to(tl.int64) * max_width + cols[None, :]
        else:
            offsets = rows[:, None].to(tl.int64) * H + cols[None, :]
        if EPILOGUE == "act_forward":
            slots = tl.load(rw_index_ptr + rows, mask=expert_rows < num_rows, other=0)
            w = tl.load(rw_ptr + slots, mask=expert_rows < num_rows, other=0.0)
            h_pre = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offsets, h_pre, mask=mask)
            h = tl.maximum(h_pre.to(tl.float32), 0.0)
            tl.store(out2_ptr + offsets, (h * h * w[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def build_table(expert_row_offsets, expert_widths, num_rows, ragged_out, hidden, tm, tn):
    """[max_tiles, 2] int32 (expert, the expert's first tile) for every tile the routing could make, and [1] int32
    the number of tiles this routing makes: device tensors from torch ops, no host read."""
    device = expert_row_offsets.device
    if ragged_out:
        counts = [triton.cdiv(w, tn) for w in expert_widths]
    else:
        counts = [triton.cdiv(hidden, tn)] * len(expert_widths)
    col_tiles = torch.tensor(counts, device=device)
    tiles = (expert_row_offsets.diff() + tm - 1) // tm * col_tiles
    ends = tiles.cumsum(0)
    max_tiles = (triton.cdiv(num_rows, tm) + len(expert_widths)) * max(counts)
    t = torch.arange(max_tiles, device=device)
    expert = torch.searchsorted(ends, t, right=True).clamp(max=len(expert_widths) - 1)
    first = ends[expert] - tiles[expert]
    return torch.stack([expert, first], 1).to(torch.int32).contiguous(), ends[-1:].to(torch.int32)


def bench(fn, warmup=3, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["h2048_128x768_top8", "h2048_64x1024_top8",
                                                          "h2048_var_32x1536_64x768_32x384_top8"])
    parser.add_argument("--variants", nargs="+", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    peak = 2 * 8192 ** 3 / bench(lambda: a @ a, 5, 20) / 1e9

    print(f"# {torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; dense peak {peak:.0f} TFLOP/s; SMs {NUM_SMS}")
    variants = []  # (name, tm, tn, tk, stages, warps, ws, flatten, grid_factor)
    for tm, tn, stages in ((128, 256, 3), (128, 128, 4), (256, 128, 3), (128, 128, 3)):
        variants.append((f"ws {tm}x{tn}x64 s{stages} w4", tm, tn, 64, stages, 4, True, False, 1))
    variants += [
        ("persistent 128x256x64 s3 w8", 128, 256, 64, 3, 8, False, False, 1),
        ("persistent flat 128x256x64 s3 w8", 128, 256, 64, 3, 8, False, True, 1),
        ("persistent 128x128x64 s4 w4 2/SM", 128, 128, 64, 4, 4, False, False, 2),
        ("persistent 128x256x64 s4 w8", 128, 256, 64, 4, 8, False, False, 1),
    ]
    if args.variants:
        variants = [v for v in variants if any(s in v[0] for s in args.variants)]
    for name in args.configs:
        config, tokens = make_config(name, "relu_squared")
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=dtype)
        layer, _ = build_layer("triton", config, dtype)
        with torch.no_grad():
            o = triton_operands(layer, x)
            layout, sort = o.layout, o.sort
            R, H = layout.num_rows, config.hidden_size
            flops = 2 * o.routed_width * H
            sorted_x = kernels.gather_rows(x, sort.row_to_token)
            sorted_grad_out = kernels.gather_rows(o.grad_out, sort.row_to_token)
            print(f"\n## {name}: R {R}, H {H}, widths {sorted(set(config.expert_widths))}, "
                  f"{flops / 1e9:.0f} GFLOP a GEMM")
            print("| GEMM | variant | ms | TFLOP/s | % peak | max abs diff vs today | bitwise |")
            print("|---|---|---:|---:|---:|---:|---|")

            def row(gemm, variant, ms, diff="", same=""):
                tf = flops / ms / 1e9
                print(f"| {gemm} | {variant} | {ms:.3f} | {tf:.0f} | {100 * tf / peak:.1f} | {diff} | {same} |",
                      flush=True)

            # today's kernels (defaults)
            ms_up = bench(lambda: kernels.up_projection(
                x, o.w1, None, sort.row_to_token, layout, "relu_squared", o.routing_weights,
                routing_weight_index=sort.row_to_flat, sorted_x=o.sorted_x))
            row("up", "today (gathered, + sorted_x copy)", ms_up)
            ms_up_nocopy = bench(lambda: kernels.up_projection(
                x, o.w1, None, sort.row_to_token, layout, "relu_squared", o.routing_weights,
                routing_weight_index=sort.row_to_flat, sorted_x=None))
            row("up", "today (gathered, no copy)", ms_up_nocopy)
            ms_gather = bench(lambda: kernels.gather_rows(x, sort.row_to_token))
            print(f"| gather x rows | gather_rows | {ms_gather:.3f} | | | | |")
            ms_down = bench(lambda: kernels.down_projection(o.h_act, o.w2, layout))
            row("down", "today", ms_down)
            ms_dx = bench(lambda: kernels.input_grad_rows(o.dh_pre, o.w1, None, None, layout))
            row("dX rows", "today", ms_dx)
            ms_da = bench(lambda: kernels.down_projection_backward(
                o.grad_out, o.w2, o.h_pre, None, sort.row_to_token, layout, o.routing_weights, "relu_squared",
                routing_weight_index=sort.row_to_flat, sorted_grad_out=o.sorted_grad_out))
            row("dA", "today (gathered, fused epilogue, + copy)", ms_da)

            ref_down = kernels.down_projection(o.h_act, o.w2, layout)
            dh_pre_zero = o.dh_pre.clone()
            if not layout.uniform:  # the padding of dh_pre is not written: zero it for the TMA K tail
                dh_pre_zero.masked_fill_(~layout.valid_columns(), 0)
            ref_dx = kernels.input_grad_rows(dh_pre_zero, o.w1, None, None, layout)
            for vname, tm, tn, tk, stages, warps, ws, flatten, grid_factor in variants:
                grid = NUM_SMS * grid_factor
                for gemm in ("down", "dX rows", "up", "dA (store only)"):
                    ragged = gemm in ("up", "dA (store only)")
                    table, num_tiles = build_table(sort.expert_row_offsets, config.expert_widths, R, ragged, H,
                                                   tm, tn)
                    if gemm == "down":
                        a_op, b_op, epi = o.h_act, o.w2, "store"
                    elif gemm == "dX rows":
                        a_op, b_op, epi = dh_pre_zero, o.w1, "store"
                    elif gemm == "up":
                        a_op, b_op, epi = sorted_x, o.w1, "act_forward"
                    else:
                        a_op, b_op, epi = sorted_grad_out, o.w2, "store"
                    out = torch.empty((R, H) if not ragged else (R, layout.max_width), device="cuda", dtype=dtype)
                    out2 = torch.empty_like(out) if epi == "act_forward" else out

                    def launch():
                        return _rows_gemm_tma[(grid,)](
                            a_op, b_op, out, out2, o.routing_weights, sort.row_to_flat, sort.expert_row_offsets,
                            layer.expert_width_offsets, table, num_tiles, R, b_op.shape[0], H, layout.max_width,
                            RAGGED_OUT=ragged, EPILOGUE=epi, TM=tm, TN=tn, TK=tk, WS=ws, FLATTEN=flatten,
                            GRID=grid, num_warps=warps, num_stages=stages)
                    try:
                        compiled = launch()
                        torch.cuda.synchronize()
                        ms = bench(launch)
                    except Exception as error:
                        print(f"| {gemm} | {vname} | {type(error).__name__}: {str(error)[:100]} | | | | |",
                              flush=True)
                        continue
                    kernel_warps = "?"
                    try:
                        kernel_warps = f"{compiled.metadata.num_warps}, ws {'warp_specialize' in compiled.asm['ttgir']}"
                        kernel_warps += f", smem {compiled.metadata.shared}, spills {compiled.n_spills}"
                    except Exception as error:
                        kernel_warps = type(error).__name__
                    if gemm == "down":
                        ref = ref_down
                    elif gemm == "dX rows":
                        ref = ref_dx
                    elif gemm == "up":
                        ref = None
                    else:
                        ref = None
                    if ref is not None:
                        diff = (out.float() - ref.float()).abs().max().item()
                        same = str(torch.equal(out, ref))
                    else:
                        valid = layout.valid_columns()
                        if gemm == "up":
                            diff = max((out.float() - o.h_pre.float()).abs()[valid].max().item(),
                                       (out2.float() - o.h_act.float()).abs()[valid].max().item())
                            same = str(torch.equal(out[valid], o.h_pre[valid]) and torch.equal(out2[valid],
                                                                                             o.h_act[valid]))
                        else:
                            diff, same = "", ""
                    row(gemm, f"{vname} (warps seen {kernel_warps})", ms, f"{diff:.3g}" if diff != "" else "",
                        same)



if __name__ == "__main__":
    main()
