"""DirectLaunch's key, as it was (a function call per argument) against one loop: the eager seed-GPT step
round-robin in one process (dense; uniform and variable widths with each key), ms per step (CUDA events, median),
and the host time of the keys alone over one step's launches."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
from triton_moe.kernels import host  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402

_INT32_RANGE = range(-2**31, 2**31)


class _Unkeyed(Exception):
    pass


def _argument_key(value):
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    kind = type(value)
    if kind is int:
        return value == 1, value % 16 == 0, value in _INT32_RANGE, value < 2**63
    if kind is float:
        return float
    if value is None or kind is bool:
        return value
    raise _Unkeyed


def old_key(args, kwargs):
    try:
        return host.driver.active.get_current_device(), tuple(map(_argument_key, args)), tuple(kwargs.items())
    except _Unkeyed:
        return None


new_key = host.DirectLaunch.key
keys = {"old": staticmethod(old_key), "new": staticmethod(new_key)}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
steps = {}
for label, mlp, version in [("dense", "dense", "new"), ("uniform, old key", "triton_uniform", "old"),
                            ("uniform, new key", "triton_uniform", "new"), ("variable, old key", "triton_variable", "old"),
                            ("variable, new key", "triton_variable", "new")]:
    torch.manual_seed(0)
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt, version=version):
        host.DirectLaunch.key = keys[version]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(5):
        step(i)
    steps[label] = step
torch.cuda.synchronize()
# the keys alone: every launch's arguments of one uniform step, recorded, then keyed by each function
recorded = []
launch = host.DirectLaunch.launch
host.DirectLaunch.launch = lambda self, grid, args, kwargs: recorded.append((args, kwargs)) or launch(self, grid, args,
                                                                                                    kwargs)
steps["uniform, new key"](0)
host.DirectLaunch.launch = launch
for version in ("old", "new"):
    key = keys[version].__func__
    begin = time.perf_counter()
    for _ in range(200):
        for args, kwargs in recorded:
            key(args, kwargs)
    print(f"# {version} key: {(time.perf_counter() - begin) / 200 * 1e3:.3f} ms for one step's {len(recorded)} launches")
times = {label: [] for label in steps}
for r in range(rounds):
    for label, step in steps.items():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); step(r); e.record(); e.synchronize()
        times[label].append(s.elapsed_time(e))
dense = statistics.median(times["dense"])
print(f"# eager, {rounds} rounds, median ms per step (MoE tax vs dense)")
for label, ts in times.items():
    med = statistics.median(ts)
    print(f"{label:20s} {med:.3f} ms  ({med / dense:.3f}x)  p25 {statistics.quantiles(ts, n=4)[0]:.3f} "
          f"p75 {statistics.quantiles(ts, n=4)[2]:.3f}")
