"""Expert-parallel MoE layer: time per forward + backward, the share spent in all-to-all, tokens/s vs one device.

    torchrun --nproc_per_node 2 benchmarks/bench_expert_parallel.py --configs 8exp_variable h2048_64x1024_top8
    uv run torchrun --nproc_per_node 2 benchmarks/bench_expert_parallel.py --smoke     # CPU/gloo smoke check

Each rank routes its own `--tokens` tokens (default: the config's token count, as a per-rank batch) through
ExpertParallelMoEMLP with E/P experts. The step time is the slowest rank's median; the all-to-all time is what the
step spends inside `all_to_all_single` (the count exchange and the four row exchanges, forward and backward; on
a GPU, CUDA events around each call: the wait for the exchange included). The single-device baseline is MoEMLP
with all E experts on rank 0's device, on the P ranks' tokens together: tokens/s of P devices against one.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from harness import CONFIGS, DTYPES, environment, forward_backward_step, make_config, time_ms
import triton_moe
from triton_moe.expert_parallel import ExpertParallelMoEMLP

SMOKE = dict(expert_sizes=[(2, 32), (2, 16)], num_active_experts=2, hidden_size=32)


class AllToAllTimer:
    """Wraps dist.all_to_all_single while active, adding up the time spent in it (ms)."""

    def __init__(self):
        self.cpu_ms, self.events = 0.0, []

    def __enter__(self):
        self.original = dist.all_to_all_single

        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = self.original(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return result
            begin = time.perf_counter()
            result = self.original(*args, **kwargs)
            self.cpu_ms += (time.perf_counter() - begin) * 1e3
            return result

        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original

    def total_ms(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.cpu_ms + sum(start.elapsed_time(end) for start, end in self.events)


def slowest(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def bench_config(name, config, tokens, args, rank, world_size, device, dtype) -> dict:
    torch.manual_seed(0)  # the same global weights on every rank
    single = triton_moe.MoEMLP(config).to(device, dtype)
    layer = ExpertParallelMoEMLP(config).to(device, dtype)
    layer.load_global_state_dict(single.state_dict())
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, config.hidden_size, generator=generator).to(device, dtype)

    step = forward_backward_step(layer, x)
    step_ms = slowest(time_ms(step, args.warmup, args.repeats))
    with AllToAllTimer() as timer:
        for _ in range(args.repeats):
            step()
    all_to_all_ms = slowest(timer.total_ms() / args.repeats)

    single_ms = None
    if rank == 0:  # one device, all ranks' tokens
        x_all = torch.randn(tokens * world_size, config.hidden_size, generator=generator).to(device, dtype)
        single_ms = time_ms(forward_backward_step(single, x_all), args.warmup, args.repeats)
    dist.barrier()
    total_tokens = tokens * world_size
    return dict(config=name, ranks=world_size, tokens_per_rank=tokens, step_ms=step_ms,
                all_to_all_ms=all_to_all_ms, all_to_all_share=all_to_all_ms / step_ms,
                tokens_per_s=total_tokens / step_ms * 1e3, single_device_ms=single_ms,
                single_device_tokens_per_s=total_tokens / single_ms * 1e3 if single_ms else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["8exp_variable", "64exp_variable",
                                                         "h2048_64x1024_top8"], choices=list(CONFIGS))
    parser.add_argument("--smoke", action="store_true", help="a tiny config and few steps (CPU check)")
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "swiglu", "gelu"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default: the config's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="runs/bench_expert_parallel.json")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype or ("bfloat16" if backend == "nccl" else "float32")]
    if args.smoke:
        runs = [("smoke", triton_moe.MoEConfig(**SMOKE, activation=args.activation), args.tokens or 16)]
        args.warmup, args.repeats = 1, 2
    else:
        runs = [(name, *make_config(name, args.activation)) for name in args.configs]
        runs = [(name, config, args.tokens or tokens) for name, config, tokens in runs]

    rows = [bench_config(name, config, tokens, args, rank, world_size, device, dtype)
            for name, config, tokens in runs]
    if rank == 0:
        env = environment()
        print(f"# bench_expert_parallel: {world_size} ranks ({backend}), {env['device']}, {dtype}, "
              f"torch {env['torch']}, triton {env['triton']}, {env['date']}; triton_moe source {env['source']}")
        print("| config | tokens/rank | step ms | all-to-all ms (share) | tokens/s, "
              f"{world_size} ranks | tokens/s, 1 device | speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['config']} | {row['tokens_per_rank']} | {row['step_ms']:.3f} | "
                  f"{row['all_to_all_ms']:.3f} ({100 * row['all_to_all_share']:.0f}%) | {row['tokens_per_s']:.0f} | "
                  f"{row['single_device_tokens_per_s']:.0f} | "
                  f"{row['tokens_per_s'] / row['single_device_tokens_per_s']:.2f}× |")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(environment=env, backend=backend, args=vars(args), results=rows), indent=2))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
