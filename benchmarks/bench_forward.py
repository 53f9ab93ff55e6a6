"""Forward-only time of the MoE MLP layer: Triton vs the stk reference and the other baselines.

    uv run python benchmarks/bench_forward.py --configs seed
"""

from harness import forward_step, parse_args, run_benchmark

if __name__ == "__main__":
    run_benchmark(parse_args(__doc__), "bench_forward", forward_step, flops_multiplier=1)
