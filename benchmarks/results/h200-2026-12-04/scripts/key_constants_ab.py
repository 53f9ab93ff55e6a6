"""DirectLaunch.key with module constants (new) against torch.Tensor / torch.nn.Parameter looked up per argument
and a tuple per None (old), in one process, alternating: the keys' equality, the key's time for the up GEMM's
arguments, one layer's host time and the eager seed GPT step round-robin."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
import triton_moe  # noqa: E402
from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.kernels import host  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402
from triton_moe.testing.shapes import SEED_CONFIGS  # noqa: E402

NEW_KEY = host.DirectLaunch.key


def old_key(device, args, kwargs):
    parts = []
    append = parts.append
    for value in args:
        kind = value.__class__
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            append(value.dtype)
            append(value.data_ptr() & 15)
        elif kind is int:
            append(value)
        elif value is None or kind is bool or kind is float:
            append((kind, value))
        elif isinstance(value, torch.Tensor):
            append(value.dtype)
            append(value.data_ptr() & 15)
        else:
            return None
    return device, tuple(parts), tuple(kwargs.items())


KEYS = {"old key": staticmethod(old_key), "new key": staticmethod(NEW_KEY)}
seen = []
orig_launch = host.DirectLaunch.launch


def recording_launch(self, grid, args, kwargs):
    seen.append((args, kwargs))
    return orig_launch(self, grid, args, kwargs)


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
dev = torch.device("cuda")
x = torch.randn(8192, 256, device=dev, requires_grad=True)
g = torch.randn(8192, 256, device=dev)
layers = {}
for name in ("8exp_uniform", "8exp_variable"):
    torch.manual_seed(0)
    layers[name] = triton_moe.MoEMLP(MoEConfig(**SEED_CONFIGS[name])).to(dev)


def fwd_bwd(layer):
    layer.zero_grad(set_to_none=True); x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)


host.DirectLaunch.launch = recording_launch
for layer in layers.values():
    fwd_bwd(layer)
host.DirectLaunch.launch = orig_launch
print(f"# {len(seen)} launches: old and new keys equal:",
      all(old_key(0, a, k) == NEW_KEY(0, a, k) for a, k in seen))
longest = max(seen, key=lambda launch: len(launch[0]))
for label, key in (("old", old_key), ("new", NEW_KEY)):
    begin = time.perf_counter()
    for _ in range(20000):
        key(0, *longest)
    print(f"# {label} key, {len(longest[0])} arguments: {(time.perf_counter() - begin) / 20000 * 1e6:.2f} us")

print("# layer fwd+bwd host us (sync before each), median over rounds x 20")
times = {(name, k): [] for name in layers for k in KEYS}
for r in range(rounds // 2):
    for (name, k) in times:
        host.DirectLaunch.key = KEYS[k]
        for _ in range(20):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fwd_bwd(layers[name])
            times[(name, k)].append(time.perf_counter() - t)
for name in layers:
    o, n = (statistics.median(times[(name, k)]) * 1e6 for k in KEYS)
    print(f"{name:15s} old key {o:7.0f}  new key {n:7.0f}  ({(n - o) / o * 100:+.1f}%)")

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
steps = {}
for mlp, k in (("dense", None), ("triton_uniform", "old key"), ("triton_uniform", "new key"),
               ("triton_variable", "old key"), ("triton_variable", "new key")):
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt, k=k):
        if k:
            host.DirectLaunch.key = KEYS[k]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for i in range(5):
        step(i)
    steps["dense" if mlp == "dense" else f"{mlp[7:]} {k}"] = step
torch.cuda.synchronize()
print(f"# eager seed GPT step, {rounds} rounds round-robin")
print_round_robin(round_robin_ms(steps, rounds), "dense")
