"""The persistent rows GEMMs (down; dX rows of one product) in 128x256 tiles (tuning.PERSISTENT_TILES) against
256x128, the weight gradients unchanged: the whole layer's forward + backward from a CUDA graph at the hidden-2048
configs, bf16, µs per replay (median of 30, 3 rounds alternating), and whether outputs and gradients agree bit for
bit (the K loop runs in the same order in both)."""
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402
from triton_moe.kernels import grouped_gemm  # noqa: E402
from triton_moe.kernels.tuning import GemmTiles  # noqa: E402

hidden_rows_gemm = grouped_gemm._hidden_rows_gemm
VARIANTS = {"128x256": None, "256x128": GemmTiles(256, 128, 64, num_warps=4, num_stages=3)}


def use(tiles):
    grouped_gemm._hidden_rows_gemm = (hidden_rows_gemm if tiles is None else
                                      lambda role, a, b, out, layout, t: hidden_rows_gemm(role, a, b, out, layout,
                                                                                          t or tiles))


print("| config | activation | 128x256 µs | 256x128 µs | bitwise equal |")
print("|---|---|---:|---:|---|")
for name, activation in [("h2048_64x1024_top8", "relu_squared"), ("h2048_128x768_top8", "relu_squared"),
                         ("h2048_var_32x1536_64x768_32x384_top8", "relu_squared"),
                         ("h2048_64x1024_top8", "swiglu"), ("h4096_8x14336_top2", "relu_squared")]:
    config, tokens = harness.make_config(name, activation)
    torch.manual_seed(0)
    layer, _ = harness.build_layer("triton", config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    results, replays = {}, {}
    for label, tiles in VARIANTS.items():
        use(tiles)
        xx = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(xx)
        out.backward(grad_out)
        results[label] = [out.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]
        replays[label] = harness.graphed_forward_backward_step(layer, x)
    use(None)
    times = {label: [] for label in VARIANTS}
    for _ in range(3):
        for label, replay in replays.items():
            for _ in range(3):
                replay()
            ts = []
            for _ in range(30):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000)
            times[label].append(statistics.median(ts))
    equal = all(torch.equal(a, b) for a, b in zip(results["128x256"], results["256x128"]))
    print(f"| {name} | {activation} | {' / '.join(f'{t:.0f}' for t in times['128x256'])} | "
          f"{' / '.join(f'{t:.0f}' for t in times['256x128'])} | {equal} |")
    del layer, replays, results
    torch.cuda.empty_cache()
