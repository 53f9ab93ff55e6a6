"""The small problems' weight-gradient tile: 64x64x128 everywhere (before) against tuning's rule (128x128x64 for a
weight gradient of one width with at least 2^22 elements): the layer's forward + backward from a CUDA graph at the
seed configs, bf16, relu², µs (median of 100 replays, 3 rounds alternating), and the largest relative difference
of the gradients."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402
import triton_moe  # noqa: E402
from triton_moe.kernels import grouped_gemm  # noqa: E402

rule = grouped_gemm.gemm_tiles


def before(dtype, role, uniform_weight_elements=None, **kwargs):
    return rule(dtype, role, **kwargs)


CONFIGS = [("8x512", 2, 4096), ("4x512,4x256", 2, 4096), ("16x256", 2, 4096), ("4x512,8x256,4x128", 2, 4096),
           ("64x256", 8, 4096), ("16x512,32x256,16x128", 8, 4096), ("128x256", 8, 4096),
           ("32x512,64x256,32x128", 8, 4096), ("8x384", 2, 8192), ("64x256", 8, 8192), ("128x256", 8, 8192)]
print("| config | tokens | before µs | rule µs | grad rel diff |")
print("|---|---:|---:|---:|---:|")
for sizes, k, tokens in CONFIGS:
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
    res = {}
    for name, fn in (("before", before), ("rule", rule)):
        grouped_gemm.gemm_tiles = fn
        xx = x.detach().requires_grad_()
        layer.zero_grad(set_to_none=True)
        layer(xx).backward(gy)
        res[name] = [[p.grad.float().clone() for p in layer.parameters()],
                     harness.graphed_forward_backward_step(layer, x),
                     []]
    grouped_gemm.gemm_tiles = rule
    for _ in range(3):
        for name in ("before", "rule"):
            res[name][2].append(harness.time_ms(res[name][1], 10, 100) * 1e3)
    diff = max(((g - r).norm() / r.norm()).item() for g, r in zip(res["rule"][0], res["before"][0]))
    print(f"| {sizes} top-{k} | {tokens} | {' / '.join(f'{t:.1f}' for t in res['before'][2])} | "
          f"{' / '.join(f'{t:.1f}' for t in res['rule'][2])} | {diff:.1e} |", flush=True)
