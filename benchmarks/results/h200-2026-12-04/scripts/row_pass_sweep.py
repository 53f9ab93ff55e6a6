"""The activation backward's row pass (grouped_gemm._activation_backward_rows) at the seed GPT's MLP shapes (8192
tokens, hidden 256, bf16, relu², top-2): device µs per launch from CUDA-graph replays of 20 launches (median of
5 replays), by column step TILE_W, elements a program (TILE_ROWS = elements / TILE_W) and warps. "lookup-free"
hands the variable layout UNIFORM_WIDTH = max width (wrong results: timing only, what the per-row expert lookup
costs)."""
import statistics, sys
import torch
import triton
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm
from triton_moe.kernels.host import next_power_of_2

def time_us(launch, n=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            launch()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(n):
            launch()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / n)
    return statistics.median(ts)

for sizes in sys.argv[1:] or ("8x384", "4x512,4x256", "16x512,32x256,16x128"):
    k = 2 if sizes.count(",") < 2 else 8
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(8192 if k == 2 else 4096, 256, device="cuda", dtype=torch.bfloat16)
    ops = harness.triton_operands(layer, x)
    layout = ops.layout
    d_act = torch.randn_like(ops.h_pre)
    d_rw = torch.empty(layout.num_rows, dtype=torch.float32, device="cuda")
    print(f"## {sizes} top-{k}: rows {layout.num_rows}, max width {layout.max_width}")
    rows = []
    for tile_w in (64, 128, 256, 512):
        if tile_w > next_power_of_2(layout.max_width):
            continue
        for elements in (1024, 2048, 4096):
            for warps in (2, 4, 8):
                tile_rows = max(elements // tile_w, 1)
                for lookup_free in ((False, True) if not layout.uniform else (False,)):
                    def launch():
                        grouped_gemm._activation_backward_rows[(triton.cdiv(layout.num_rows, tile_rows),)](
                            d_act, ops.h_pre, None, ops.routing_weights, ops.sort.row_to_flat, None, d_rw,
                            layout.expert_row_offsets, layout.expert_width_offsets,
                            layout.num_rows, layout.num_experts, layout.max_width,
                            ACTIVATION=cfg.activation, GATED=False, HAS_ROUTING_WEIGHTS=True,
                            INDEXED_ROUTING_WEIGHTS=True, TILE_ROWS=tile_rows, TILE_W=tile_w,
                            UNIFORM_WIDTH=layout.max_width if (layout.uniform or lookup_free) else 0,
                            **layout.facts.kernel_constants, num_warps=warps)
                    try:
                        rows.append((time_us(launch), tile_w, tile_rows, warps, lookup_free))
                    except Exception as error:
                        print("  failed", tile_w, tile_rows, warps, type(error).__name__, str(error)[:100])
    base_w = next_power_of_2(layout.max_width)
    plain = sorted(r for r in rows if not r[4])
    shown = plain[:6] + sorted(r for r in rows if r[4])[:2]
    shown += [r for r in rows if (r[1], r[2], r[3]) in ((min(base_w, 1024), max(2048 // base_w, 1), 4),
                                                        (min(base_w, 128), 2048 // min(base_w, 128), 4)) and not r[4]]
    for us, tile_w, tile_rows, warps, lookup_free in shown:
        print(f"  {us:7.2f} µs  TILE_W {tile_w:4d}  TILE_ROWS {tile_rows:3d}  warps {warps}{'  lookup-free' if lookup_free else ''}")
