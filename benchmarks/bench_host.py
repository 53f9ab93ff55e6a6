"""Host time of the eager layer: what one forward + backward costs the host, and what that goes to.

At nanoGPT scale the device runs a layer's forward + backward faster than the host can queue it, so the host's time
is the layer's time in eager mode. For each config and implementation this reports, per forward + backward:
    host µs            perf_counter around the call, the device idle at its start (a synchronize after each)
    launches           kernel launches on the device (CUDA kernels, memsets and copies the profiler sees)
    aten ops           torch operator calls, of which allocations (empty, empty_like, new_empty, zeros...)
    without launches   (triton only) host µs with the Triton kernels' launches left out: what the layer's Python
                       and torch operators cost; the difference is what the launches cost
Medians over --repeats calls, after --warmup.

    uv run python benchmarks/bench_host.py --configs seed
"""

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import (DTYPES, build_layer, environment, forward_backward_step, kernel_launches, make_config,
                     parse_args, synchronize)
from triton_moe.kernels import grouped_gemm, permute, persistent, route, sort

KERNEL_MODULES = (grouped_gemm, permute, persistent, route, sort)  # the modules whose launchers call traceable(kernel)
ALLOCATIONS = ("aten.empty", "aten.empty_like", "aten.new_empty", "aten.zeros", "aten.new_zeros", "aten.zeros_like",
               "aten.empty_strided", "aten.ones_like")


class _OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.allocations = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.allocations += str(func.overloadpacket) in ALLOCATIONS
        return func(*args, **(kwargs or {}))


def host_us(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
        synchronize()
    return statistics.median(times) * 1e6


class _NoLaunch:
    """Stands in for traceable(kernel): the launcher runs, the launch is left out."""

    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def without_launches_us(step, warmup: int, repeats: int) -> float:
    saved = [module.traceable for module in KERNEL_MODULES]
    for module in KERNEL_MODULES:
        module.traceable = _NoLaunch
    try:
        return host_us(step, warmup, repeats)
    finally:
        for module, traceable in zip(KERNEL_MODULES, saved):
            module.traceable = traceable


def _extra_arguments(parser):
    parser.set_defaults(impls=["triton", "grouped_mm"], configs=["seed"])
    parser.add_argument("--calling-thread-backward", action="store_true",
                        help="run the backward in the calling thread instead of autograd's device thread "
                             "(torch.autograd.set_multithreading_enabled(False))")


def main():
    args = parse_args(__doc__.split("\n\n")[0], extra=_extra_arguments)
    torch.autograd.set_multithreading_enabled(not args.calling_thread_backward)
    env = environment()
    print(f"# bench_host: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(f"# command: {env['command']}; triton_moe source {env['source']}")
    print("| config | impl | tokens | host µs | launches | aten ops | allocations | host µs without launches |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    dtype = DTYPES[args.dtype]
    for name in args.configs:
        config, tokens = make_config(name, args.activation)
        tokens = args.tokens or tokens
        for impl in args.impls:
            layer, reason = build_layer(impl, config, dtype)
            if layer is None:
                print(f"# skipped {impl} on {name}: {reason}")
                continue
            x = torch.randn(tokens, config.hidden_size, device=next(layer.parameters()).device, dtype=dtype)
            step = forward_backward_step(layer, x)
            micros = host_us(step, args.warmup, args.repeats)
            launches = sum(count for _, count, _ in kernel_launches(step)[0]) if torch.cuda.is_available() else None
            with _OperatorCount() as count:
                step()
            bare = without_launches_us(step, args.warmup, args.repeats) if impl == "triton" else None
            print(f"| {name} | {impl} | {tokens} | {micros:.0f} | {'-' if launches is None else launches} | "
                  f"{count.calls} | {count.allocations} | {'-' if bare is None else f'{bare:.0f}'} |", flush=True)


if __name__ == "__main__":
    main()
