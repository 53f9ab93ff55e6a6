"""Forward + backward time of the MoE MLP layer: Triton vs the stk reference and the other baselines.

    uv run python benchmarks/bench_fwd_bwd.py --configs seed realistic [--compile]
"""

from harness import compiled_forward_backward_step, forward_backward_step, parse_args, run_benchmark


def extra_arguments(parser):
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(mode='reduce-overhead') of the Triton layer (GPU)")


if __name__ == "__main__":
    args = parse_args(__doc__, extra_arguments)
    run_benchmark(args, "bench_fwd_bwd", forward_backward_step, flops_multiplier=3,
                  make_compiled_step=compiled_forward_backward_step if args.compile else None)
