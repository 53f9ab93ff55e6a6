"""The small weight-gradient tile, old (128x64x64) against new (tuning's table, 64x64x128), at every seed config:
the layer's forward + backward from a CUDA graph (µs, median of 100 replays, 3 rounds alternating) and the
weight-gradient kernels' device µs (with the row sums); gradients against the old tile."""
import sys, statistics
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm
from triton_moe.kernels.tuning import GemmTiles
new_tiles = grouped_gemm.gemm_tiles
# argv[1]: another tile for the old side, e.g. 128,128,64,4,3 (the 2026-12-04 run); without it, 2026-12-03's
OLD = GemmTiles(*map(int, sys.argv[1].split(","))) if len(sys.argv) > 1 else GemmTiles(128, 64, 64, 4, 3)
from triton_moe.kernels.tuning import GPU_16BIT_SMALL_TILES
def old_tiles(dtype, role, **kw):
    tiles = new_tiles(dtype, role, **kw)
    return OLD if role == "weight_grad" and tiles == GPU_16BIT_SMALL_TILES["weight_grad"] else tiles
CONFIGS = [("8x512", 2, 4096, "relu_squared"), ("4x512,4x256", 2, 4096, "relu_squared"),
           ("16x256", 2, 4096, "relu_squared"), ("4x512,8x256,4x128", 2, 4096, "relu_squared"),
           ("64x256", 8, 4096, "relu_squared"), ("16x512,32x256,16x128", 8, 4096, "relu_squared"),
           ("128x256", 8, 4096, "relu_squared"), ("32x512,64x256,32x128", 8, 4096, "relu_squared"),
           ("8x384", 2, 8192, "relu_squared"), ("4x512,4x256", 2, 8192, "relu_squared"), ("8x384", 2, 8192, "swiglu")]
if len(sys.argv) > 2:  # a name filter, e.g. "top-8" (the 2026-12-04 run)
    CONFIGS = [c for c in CONFIGS if sys.argv[2] in f"{c[0]} top-{c[1]}"]
    print(f"# old = {OLD}")
print("| config | tokens | act | dW µs old | dW µs new | graph µs old | graph µs new | grad rel diff |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
for sizes, k, tokens, act in CONFIGS:
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256, activation=act)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    res = {}
    for name, fn in (("old", old_tiles), ("new", new_tiles)):
        grouped_gemm.gemm_tiles = fn
        def step(x=x.detach().requires_grad_()):
            layer.zero_grad(set_to_none=True); x.grad = None
            layer(x).backward(gy)
        step(); torch.cuda.synchronize()
        grads = [p.grad.float().clone() for p in layer.parameters() if p.grad is not None]
        dw = min(sum(us for n, _, us in harness.kernel_launches(step)[0] if n in ("_weight_grad_gemm", "_sum_row_splits")) for _ in range(3))
        res[name] = [grads, dw, harness.graphed_forward_backward_step(layer, x), []]
    for _ in range(3):
        for name in ("old", "new"):
            res[name][3].append(harness.time_ms(res[name][2], 10, 100) * 1e3)
    diff = max(((g - r).norm() / r.norm()).item() for g, r in zip(res["new"][0], res["old"][0]))
    print(f"| {sizes} top-{k} | {tokens} | {act} | {res['old'][1]:.1f} | {res['new'][1]:.1f} | {statistics.median(res['old'][3]):.1f} | {statistics.median(res['new'][3]):.1f} | {diff:.1e} |", flush=True)
    grouped_gemm.gemm_tiles = new_tiles
