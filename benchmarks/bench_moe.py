"""Per-step profile of one MoE layer (Triton vs the stk reference) and its scaling over batch sizes.

    uv run python benchmarks/bench_moe.py --configs 64exp_variable --profile
    uv run python benchmarks/bench_moe.py --configs 8exp_uniform --batch-sizes 1024 4096 16384
    uv run python benchmarks/bench_moe.py --configs seed --kernels

--profile times each step alone, on the inputs a real forward gives it (CUDA events, median of repeats):
routing, sort, the reference's topology steps, gather, up GEMM, activation, down GEMM, combine, and the
backward kernels. The steps' sum can differ from the layer's time (launch overlap, caching).
--kernels lists every launch of one forward + backward (torch.profiler, GPU only): how many, and their device
time, which against the layer's time shows how much of it is launch overhead.
"""

import torch
import torch.nn.functional as F
from harness import (DTYPES, build_layer, device, environment, forward_backward_step, kernel_launches, make_config,
                     parse_args, time_ms, triton_operands)  # first: it imports triton_moe (the interpreter
# on CPU-only hosts)

import stk
from triton_moe.reference import topology_var
from triton_moe.activations import apply_activation
from triton_moe import kernels
from triton_moe.router_ops import fused_sort_by_expert
from triton_moe.routing import route, sort_by_expert


def triton_steps(layer, x):
    """name -> zero-argument callable, for each step of the Triton layer's forward and backward."""
    o = triton_operands(layer, x)
    cfg, layout, sort = o.cfg, o.layout, o.sort
    top_k = cfg.num_active_experts
    return {
        "routing (router GEMM, softmax, top-k, aux loss)": lambda: layer._route(x),
        "sort by expert": lambda: fused_sort_by_expert(o.routing.expert_indices, cfg.num_experts,
                                                       o.routing.sort_tables),
        "up GEMM (gather, activation and routing weight fused; x's rows copied where kept)":
            lambda: kernels.up_projection(x, o.w1, o.v1, sort.row_to_token, layout, cfg.activation, o.routing_weights,
                                          routing_weight_index=sort.row_to_flat, sorted_x=o.sorted_x),
        "down GEMM": lambda: kernels.down_projection(o.h_act, o.w2, layout),
        "combine": lambda: kernels.combine_rows(o.y_rows, sort.flat_to_row, top_k),
        "bwd: down dH (+ activation grad, routing-weight grads; grad_out's rows copied where it pays off)":
            lambda: kernels.down_projection_backward(
                o.grad_out, o.w2, o.h_pre, o.h_up, sort.row_to_token, layout, o.routing_weights,
                cfg.activation, routing_weight_index=sort.row_to_flat, sorted_grad_out=o.sorted_grad_out),
        "bwd: dW2": lambda: kernels.weight_grad(o.h_act, None, *o.dw2_rows, layout),
        "bwd: dX rows": lambda: kernels.input_grad_rows(o.dh_pre, o.w1, o.dh_up, o.v1, layout),
        "bwd: dX combine": lambda: kernels.combine_rows(o.dx_rows, sort.flat_to_row, top_k),
        "bwd: dW1 (+dV1)": lambda: kernels.weight_grad(o.dh_pre, o.dh_up, *o.dw1_rows, layout),
    }


