"""MoEMLP's eager layer as one autograd node (layer_ops.moe_layer) against the route's and the expert MLP's two
nodes (MoELayer._route_and_experts), in one process, alternating: bit-for-bit check, layer host time, and the eager
seed GPT step round-robin."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
import triton_moe  # noqa: E402
from triton_moe.layer import MoELayer  # noqa: E402
from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.testing.gpt import GPT, GPTConfig, get_batch, load_bytes  # noqa: E402
from triton_moe.testing.shapes import SEED_CONFIGS  # noqa: E402


class TwoNodes(triton_moe.MoEMLP):
    _route_and_experts = MoELayer._route_and_experts


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
dev = torch.device("cuda")
KINDS = {"two": TwoNodes, "one": triton_moe.MoEMLP}
NAMES = ("8exp_uniform", "8exp_variable", "64exp_uniform")
x = torch.randn(8192, 256, device=dev, requires_grad=True)
g = torch.randn(8192, 256, device=dev)
layers = {}
for name in NAMES:
    for kind, cls in KINDS.items():
        torch.manual_seed(0)
        layers[(name, kind)] = cls(MoEConfig(**SEED_CONFIGS[name])).to(dev)


def fwd_bwd(layer):
    layer.zero_grad(set_to_none=True); x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * g).sum().add(layer.aux_loss).backward()
    return [y.detach(), layer.aux_loss.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


for name in NAMES:
    two, one = fwd_bwd(layers[(name, "two")]), fwd_bwd(layers[(name, "one")])
    print(f"# {name}: bit for bit (out, aux, dx, params):", all(torch.equal(a, c) for a, c in zip(one, two)))
print("# layer fwd+bwd host us (sync before each), median over rounds x 20")
times = {key: [] for key in layers}
for r in range(rounds // 2):
    for key, layer in layers.items():
        for _ in range(20):
            torch.cuda.synchronize()
            t = time.perf_counter()
            layer.zero_grad(set_to_none=True); x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(g)
            times[key].append(time.perf_counter() - t)
for name in NAMES:
    o, n = (statistics.median(times[(name, v)]) * 1e6 for v in ("two", "one"))
    print(f"{name:15s} two nodes {o:7.0f}  one node {n:7.0f}  ({(n - o) / o * 100:+.1f}%)")

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]


def model_of(mlp, kind):
    if mlp == "dense":
        return b.build_model(scale, mlp)
    sizes = scale.uniform if mlp == "triton_uniform" else scale.variable
    moe = MoEConfig(expert_sizes=sizes, num_active_experts=scale.top_k, hidden_size=scale.n_embd)
    config = GPTConfig(moe=moe, n_layer=scale.n_layer, n_head=scale.n_head, n_embd=scale.n_embd,
                       block_size=scale.block_size)
    torch.manual_seed(0)
    return GPT(config, KINDS[kind]).cuda()


steps = {}
for mlp, kind in (("dense", None), ("triton_uniform", "two"), ("triton_uniform", "one"),
                  ("triton_variable", "two"), ("triton_variable", "one")):
    model = model_of(mlp, kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for i in range(5):
        step(i)
    steps[mlp[7:] + (f" {kind}" if kind else "") if mlp != "dense" else "dense"] = step
torch.cuda.synchronize()
print(f"# eager seed GPT step, {rounds} rounds round-robin")
print_round_robin(round_robin_ms(steps, rounds), "dense")
