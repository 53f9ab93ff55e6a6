"""DirectLaunch through the C launcher (new) against CompiledKernel[grid] with the per-int tuple key
(old, e14d470's host.py as .carry/s19/old_host.py): bitwise check, layer fwd+bwd host time, per-kernel launch cost,
eager seed-GPT step round-robin."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s19")
import bench_train_step as b  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
import old_host  # noqa: E402
from triton_moe import MoEMLP  # noqa: E402
from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.kernels import host  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402
from triton_moe.testing.shapes import SEED_CONFIGS  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
VARIANTS = {"old": (old_host.DirectLaunch, {}), "new": (host.DirectLaunch, {})}


def use(version):
    host.DirectLaunch, host._DIRECT_LAUNCHES = VARIANTS[version]


dev = torch.device("cuda")
# 1. bitwise: one fwd+bwd per layer with each variant
layers = {name: MoEMLP(MoEConfig(**SEED_CONFIGS[name])).to(dev) for name in ("8exp_uniform", "8exp_variable",
                                                                             "64exp_uniform")}
x = torch.randn(8192, 256, device=dev, requires_grad=True)
g = torch.randn(8192, 256, device=dev)


def fwd_bwd(layer):
    layer.zero_grad(set_to_none=True); x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
    return y


for name, layer in layers.items():
    results = {}
    for version in ("old", "new", "new"):
        use(version)
        y = fwd_bwd(layer)
        results.setdefault(version, []).append(
            [y.detach().clone(), x.grad.clone(), layer.aux_loss.detach().clone()]
            + [p.grad.clone() for p in layer.parameters()])
    same = all(torch.equal(a, c) for a, c in zip(results["old"][0], results["new"][1]))
    print(f"# bitwise {name}: old vs new (second, C-launched) {same}")

# how many launches took the C launcher
calls = {"c": 0}
for dl in host._DIRECT_LAUNCHES.values():
    for key, (launcher, names) in dl._selected.items():
        calls["c"] += launcher.__name__ == "through_c_launcher"
print(f"# new: {calls['c']} of {sum(len(d._selected) for d in host._DIRECT_LAUNCHES.values())} selected kernels "
      "launch through the C launcher")

# 2. layer fwd+bwd host time, alternating variants
print("# layer fwd+bwd host us (sync after each), median over rounds x 20")
times = {(n, v): [] for n in layers for v in VARIANTS}
for r in range(rounds):
    for name, layer in layers.items():
        for version in VARIANTS:
            use(version)
            for _ in range(20):
                torch.cuda.synchronize()
                t = time.perf_counter()
                layer.zero_grad(set_to_none=True); x.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = layer(x)
                y.backward(g)
                times[(name, version)].append(time.perf_counter() - t)
for name in layers:
    o, n = (statistics.median(times[(name, v)]) * 1e6 for v in ("old", "new"))
    print(f"{name:15s} old {o:7.0f}  new {n:7.0f}  ({(n - o) / o * 100:+.1f}%)")

# 3. per-kernel launch cost through each variant's launch()
recorded = {}
for version in VARIANTS:
    use(version)
    cls = host.DirectLaunch
    orig = cls.launch
    cls.launch = lambda self, grid, args, kwargs, orig=orig, version=version: (
        recorded.setdefault((version, self.kernel.fn.__name__), (self, grid, args, kwargs)), orig(self, grid, args, kwargs))
    fwd_bwd(layers["8exp_uniform"])
    cls.launch = orig
torch.cuda.synchronize()
print("# us per launch (median of 5 x 500)")
for (version, kname), (dl, grid, args, kwargs) in sorted(recorded.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(500):
            dl.launch(grid, args, kwargs)
        ts.append((time.perf_counter() - t) / 500 * 1e6)
        torch.cuda.synchronize()
    print(f"{kname:32s} {version}  {statistics.median(ts):6.2f}")

# 4. eager seed GPT step, round-robin
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
steps = {}
for label, mlp, version in [("dense", "dense", "new"), ("uniform old", "triton_uniform", "old"),
                            ("uniform new", "triton_uniform", "new"), ("variable old", "triton_variable", "old"),
                            ("variable new", "triton_variable", "new")]:
    torch.manual_seed(0)
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt, version=version):
        use(version)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(5):
        step(i)
    steps[label] = step
torch.cuda.synchronize()
times = round_robin_ms(steps, 3 * rounds)
print(f"# eager seed GPT, {3 * rounds} rounds, median ms per step (MoE tax vs dense)")
print_round_robin(times, "dense")