def reference_steps(layer, x):
    """name -> zero-argument callable, for each step of the stk reference's forward (backward is autograd)."""
    cfg = layer.config
    bs = layer.block_size
    routing = route(x, layer.router.weight, cfg)
    sort = sort_by_expert(routing.expert_indices, cfg.num_experts)
    topology, padded_row_offsets, block_rows_per_expert = topology_var.build_topology(sort.tokens_per_expert, cfg)
    block_columns = torch.tensor([w // bs for w in cfg.expert_widths], device=x.device)
    column_offsets = F.pad(block_columns.cumsum(0), (1, 0))
    num_block_rows = sum(block_rows_per_expert)
    nnz = topology.row_indices.numel()
    block_row_expert, offsets = topology_var.block_row_offsets(block_rows_per_expert, block_columns,
                                                               num_block_rows)
    rows, columns = topology.row_indices, topology.column_indices
    transposed = (topology.column_indices_t, topology.offsets_t, topology.block_offsets_t)
    row_expert = sort.row_expert.long()
    rank = torch.arange(row_expert.numel(), device=x.device) - sort.expert_row_offsets[row_expert]
    padded_rows = padded_row_offsets[row_expert] + rank
    pad = lambda: x.new_zeros(topology.size()[0], cfg.hidden_size).index_copy(0, padded_rows,
                                                                              x[sort.row_to_token])
    x_padded = pad()
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    h_pre = stk.ops.sdd(x_padded, w1.t(), topology)
    h_up = h_pre.data if cfg.is_gated else None  # a stand-in of the same size: the step is timed, not checked
    act = lambda h: apply_activation(cfg.activation, h, h_up)
    h_act = stk.Matrix(topology.size(), act(h_pre.data), rows, columns, offsets, *transposed)
    y_padded = stk.ops.dsd(h_act, w2)
    routing_weights = routing.routing_weights.flatten()[sort.row_to_flat]
    k = cfg.num_active_experts
    return {
        "routing (router GEMM, softmax, top-k, aux loss)": lambda: route(x, layer.router.weight, cfg),
        "sort by expert": lambda: sort_by_expert(routing.expert_indices, cfg.num_experts),
        "topology: padded bins": lambda: topology_var.padded_bins(sort.tokens_per_expert, bs),
        "topology: block-row offsets (host sync)": lambda: topology_var.block_row_offsets(
            (padded_row_offsets.diff() // bs).tolist(), block_columns, num_block_rows),
        "topology: row indices": lambda: topology_var.row_indices(offsets, nnz),
        "topology: column indices": lambda: topology_var.column_indices(block_row_expert, offsets, rows,
                                                                        column_offsets),
        "topology: transpose": lambda: topology_var.transpose(rows, columns, cfg.total_width // bs),
        "topology: matrix": lambda: topology_var.make_topology(topology.size()[0], cfg, rows, columns, offsets,
                                                               transposed),
        "gather + pad": pad,
        "up GEMM (sdd)": lambda: stk.ops.sdd(x_padded, w1.t(), topology),
        "activation": lambda: act(h_pre.data),
        "down GEMM (dsd)": lambda: stk.ops.dsd(h_act, w2),
        "un-pad + weight + combine": lambda: (y_padded[padded_rows].float() * routing_weights[:, None])[
            sort.flat_to_row].view(-1, k, cfg.hidden_size).sum(1),
    }


def extra_arguments(parser):
    parser.add_argument("--profile", action="store_true", help="per-step breakdown instead of the layer time")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="token counts to sweep")
    parser.add_argument("--kernels", action="store_true", help="launches and device time of one forward + backward")


def print_launches(impl, layer, x, args):
    if device() != "cuda":
        print(f"{impl}: --kernels needs a GPU (on the CPU the profiler sees no device launches)")
        return
    step = forward_backward_step(layer, x)
    wall_ms = time_ms(step, args.warmup, args.repeats)
    table, device_us = kernel_launches(step)
    launches = sum(count for _, count, _ in table)
    print(f"\n{impl}: {launches} launches per forward + backward, {device_us / 1e3:.3f} ms of device time, "
          f"{wall_ms:.3f} ms of wall time\n| kernel | launches | device µs |\n|---|---:|---:|")
    for name, count, micros in table:
        print(f"| {name[:90]} | {count} | {micros:.1f} |")


def main():
    args = parse_args(__doc__, extra_arguments)
    dtype, dev = DTYPES[args.dtype], device()
    env = environment()
    print(f"# bench_moe: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(f"# command: {env['command']}; triton_moe source {env['source']}")
    for name in args.configs:
        config, default_tokens = make_config(name, args.activation)
        for tokens in args.batch_sizes or [args.tokens or default_tokens]:
            x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
            print(f"\n## {name}, {tokens} tokens, {args.dtype}")
            if not args.profile and not args.kernels:
                print("| impl | fwd+bwd ms |\n|---|---:|")
            for impl, steps_of in (("triton", triton_steps), ("stk_reference", reference_steps)):
                if impl not in args.impls:
                    continue
                torch.manual_seed(0)
                layer, reason = build_layer(impl, config, dtype)
                if layer is None:
                    print(f"skipped {impl}: {reason}")
                    continue
                if args.kernels:
                    print_launches(impl, layer, x, args)
                    continue
                if not args.profile:
                    ms = time_ms(forward_backward_step(layer, x), args.warmup, args.repeats)
                    print(f"| {impl} | {ms:.3f} |")
                    continue
                with torch.no_grad():
                    steps = steps_of(layer, x)
                    times = {step: time_ms(fn, args.warmup, args.repeats) for step, fn in steps.items()}
                total = sum(times.values())
                print(f"\n{impl}: sum of steps {total:.3f} ms\n| step | ms | share |\n|---|---:|---:|")
                for step, ms in times.items():
                    print(f"| {step} | {ms:.3f} | {100 * ms / total:.0f}% |")


if __name__ == "__main__":
    main()
