"""Is Python slower on autograd's device thread on this host? And the eager seed step with the backward there vs
in the calling thread, round-robin (dense, uniform, variable)."""
import statistics, sys, threading, time, platform
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
from harness import print_round_robin, round_robin_ms
from triton_moe.testing.gpt import get_batch, load_bytes

print("python", platform.python_version(), "threads", torch.get_num_threads())
def loop():
    t = time.perf_counter(); s = 0
    for i in range(200000): s += i
    return (time.perf_counter() - t) * 1e3
main = [loop() for _ in range(7)]
res = []
def worker():
    res.extend(loop() for _ in range(7))
th = threading.Thread(target=worker); th.start(); th.join()
print(f"pure loop ms: main {statistics.median(main):.2f}  other thread {statistics.median(res):.2f}")

class Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x * 1
    @staticmethod
    def backward(ctx, g):
        Probe.ms.append(loop()); return g
Probe.ms = []
x = torch.ones(4, device="cuda", requires_grad=True)
for mt in (True, False):
    Probe.ms = []
    with torch.autograd.set_multithreading_enabled(mt):
        for _ in range(7): Probe.apply(x).sum().backward()
    print(f"loop in a CUDA backward, multithreading={mt}: {statistics.median(Probe.ms):.2f} ms")

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
steps = {}
for mlp in ("dense", "triton_uniform", "triton_variable"):
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for mt in (True, False):
        def step(i, model=model, opt=opt, mt=mt):
            with torch.autograd.set_multithreading_enabled(mt):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(*batches[i % 8])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for i in range(5): step(i)
        steps[f"{mlp[:10]}{'' if mt else ' calling'}"] = step
torch.cuda.synchronize()
times = round_robin_ms(steps, rounds)
print_round_robin(times, "dense")
print("calling-thread dense baseline:")
print_round_robin(times, "dense calling")
