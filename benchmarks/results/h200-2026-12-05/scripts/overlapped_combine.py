"""Session 26 (overlapped_combine.txt): the backward's memory-bound passes on a second stream while a GEMM runs.
The dx combine (sum of each token's k dx rows) reads R·H and writes N·H; dW1 does not need it, so it may run beside
dW1. dW2 does not feed the dx chain, so it may run beside the dx GEMM, its combine and dW1. Part 1 times the pieces
alone and side by side (device µs per launch from CUDA-graph replays, the fork and join captured); part 2 the whole
layer, base against each variant, patched into ops at run time, alternating in one process, and checks that the
outputs and gradients are the same bit for bit (same kernels, same reduction orders: only the streams differ).

    python3 benchmarks/results/h200-2026-12-05/scripts/overlapped_combine.py [configs...]
"""
import sys

import torch
from copy_variants import layer_variants, operands
from sweep_tiles import graph_us  # on sys.path through copy_variants

import triton_moe.layer_ops as layer_ops
import triton_moe.ops as ops
from triton_moe import kernels

ORIGINAL_BACKWARD = ops.expert_mlp_backward
SIDE_STREAMS = {}


def side_stream(device):
    """The device's second stream, made once, before any capture (the warm-up calls)."""
    if device not in SIDE_STREAMS:
        SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return SIDE_STREAMS[device]


def beside(side_work, main_work):
    """(side_work(), main_work()): side_work on the second stream, main_work on the current one, joined."""
    main = torch.cuda.current_stream()
    side = side_stream(main.device)
    side.wait_stream(main)  # the operands are ready
    with torch.cuda.stream(side):
        side_result = side_work()
    main_result = main_work()
    main.wait_stream(side)
    return side_result, main_result


def backward(variant):
    """ops.expert_mlp_backward with the dx combine beside dW1 ("combine"), dW2 beside the dx chain ("dw2"), or
    both ("both"). The tensors the second stream allocates or reads stay referenced until the join."""
    def run(grad_out, x, sorted_x, routing_weights, w1, v1, w2, h_pre, h_up, h_act_weighted, row_to_token,
            row_to_flat, flat_to_row, expert_row_offsets, expert_width_offsets, expert_widths, activation,
            weight_dtype):
        layout = ops._layout(row_to_token, expert_row_offsets, expert_width_offsets, expert_widths)
        grad_out_rows, _ = ops._in_compute_dtype(grad_out, w2.dtype)
        sorted_grad_out = None
        if ops.sorted_rows_pay_off(grad_out_rows, layout.num_rows):
            sorted_grad_out = grad_out_rows.new_empty((layout.num_rows, grad_out.shape[1]))
        dh_pre, dh_up, d_routing_weights = kernels.down_projection_backward(
            grad_out_rows, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation,
            routing_weight_index=row_to_flat, sorted_grad_out=sorted_grad_out)
        dw2_rows = (grad_out_rows, row_to_token) if sorted_grad_out is None else (sorted_grad_out, None)
        top_k = ops._top_k(x, flat_to_row)

        def dw2():
            if h_act_weighted is not None:
                return kernels.weight_grad(h_act_weighted, None, *dw2_rows, layout, out_dtype=weight_dtype)[0]
            return kernels.weight_grad(h_pre, h_up, *dw2_rows, layout, activation=activation,
                                       routing_weights=routing_weights, routing_weight_index=row_to_flat,
                                       out_dtype=weight_dtype)[0]

        def dx_chain():
            dx_rows = kernels.input_grad_rows(dh_pre, w1, dh_up, v1, layout)
            dw1_rows = (x, row_to_token) if sorted_x is None else (sorted_x, None)
            combine = lambda: kernels.combine_rows(dx_rows, flat_to_row, top_k, out_dtype=grad_out.dtype)  # noqa
            dw1 = lambda: kernels.weight_grad(dh_pre, dh_up, *dw1_rows, layout, out_dtype=weight_dtype)  # noqa
            if variant in ("combine", "both"):
                return beside(combine, dw1)
            return combine(), dw1()

        if variant in ("dw2", "both"):
            dw2_grad, (dx, (dw1_grad, dv1_grad)) = beside(dw2, dx_chain)
        else:
            dw2_grad = dw2()
            dx, (dw1_grad, dv1_grad) = dx_chain()
        return dx, d_routing_weights, dw1_grad, dw1_grad.new_empty(0) if dv1_grad is None else dv1_grad, dw2_grad
    return run


def patch(variant):
    """The variant's backward, in ops (the expert MLP's own autograd) and layer_ops (MoEMLP's eager node)."""
    ops.expert_mlp_backward = layer_ops.expert_mlp_backward = (
        ORIGINAL_BACKWARD if variant == "base" else backward(variant))


def pieces(name):
    config, x, o = operands(name)
    with torch.no_grad():
        s, L = o.sort, o.layout
        top_k = s.row_to_token.shape[0] // x.shape[0]
        combine = lambda: kernels.combine_rows(o.dx_rows, s.flat_to_row, top_k)  # noqa: E731
        dw1 = lambda: kernels.weight_grad(o.dh_pre, o.dh_up, *o.dw1_rows, L)  # noqa: E731
        dw2 = lambda: kernels.weight_grad(o.h_act, None, *o.dw2_rows, L)  # noqa: E731
        dx_gemm = lambda: kernels.input_grad_rows(o.dh_pre, o.w1, o.dh_up, o.v1, L)  # noqa: E731
        table = {
            "dx combine": combine,
            "dW1": dw1,
            "dx combine then dW1": lambda: (combine(), dw1()),
            "dx combine | dW1 beside it": lambda: beside(combine, dw1),
            "dW2": dw2,
            "dx GEMM": dx_gemm,
            "dW2 then dx GEMM, combine, dW1": lambda: (dw2(), dx_gemm(), combine(), dw1()),
            "dW2 | dx GEMM, combine, dW1 beside it": lambda: beside(dw2, lambda: (dx_gemm(), combine(), dw1())),
            "down GEMM": lambda: kernels.down_projection(o.h_act, o.w2, L),
            "forward combine": lambda: kernels.combine_rows(o.y_rows, s.flat_to_row, top_k),
        }
        # The forward's combine, split by columns: the combine of the first half of the output's columns beside the
        # down GEMM of the second half. Copies of w2's column halves stand in for strided launches (an upper bound
        # on the gain: the product would need kernels that take column ranges, and no concatenation).
        halves = [o.w2[:, i * (x.shape[1] // 2):(i + 1) * (x.shape[1] // 2)].contiguous() for i in range(2)]
        y_halves = [kernels.down_projection(o.h_act, w, L) for w in halves]
        half_down = lambda i: kernels.down_projection(o.h_act, halves[i], L)  # noqa: E731
        half_combine = lambda i: kernels.combine_rows(y_halves[i], s.flat_to_row, top_k)  # noqa: E731
        table.update({
            "down GEMM, two column halves": lambda: (half_down(0), half_down(1)),
            "combine, two column halves": lambda: (half_combine(0), half_combine(1)),
            "down half 0, (combine 0 | down 1), combine 1": lambda: (
                half_down(0), beside(lambda: half_combine(0), lambda: half_down(1)), half_combine(1)),
        })
        print(f"\n## {name}: pieces, device µs per launch", flush=True)
        for label, fn in table.items():
            print(f"  {label:42s} {graph_us(fn):8.1f}", flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    names = sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8", "h2048_64x1024_top8_swiglu"]
    for name in names:
        pieces(name)
    for name in names:
        layer_variants(name, ("base", "combine", "dw2", "both"), patch, rounds=2, device_time=False)
