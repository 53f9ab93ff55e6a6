"""Forward + backward time of the MoE MLP layer: Triton vs the stk reference and the other baselines.

    uv run python benchmarks/bench_fwd_bwd.py --configs seed realistic [--compile] [--graph] [--calling-thread-backward]

ScatterMoE (--impls scattermoe, uniform widths) runs where its package imports: with a copy of it at
.carry/site/scattermoe, from the repository root,

    PYTHONPATH=$PWD/.carry/site uv run python benchmarks/bench_fwd_bwd.py --configs realistic --impls triton scattermoe

elsewhere its rows are reported as skipped, with the reason. The table's "speedup vs scattermoe" column is
ScatterMoE's time over each row's, per config.
"""

import torch

from harness import (compiled_forward_backward_step, forward_backward_step, graphed_forward_backward_step,
                     parse_args, run_benchmark)


def extra_arguments(parser):
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(mode='reduce-overhead') of the Triton layer (GPU)")
    parser.add_argument("--graph", action="store_true",
                        help="also time the Triton layer's forward + backward replayed from one CUDA graph (GPU)")
    parser.add_argument("--calling-thread-backward", action="store_true",
                        help="run every implementation's backward in the calling thread instead of autograd's device "
                             "thread (torch.autograd.set_multithreading_enabled(False)): on hosts where Python runs "
                             "slower off the main thread, this shortens launch-bound steps")


if __name__ == "__main__":
    args = parse_args(__doc__, extra_arguments)
    variants = {}
    if args.compile:
        # Only the Triton layer: the baselines synchronise with the host, and compiling stk and the grouped_mm layer
        # this way (graph breaks and recompilations) does not finish in minutes.
        variants["torch.compile reduce-overhead"] = compiled_forward_backward_step
    if args.graph:
        variants["CUDA graph"] = graphed_forward_backward_step
    with torch.autograd.set_multithreading_enabled(not args.calling_thread_backward):
        run_benchmark(args, "bench_fwd_bwd", forward_backward_step, flops_multiplier=3, triton_variants=variants)
