"""Forward + backward time of the MoE MLP layer: Triton vs the stk reference and the other baselines.

    uv run python benchmarks/bench_fwd_bwd.py --configs seed realistic
"""

from harness import forward_backward_step, parse_args, run_benchmark

if __name__ == "__main__":
    run_benchmark(parse_args(__doc__), "bench_fwd_bwd", forward_backward_step, flops_multiplier=3)
