"""The row pass's tiles, old (TILE_W = next power of 2 of the largest width, up to 1024; 2048 elements a program)
against 128 columns x 16 rows with 4 warps and new (tuning.row_pass_tiles): the layer's forward + backward from a CUDA graph, bf16, relu², µs per replay
(median of 100 replays, 3 rounds alternating), and the largest difference of the outputs and gradients."""
import statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm, tuning

new_rule = grouped_gemm.row_pass_tiles
def old_rule(max_width):
    tile_w = tuning.permute_tile_h(max_width)
    return tile_w, tuning.rows_per_program(tile_w, 2048), 4

def rule_128x16_w4(max_width):
    tile_w = min(tuning.next_power_of_2(max_width), 128)
    return tile_w, tuning.rows_per_program(tile_w, 2048), 4

CONFIGS = [("8x384", 2, 8192), ("4x512,4x256", 2, 8192), ("8x512", 2, 4096), ("4x512,4x256", 2, 4096),
           ("64x256", 8, 4096), ("16x512,32x256,16x128", 8, 4096), ("128x256", 8, 4096),
           ("32x512,64x256,32x128", 8, 4096)]
print("| config | tokens | graph µs old | graph µs 128x16, 4 warps | graph µs new (tuning) | max |diff| old vs new |")
print("|---|---:|---:|---:|---:|---:|")
for sizes, k, tokens in CONFIGS:
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    results, replays = {}, {}
    for name, rule in (("old", old_rule), ("mid", rule_128x16_w4), ("new", new_rule)):
        grouped_gemm.row_pass_tiles = rule
        xx = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(xx)
        out.backward(torch.ones_like(out))
        results[name] = [out.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]
        replays[name] = harness.graphed_forward_backward_step(layer, x)
    grouped_gemm.row_pass_tiles = new_rule
    times = {"old": [], "mid": [], "new": []}
    for _ in range(3):
        for name in ("old", "mid", "new"):
            replay = replays[name]
            for _ in range(5):
                replay()
            ts = []
            for _ in range(100):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000)
            times[name].append(statistics.median(ts))
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results["old"], results["new"]))
    print(f"| {sizes} top-{k} | {tokens} | {' / '.join(f'{t:.1f}' for t in times['old'])} | "
          f"{' / '.join(f'{t:.1f}' for t in times['mid'])} | {' / '.join(f'{t:.1f}' for t in times['new'])} | {diff:.2e} |")
