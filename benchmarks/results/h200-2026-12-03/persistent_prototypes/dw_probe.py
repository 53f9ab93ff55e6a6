import os
os.environ["TRITON_INTERPRET"] = os.environ.get("INTERP", "0")
import triton, triton.language as tl


@triton.jit
def _persistent_weight_grad(a_ptr, a2_ptr, b_ptr, out_ptr, out2_ptr, offs_ptr, woffs_ptr, table_ptr, num_tiles,
                            hidden, max_width, SECOND: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
                            TK: tl.constexpr, GRID: tl.constexpr, WS: tl.constexpr):
    for tile_id in tl.range(tl.program_id(0), num_tiles, GRID, warp_specialize=WS):
        expert = tl.load(table_ptr + 2 * tile_id)
        first = tl.load(table_ptr + 2 * tile_id + 1)
        row_start = tl.load(offs_ptr + expert).to(tl.int32)
        row_end = tl.load(offs_ptr + expert + 1).to(tl.int32)
        w_start = tl.load(woffs_ptr + expert).to(tl.int32)
        width = tl.load(woffs_ptr + expert + 1).to(tl.int32) - w_start
        width_tiles = tl.cdiv(width, TM)
        width_tile = (tile_id - first) % width_tiles
        hidden_tile = (tile_id - first) // width_tiles
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[row_end, max_width], strides=[max_width, 1], block_shape=[TK, TM])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[row_end, hidden], strides=[hidden, 1], block_shape=[TK, TN])
        if SECOND:
            a2_desc = tl.make_tensor_descriptor(a2_ptr, shape=[row_end, max_width], strides=[max_width, 1], block_shape=[TK, TM])
        acc = tl.zeros((TM, TN), tl.float32)
        acc2 = tl.zeros((TM, TN), tl.float32)
        for k in range(row_start, row_end, TK):
            b = b_desc.load([k, hidden_tile * TN])
            acc = tl.dot(a_desc.load([k, width_tile * TM]).T, b, acc)
            if SECOND:
                acc2 = tl.dot(a2_desc.load([k, width_tile * TM]).T, b, acc2)
        ms = width_tile * TM + tl.arange(0, TM)
        ns = hidden_tile * TN + tl.arange(0, TN)
        offsets = (w_start + ms)[:, None].to(tl.int64) * hidden + ns[None, :]
        mask = (ms < width)[:, None] & (ns < hidden)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if SECOND:
            tl.store(out2_ptr + offsets, acc2.to(out_ptr.dtype.element_ty), mask=mask)


if __name__ == "__main__" and os.environ["TRITON_INTERPRET"] == "0":
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(a_ptr="*bf16", a2_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", out2_ptr="*bf16", offs_ptr="*i32",
               woffs_ptr="*i64", table_ptr="*i32", num_tiles="i32", hidden="i32", max_width="i32")
    for tm, tn, st in ((128, 256, 3), (128, 128, 4), (256, 128, 3), (128, 128, 3)):
        for second in (False, True):
            for ws in (True, False):
                consts = dict(SECOND=second, TM=tm, TN=tn, TK=64, GRID=132, WS=ws)
                s = dict(sig); s.update({k: "constexpr" for k in consts})
                try:
                    k = triton.compile(ASTSource(_persistent_weight_grad, signature=s, constexprs=consts),
                                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4 if ws else 8, num_stages=st))
                    t = k.asm["ttgir"]; p = k.asm["ptx"]
                    print(tm, tn, st, second, ws, "ok warps", k.metadata.num_warps, "smem", k.metadata.shared,
                          "ws", t.count("ttg.warp_specialize("), "wgmma", p.count("wgmma.mma_async"),
                          "tensormap", p.count("tensormap"), flush=True)
                except Exception as e:
                    print(tm, tn, st, second, ws, "FAILED", str(e).strip().splitlines()[-1][:200], flush=True)
