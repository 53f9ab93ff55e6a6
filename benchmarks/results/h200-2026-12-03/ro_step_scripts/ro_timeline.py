"""Timeline of the seed GPT step under mode="reduce-overhead": per step, when the host launches the forward and
backward CUDA graphs and ends its work, and when the device runs each graph and the optimizer. Usage:
ro_timeline.py OUTDIR"""
import json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
from triton_moe.testing.gpt import get_batch, load_bytes
out = sys.argv[1]
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
for mlp in ("dense", "triton_uniform", "triton_variable"):
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode="reduce-overhead")
    def step(i, fwd=fwd, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(8): step(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(12):
            with torch.profiler.record_function(f"STEP{i}"):
                step(i)
        torch.cuda.synchronize()
    path = os.path.join(out, f"trace_{mlp}.json")
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    ev = [e for e in ev if e.get("ph") == "X"]
    steps = sorted([e for e in ev if e["name"].startswith("STEP") and e.get("cat") == "user_annotation"], key=lambda e: e["ts"])
    launches = [e for e in ev if e["name"] == "cudaGraphLaunch"]
    kernels = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_corr = {}
    for k in kernels:
        by_corr.setdefault(k["args"].get("correlation"), []).append(k)
    rows = []
    for si, s in enumerate(steps[2:], 2):
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        nxt = steps[si + 1]["ts"] if si + 1 < len(steps) else float("inf")
        gl = sorted([l for l in launches if t0 <= l["ts"] <= t1], key=lambda e: e["ts"])
        graph_spans = []
        for l in gl:
            ks = by_corr.get(l["args"].get("correlation"), [])
            if ks:
                graph_spans.append((l["ts"] - t0, min(k["ts"] for k in ks) - t0, max(k["ts"] + k["dur"] for k in ks) - t0,
                                    sum(k["dur"] for k in ks), len(ks)))
        # device work launched by this step's host span (any kernel whose launch lies in it: by correlation)
        step_corr = {e["args"].get("correlation") for e in ev if e.get("cat") == "cuda_runtime" and t0 <= e["ts"] <= t1}
        sk = [k for k in kernels if k["args"].get("correlation") in step_corr]
        dev_end = max(k["ts"] + k["dur"] for k in sk) - t0 if sk else 0
        dev_busy = sum(k["dur"] for k in sk)
        rows.append((s["dur"], dev_end, dev_busy, graph_spans))
    print(f"== {mlp}: per step (µs from the step's host start): host end | device end | device busy | graphs: (launch, dev start, dev end, busy, kernels)")
    for r in rows:
        print(f"  host {r[0]:7.0f} | dev end {r[1]:7.0f} | busy {r[2]:6.0f} | " + " ; ".join(
            f"L{g[0]:.0f} D{g[1]:.0f}-{g[2]:.0f} busy {g[3]:.0f} n{g[4]}" for g in r[3]))
    med = lambda xs: statistics.median(xs)
    print(f"  median host {med([r[0] for r in rows]):.0f}, device end {med([r[1] for r in rows]):.0f}, busy {med([r[2] for r in rows]):.0f}")
    if all(len(r[3]) >= 2 for r in rows):
        print(f"  median bwd graph launch {med([r[3][-1][0] for r in rows]):.0f}, bwd dev start {med([r[3][-1][1] for r in rows]):.0f}, "
              f"bwd dev end {med([r[3][-1][2] for r in rows]):.0f}, bwd busy {med([r[3][-1][3] for r in rows]):.0f}; "
              f"fwd launch {med([r[3][0][0] for r in rows]):.0f}, fwd dev {med([r[3][0][1] for r in rows]):.0f}-{med([r[3][0][2] for r in rows]):.0f}")
    os.remove(path) if os.path.getsize(path) > 40e6 else None
    del model, opt, fwd
    torch._dynamo.reset(); torch.cuda.empty_cache()
