"""Issue 24 experiment: the weight gradients (dW2, dW1) in a persistent kernel, both operands by TMA through per-expert
device descriptors (rows past the expert read as zeros), with and without warp specialisation, against today's."""
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
sys.path.insert(0, os.path.join(os.getcwd(), ".carry"))
from harness import build_layer, make_config, triton_operands  # noqa: E402
from dw_probe import _persistent_weight_grad  # noqa: E402

from triton_moe import kernels  # noqa: E402

NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count
triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))


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


def table_for(widths, hidden, tm, tn):
    rows, first = [], 0
    for e, w in enumerate(widths):
        t = triton.cdiv(w, tm) * triton.cdiv(hidden, tn)
        rows += [[e, first]] * t
        first += t
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


def main():
    dtype = torch.bfloat16
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    peak = 2 * 8192 ** 3 / bench(lambda: a @ a, 5, 20) / 1e9
    print(f"# {torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; dense peak {peak:.0f} TFLOP/s; SMs {NUM_SMS}")
    variants = [("ws 128x256x64 s3 w4", 128, 256, 3, 4, True), ("ws 128x128x64 s4 w4", 128, 128, 4, 4, True),
                ("ws 256x128x64 s3 w4", 256, 128, 3, 4, True), ("ws 128x128x64 s3 w4", 128, 128, 3, 4, True),
                ("persistent 128x256x64 s3 w8", 128, 256, 3, 8, False)]
    for name, activation in (("h2048_128x768_top8", "relu_squared"), ("h2048_64x1024_top8", "relu_squared"),
                             ("h2048_var_32x1536_64x768_32x384_top8", "relu_squared"),
                             ("h2048_64x1024_top8", "swiglu")):
        config, tokens = make_config(name, activation)
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=dtype)
        layer, _ = build_layer("triton", config, dtype)
        with torch.no_grad():
            o = triton_operands(layer, x)
            layout = o.layout
            H = config.hidden_size
            flops = 2 * o.routed_width * H
            gated = o.dh_up is not None
            print(f"\n## {name} {activation}: R {layout.num_rows}, H {H}, {flops / 1e9:.0f} GFLOP a product")
            print("| GEMM | variant | ms | TFLOP/s | % peak | bitwise vs today |")
            print("|---|---|---:|---:|---:|---|")

            def row(gemm, variant, ms, products, same=""):
                tf = products * flops / ms / 1e9
                print(f"| {gemm} | {variant} | {ms:.3f} | {tf:.0f} | {100 * tf / peak:.1f} | {same} |", flush=True)

            gemms = {"dW1" + (" + dV1" if gated else ""): (o.dh_pre, o.dh_up, o.dw1_rows, 2 if gated else 1)}
            if not gated:
                gemms["dW2"] = (o.h_act, None, o.dw2_rows, 1)
            for gemm, (hid, hid2, token_rows, products) in gemms.items():
                ref = kernels.weight_grad(hid, hid2, *token_rows, layout)
                row(gemm, "today", bench(lambda: kernels.weight_grad(hid, hid2, *token_rows, layout)), products)
                b_rows = token_rows[0] if token_rows[1] is None else kernels.gather_rows(*token_rows)
                for vname, tm, tn, stages, warps, ws in variants:
                    table = table_for(config.expert_widths, H, tm, tn)
                    out = torch.empty_like(o.w1)
                    out2 = torch.empty_like(o.w1) if gated else out

                    def launch():
                        return _persistent_weight_grad[(NUM_SMS,)](
                            hid, hid2 if gated else hid, b_rows, out, out2, o.sort.expert_row_offsets,
                            layer.expert_width_offsets, table, table.shape[0], H, layout.max_width,
                            SECOND=gated, TM=tm, TN=tn, TK=64, GRID=NUM_SMS, WS=ws, num_warps=warps,
                            num_stages=stages)
                    try:
                        compiled = launch()
                        torch.cuda.synchronize()
                        ms = bench(launch)
                        info = f"warps {compiled.metadata.num_warps}, smem {compiled.metadata.shared}"
                    except Exception as error:
                        print(f"| {gemm} | {vname} | {type(error).__name__}: {str(error)[:100]} | | | |", flush=True)
                        continue
                    same = torch.equal(out, ref[0]) and (not gated or torch.equal(out2, ref[1]))
                    diff = (out.float() - ref[0].float()).abs().max().item()
                    row(gemm, f"{vname} ({info})", ms, products, f"{same} (max diff {diff:.3g})")


if __name__ == "__main__":
    main()
