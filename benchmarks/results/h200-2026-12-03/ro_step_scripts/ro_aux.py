"""The seed GPT step under mode="reduce-overhead", round-robin in one process (as ro_ab.py): the MoE models as
they are, and with the layers' aux-loss attributes detached once the loss has taken their sum inside the compiled
forward (so that AOTAutograd needs no zero gradient for them). Median ms per step."""
import statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
import triton_moe.testing.gpt as gpt_module
from triton_moe import MoELayer
from triton_moe.testing.gpt import get_batch, load_bytes
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
plain = gpt_module.aux_loss
def releasing(model):
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    total = torch.stack([m.aux_loss for m in layers]).sum()
    for m in layers:
        m.aux_loss = m.aux_loss.detach()
    return total
variants = [("dense", "dense", plain), ("uniform", "triton_uniform", plain), ("uniform, released", "triton_uniform", releasing),
            ("variable", "triton_variable", plain), ("variable, released", "triton_variable", releasing)]
steps = {}
for label, mlp, fn in variants:
    gpt_module.aux_loss = fn
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode="reduce-overhead")
    def step(i, fwd=fwd, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss.detach().clone()  # the graph output is overwritten by later replays
    for i in range(6):
        step(i)
    torch.cuda.synchronize()
    steps[label] = step
gpt_module.aux_loss = plain
times = {label: [] for label in steps}
losses = {}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 150
for r in range(rounds):
    for label, step in steps.items():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); losses[label] = step(r); e.record(); e.synchronize()
        times[label].append(s.elapsed_time(e))
dense = statistics.median(times["dense"])
print(f"# {rounds} rounds, round-robin; median ms per step (25th-75th percentile), tax = median / dense median")
for label, ts in times.items():
    q = statistics.quantiles(ts, n=4)
    print(f"{label:22s} {statistics.median(ts):.3f} ms ({q[0]:.3f}-{q[2]:.3f}), tax {statistics.median(ts) / dense:.2f}x")
# the same weights, batches and steps: equal losses say the released models train bit for bit alike
for a, b_ in (("uniform", "uniform, released"), ("variable", "variable, released")):
    print(f"last loss {a}: {losses[a].item():.6f}, {b_}: {losses[b_].item():.6f}, equal: {torch.equal(losses[a], losses[b_])}")
