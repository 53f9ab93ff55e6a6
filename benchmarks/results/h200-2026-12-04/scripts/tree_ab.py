"""One tree's layer at hidden 2048: the forward + backward timed eagerly with a sync per call (as bench_fwd_bwd),
back to back, and replayed from a CUDA graph, and the device time of the two gathering GEMMs (up, dA) from the
profiler. The tree's package root is the first argument; the A/B runs it once per tree, alternately.

    python3 benchmarks/results/h200-2026-12-04/scripts/tree_ab.py <package root> <label> [configs...]
"""
import sys

root, label = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
sys.path.insert(1, "benchmarks")
import torch  # noqa: E402

import harness  # noqa: E402
import triton_moe  # noqa: E402

assert triton_moe.__file__.startswith(root), triton_moe.__file__


def gathering_gemms_us(step):
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    gemms = [e.time_range.elapsed_us() for e in events if e.name == "_expert_rows_gemm"]
    return gemms, sum(e.time_range.elapsed_us() for e in events)


for name in sys.argv[3:] or ["h2048_64x1024_top8", "h2048_128x768_top8"]:
    activation = "swiglu" if name.endswith("swiglu") else "relu_squared"
    config, tokens = harness.make_config(name.removesuffix("_swiglu"), activation)
    layer, _ = harness.build_layer("triton", config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    step = harness.forward_backward_step(layer, x)
    eager = harness.time_ms(step, warmup=5, repeats=30)
    back_to_back = harness.back_to_back_ms(step, warmup=3, repeats=30)
    replay = harness.graphed_forward_backward_step(layer, x)
    graph = harness.time_ms(replay, warmup=3, repeats=30)
    gemms, device = gathering_gemms_us(step)
    flops = 3 * harness.model_flops(config, x, layer.router.weight)
    print(f"{label:5s} {name:22s} eager {eager:6.3f} ms  back-to-back {back_to_back:6.3f}  graph {graph:6.3f}  "
          f"device {device / 1e3:6.3f}  ({flops / graph / 1e9:5.1f} TFLOP/s graphed)  "
          f"gathering GEMMs {' '.join(f'{us:6.0f}' for us in gemms)} µs", flush=True)
