"""Small weight gradients (hidden 256, bf16): device µs of the layer's weight-gradient launches per forward +
backward, per tile shape and row split; and the layer's forward + backward from a CUDA graph."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm, tuning
from triton_moe.kernels.tuning import GemmTiles
auto_splits = tuning.weight_grad_row_splits
orig_tiles = grouped_gemm.gemm_tiles
TILES = [None, (64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3),
         (128, 64, 32, 4, 4), (128, 64, 128, 4, 3), (64, 256, 64, 4, 3), (256, 64, 64, 8, 3), (64, 64, 128, 4, 3)]
SPLITS = [1, 2, 4, 8, "auto"]
CONFIGS = [("8x384", 2, 8192), ("4x512,4x256", 2, 8192), ("64x256", 8, 4096)]
for sizes, k, tokens in CONFIGS:
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    ref = None
    print(f"== {sizes} top{k} {tokens} tokens: dW µs (both launches + sums) per tile and split; graph µs for auto", flush=True)
    for t in TILES:
        tiles = None if t is None else GemmTiles(*t)
        grouped_gemm.gemm_tiles = (lambda dtype, role, tiles=tiles, **kw: tiles if (tiles is not None and role == "weight_grad") else orig_tiles(dtype, role, **kw))
        line = f"  {str(t or 'default'):22s}"
        for s in SPLITS:
            grouped_gemm.weight_grad_row_splits = auto_splits if s == "auto" else (lambda *a, s=s: s)
            def step(x=x.detach().requires_grad_()):
                layer.zero_grad(set_to_none=True); x.grad = None
                layer(x).backward(gy)
            try:
                step(); torch.cuda.synchronize()
                grads = [p.grad.float().clone() for p in (layer.w1, layer.w2)]
                if ref is None: ref = grads
                diff = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))
                best = min(sum(us for name, _, us in harness.kernel_launches(step)[0] if name in ("_weight_grad_gemm", "_sum_row_splits")) for _ in range(3))
                line += f" | S={s}: {best:6.1f}" + ("" if diff < 3e-3 else f" BAD {diff:.1e}")
                if s == "auto":
                    line += f" graph {harness.time_ms(harness.graphed_forward_backward_step(layer, x), 10, 100)*1e3:.1f}"
            except Exception as e:
                line += f" | S={s}: ERR {type(e).__name__}: {str(e)[:80]}"
        print(line, flush=True)
    grouped_gemm.gemm_tiles = orig_tiles; grouped_gemm.weight_grad_row_splits = auto_splits
