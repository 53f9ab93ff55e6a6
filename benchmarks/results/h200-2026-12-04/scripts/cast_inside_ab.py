"""Casts inside the expert MLP op (new tree) against the autograd-level casts (old: 8da8ae3 as package
triton_moe_old in .carry/s19/old_pkg): layer host time, first-step gradient differences, eager seed GPT step."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".carry/s19/old_pkg")
import bench_train_step as b  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
import triton_moe  # noqa: E402
import triton_moe.layer  # noqa: E402
import triton_moe_old  # noqa: E402
import triton_moe_old.layer  # noqa: E402
from triton_moe.testing.gpt import GPT, GPTConfig, get_batch, load_bytes  # noqa: E402
from triton_moe.testing.shapes import SEED_CONFIGS  # noqa: E402

triton_moe.layer.MoELayer = (triton_moe.layer.MoELayer, triton_moe_old.layer.MoELayer)  # aux_loss sees both
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
dev = torch.device("cuda")
PKGS = {"old": triton_moe_old, "new": triton_moe}

# 1. layer: first-step differences and host time
x = torch.randn(8192, 256, device=dev, requires_grad=True)
g = torch.randn(8192, 256, device=dev)
layers = {}
for name in ("8exp_uniform", "8exp_variable", "64exp_uniform"):
    for version, pkg in PKGS.items():
        torch.manual_seed(0)
        layers[(name, version)] = pkg.MoEMLP(pkg.MoEConfig(**SEED_CONFIGS[name])).to(dev)


def fwd_bwd(layer):
    layer.zero_grad(set_to_none=True); x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * g).sum().add(layer.aux_loss).backward()
    return [y.detach().float(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


for name in ("8exp_uniform", "8exp_variable", "64exp_uniform"):
    old, new = fwd_bwd(layers[(name, "old")]), fwd_bwd(layers[(name, "new")])
    diffs = [((a - c).norm() / c.norm()).item() for a, c in zip(new, old)]
    print(f"# {name}: rel L2 new vs old (out, dx, w1, w2, router.weight): " + " ".join(f"{d:.1e}" for d in diffs),
          "| dtypes", [t.dtype for t in new[:2]])
print("# layer fwd+bwd host us (sync after each), median over rounds x 20")
times = {key: [] for key in layers}
for r in range(rounds):
    for key, layer in layers.items():
        for _ in range(20):
            torch.cuda.synchronize()
            t = time.perf_counter()
            layer.zero_grad(set_to_none=True); x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(g)
            times[key].append(time.perf_counter() - t)
for name in ("8exp_uniform", "8exp_variable", "64exp_uniform"):
    o, n = (statistics.median(times[(name, v)]) * 1e6 for v in ("old", "new"))
    print(f"{name:15s} old {o:7.0f}  new {n:7.0f}  ({(n - o) / o * 100:+.1f}%)")

# 2. eager seed GPT step, round-robin
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]


def model_of(mlp, version):
    if version == "new" or mlp == "dense":
        return b.build_model(scale, mlp)
    pkg = PKGS[version]
    sizes = scale.uniform if mlp == "triton_uniform" else scale.variable
    moe = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=scale.top_k, hidden_size=scale.n_embd)
    config = GPTConfig(moe=moe, n_layer=scale.n_layer, n_head=scale.n_head, n_embd=scale.n_embd,
                       block_size=scale.block_size)
    torch.manual_seed(0)
    return GPT(config, lambda c: pkg.MoEMLP(pkg.MoEConfig(expert_sizes=c.expert_sizes, num_active_experts=c.num_active_experts,
                                                          hidden_size=c.hidden_size))).cuda()


steps = {}
for label, mlp, version in [("dense", "dense", "new"), ("uniform old", "triton_uniform", "old"),
                            ("uniform new", "triton_uniform", "new"), ("variable old", "triton_variable", "old"),
                            ("variable new", "triton_variable", "new")]:
    model = model_of(mlp, version)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss
    losses = [step(i).item() for i in range(5)]
    print(f"# {label}: first losses {[round(v, 4) for v in losses]}")
    steps[label] = step
torch.cuda.synchronize()
times = round_robin_ms(steps, 3 * rounds)
print(f"# eager seed GPT, {3 * rounds} rounds, median ms per step (MoE tax vs dense)")
print_round_robin(times, "dense")
