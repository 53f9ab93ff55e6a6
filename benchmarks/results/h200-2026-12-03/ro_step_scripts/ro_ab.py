"""The seed GPT step under mode="reduce-overhead", every model compiled in one process and their steps taken in
turn (round-robin), so that the host's pace, which drifts between processes and over minutes, moves every model
alike: dense, and the MoE layers with the weight gradients' row splits (tuning's choice) and without (forced to 1).
Wall ms per step (CUDA events), medians over the rounds."""
import statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
from triton_moe.kernels import grouped_gemm, tuning
from triton_moe.testing.gpt import get_batch, load_bytes

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
auto = tuning.weight_grad_row_splits
variants = [("dense", "dense", "auto"), ("uniform, splits", "triton_uniform", "auto"),
            ("uniform, no splits", "triton_uniform", 1), ("variable, splits", "triton_variable", "auto"),
            ("variable, no splits", "triton_variable", 1)]
steps = {}
for label, mlp, splits in variants:
    grouped_gemm.weight_grad_row_splits = auto if splits == "auto" else (lambda *a: 1)
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode="reduce-overhead")
    def step(i, fwd=fwd, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(6):  # warm-up, recording: the kernels are chosen now, under this variant's patch
        step(i)
    torch.cuda.synchronize()
    steps[label] = step
grouped_gemm.weight_grad_row_splits = auto
times = {label: [] for label in steps}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 150
for r in range(rounds):
    for label, step in steps.items():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); step(r); e.record(); e.synchronize()
        times[label].append(s.elapsed_time(e))
dense = statistics.median(times["dense"])
print(f"# {rounds} rounds, round-robin; median ms per step (25th-75th percentile), tax = median / dense median")
for label, ts in times.items():
    q = statistics.quantiles(ts, n=4)
    print(f"{label:22s} {statistics.median(ts):.3f} ms ({q[0]:.3f}-{q[2]:.3f}), tax {statistics.median(ts) / dense:.2f}x")
