"""Where the device idles in one eager forward + backward of the layer at hidden 2048 (bench_fwd_bwd's step, timed
with a sync per call): the kernels in order, each gap on the device of more than 15 µs, and the host's launch call
that ended it (its start, relative to the gap's start: positive means the host was late). Also the step timed with
call_ms, the device time summed, and the CUDA runtime calls that wait for the device.

    python3 benchmarks/results/h200-2026-12-04/scripts/eager_gaps.py h2048_64x1024_top8 h2048_128x768_top8
"""
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402

SYNCING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaFree", "cudaMalloc",
           "cudaEventSynchronize", "cudaStreamWaitEvent", "cudaHostAlloc", "cuMemAlloc", "cuMemFree")


def profile_step(step, path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            with torch.profiler.record_function("STEP"):
                step()
            torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        return json.load(f)["traceEvents"]


def analyse(events):
    steps = sorted((e for e in events if e.get("name") == "STEP" and e.get("ph") == "X"
                    and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])  # the host's range
    last = steps[-1]
    t0, t1 = last["ts"], last["ts"] + last["dur"]
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset",
                                                                                    "gpu_memcpy")
                      and t0 <= e["ts"] <= t1 + 20000), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
               and t0 <= e["ts"] <= t1 + 20000]
    by_corr = {e["args"].get("correlation"): e for e in runtime if "args" in e}
    busy = sum(k["dur"] for k in kernels)
    span_end = max(k["ts"] + k["dur"] for k in kernels)
    print(f"  host step {last['dur']:.0f} µs; first kernel at +{kernels[0]['ts'] - t0:.0f} µs; device busy "
          f"{busy:.0f} µs; last kernel ends at +{span_end - t0:.0f} µs; {len(kernels)} kernels")
    idle = kernels[0]["ts"] - t0
    print(f"  {'gap µs':>7s} {'host late µs':>12s}  kernel after the gap (launch call)")
    for before, after in zip(kernels, kernels[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 15:
            idle += gap
            launch = by_corr.get(after.get("args", {}).get("correlation"))
            late = (launch["ts"] - (before["ts"] + before["dur"])) if launch else float("nan")
            print(f"  {gap:7.0f} {late:12.0f}  {after['name'][:70]} ({launch['name'] if launch else '?'})")
    print(f"  device idle inside the step: {idle:.0f} µs (first-kernel delay included)")
    calls = {}
    for e in runtime:
        if any(e["name"].startswith(s) for s in SYNCING):
            n, d = calls.get(e["name"], (0, 0.0))
            calls[e["name"]] = (n + 1, d + e["dur"])
    print("  waiting/allocating runtime calls:", {k: (n, round(d)) for k, (n, d) in calls.items()} or "none")
    print("  kernels in order (µs):")
    for k in kernels:
        print(f"    +{k['ts'] - t0:8.0f} {k['dur']:7.0f}  {k['name'][:90]}")


def main(names):
    out = os.environ.get("OUT", tempfile.gettempdir())
    for name in names:
        config, tokens = harness.make_config(name, "relu_squared")
        layer, _ = harness.build_layer("triton", config, torch.bfloat16)
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        step = harness.forward_backward_step(layer, x)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = [harness.call_ms(step) for _ in range(20)]
        print(f"{name}: call_ms median {statistics.median(times):.3f} ms")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
        analyse(profile_step(step, os.path.join(out, f"eager_gaps_{name}.json")))


if __name__ == "__main__":
    main(sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8"])
