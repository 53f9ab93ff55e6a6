"""Session 25, run in session 26 (overlapped_copy.txt): the gathering GEMMs without their row copies, each copy made
instead by a gather pass on a second stream while the GEMM runs (the GEMM is bound by its math, the gather by
memory). The gather pass alone costs 238 µs a copy and the copy inside the GEMM 155-190 µs (copy_variants.txt): the
question is how much of the gather the GEMM hides. Part 1 times the pieces (device µs per launch from CUDA-graph
replays, the fork and join captured); part 2 the whole layer, base against overlapped, patched into ops at run
time, alternating in one process, and checks that outputs and gradients are the same bit for bit.

    python3 benchmarks/results/h200-2026-12-05/scripts/overlapped_copy.py [configs...]
"""
import sys

import torch
from copy_variants import gather_into, layer_variants, operands
from sweep_tiles import graph_us  # on sys.path through copy_variants

import triton_moe.ops as ops
from triton_moe import kernels

ORIGINAL = dict(up=ops.up_projection, dA=ops.down_projection_backward)
SIDE_STREAMS = {}


def overlapped(gemm, copy, src, row_to_token):
    """gemm() on the current stream while the gather of src's rows into copy runs on a second stream; joined."""
    main = torch.cuda.current_stream()
    side = SIDE_STREAMS.get(main.device)
    if side is None:  # made once, before any capture (the warm-up calls)
        side = SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)  # src and copy are ready
    with torch.cuda.stream(side):
        gather_into(copy, src, row_to_token)
    result = gemm()
    main.wait_stream(side)  # the copy is complete before the main stream goes on
    return result


def patch(variant):
    ops.up_projection, ops.down_projection_backward = ORIGINAL["up"], ORIGINAL["dA"]
    if variant != "overlap":
        return

    def up(x, w1, v1, row_to_token, layout, activation, rw=None, *, sorted_x=None, **kw):
        def gemm():
            return ORIGINAL["up"](x, w1, v1, row_to_token, layout, activation, rw, **kw)
        return gemm() if sorted_x is None else overlapped(gemm, sorted_x, x, row_to_token)

    def dA(grad_out, w2, h_pre, h_up, row_to_token, layout, rw, activation, *, sorted_grad_out=None, **kw):
        def gemm():
            return ORIGINAL["dA"](grad_out, w2, h_pre, h_up, row_to_token, layout, rw, activation, **kw)
        return gemm() if sorted_grad_out is None else overlapped(gemm, sorted_grad_out, grad_out, row_to_token)
    ops.up_projection, ops.down_projection_backward = up, dA


def pieces(name):
    config, x, o = operands(name)
    with torch.no_grad():
        s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
        copy = torch.empty_like(o.sorted_x)
        up = lambda rows_copy: kernels.up_projection(  # noqa: E731
            x, o.w1, o.v1, s.row_to_token, L, act, rw, routing_weight_index=s.row_to_flat, sorted_x=rows_copy)
        dA = lambda rows_copy: kernels.down_projection_backward(  # noqa: E731
            o.grad_out, o.w2, o.h_pre, o.h_up, s.row_to_token, L, rw, act, routing_weight_index=s.row_to_flat,
            sorted_grad_out=rows_copy)
        table = {
            "up, copying (base)": lambda: up(o.sorted_x),
            "up, no copy": lambda: up(None),
            "up, no copy | gather on a second stream": lambda: overlapped(lambda: up(None), copy, x, s.row_to_token),
            "dA, copying (base)": lambda: dA(o.sorted_x),
            "dA, no copy": lambda: dA(None),
            "dA, no copy | gather on a second stream": lambda: overlapped(lambda: dA(None), copy, o.grad_out,
                                                                          s.row_to_token),
        }
        print(f"\n## {name}: pieces, device µs per launch", flush=True)
        for label, fn in table.items():
            print(f"  {label:42s} {graph_us(fn):8.1f}", flush=True)
        up(o.sorted_x)
        overlapped(lambda: up(None), copy, x, s.row_to_token)
        torch.cuda.synchronize()
        print(f"  the overlapped copy equals the GEMM's: {torch.equal(copy, o.sorted_x)}", flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    names = sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8", "h2048_64x1024_top8_swiglu"]
    for name in names:
        pieces(name)
    for name in names:
        layer_variants(name, ("base", "overlap"), patch, rounds=3, device_time=False)
