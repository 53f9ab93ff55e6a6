"""Where the seed GPT step's time goes under eager and mode="reduce-overhead", per MLP: wall ms/step (events),
host ms/step (perf_counter without a sync), and from a torch.profiler trace of 5 steps: kernels per step, the sum
of their device time, the GPU's busy union, and the kernels by name (µs per step)."""
import collections, json, statistics, sys, time, os
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
from triton_moe.testing.gpt import get_batch, load_bytes
from torch.profiler import profile, ProfilerActivity

scale_name = os.environ.get("SCALE", "seed")
scale = b.SCALES[scale_name]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(4)]
mlps = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dense", "triton_uniform", "triton_variable"]
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["eager", "reduce-overhead"]
out_dir = os.environ.get("OUT", "/tmp")
for mode in modes:
    for mlp in mlps:
        torch._dynamo.reset(); torch.cuda.empty_cache()
        model = b.build_model(scale, mlp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = model if mode == "eager" else torch.compile(model, mode="reduce-overhead" if mode == "reduce-overhead" else None)
        def step(i):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = fwd(*batches[i % 4])  # noqa: F821 (bound in the loop above)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()  # noqa: F821
        for i in range(8): step(i)
        torch.cuda.synchronize()
        walls, hosts = [], []
        for i in range(30):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); t = time.perf_counter(); step(i); hosts.append(time.perf_counter() - t); e.record(); e.synchronize()
            walls.append(s.elapsed_time(e))
        n = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(n): step(i)
            torch.cuda.synchronize()
        path = f"{out_dir}/trace_{scale_name}_{mlp}_{mode}.json"
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
        kern = [ev for ev in events if ev.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
        kern.sort(key=lambda ev: ev["ts"])
        total = sum(ev["dur"] for ev in kern)
        busy, end = 0.0, -1e30
        for ev in kern:
            s0, e0 = ev["ts"], ev["ts"] + ev["dur"]
            if e0 > end:
                busy += e0 - max(s0, end); end = e0
        span = kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"] if kern else 0
        print(f"\n## {scale_name} {mlp} {mode}: wall {statistics.median(walls):.3f} ms/step, host {statistics.median(hosts)*1e3:.3f} ms/step; "
              f"per step: {len(kern)/n:.0f} kernels, device sum {total/n/1e3:.3f} ms, busy {busy/n/1e3:.3f} ms, span {span/n/1e3:.3f} ms", flush=True)
        by = collections.defaultdict(lambda: [0, 0.0])
        for ev in kern:
            k = ev["name"][:90]; by[k][0] += 1; by[k][1] += ev["dur"]
        print("| kernel | per step | µs per step |\n|---|---:|---:|")
        for k, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:40]:
            print(f"| {k} | {c/n:.0f} | {d/n:.1f} |")
        # the biggest idle gaps in one step
        gaps = []
        for a, c in zip(kern, kern[1:]):
            g = c["ts"] - (a["ts"] + a["dur"])
            if g > 20: gaps.append((g, a["name"][:50], c["name"][:50]))
        gaps.sort(reverse=True)
        print(f"gaps > 20 µs: {len(gaps)/n:.1f} per step, {sum(g for g, *_ in gaps)/n:.0f} µs per step; largest: "
              + "; ".join(f"{g:.0f} µs {a} -> {c}" for g, a, c in gaps[:6]))
        del model, opt, fwd
