"""The gathering GEMMs' row copy loaded a K step ahead of its store (tuning.COPY_ROWS_AHEAD_ROLES, the kernel's
COPY_AHEAD, which `../copy_ahead.diff` adds to main at 8adabac) against the copy loaded and stored in one step.
Part 1: up and dA as the layer runs them (with their row copies), device µs per launch from CUDA-graph replays,
each variant's outputs checked bit for bit against the copy in step; up and dA without the copy beside them.
Part 2: the whole layer's forward + backward under each variant, alternating.

    python3 benchmarks/results/h100-2026-12-05/scripts/copy_ahead.py [--configs ...] [--layer-configs ...]
        [--rounds N] [--no-layer]
"""
import argparse
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/results/h200-2026-12-05/scripts")
from copy_variants import layer_variants, operands  # noqa: E402
from sweep_tiles import graph_us  # noqa: E402

from triton_moe import kernels  # noqa: E402
from triton_moe.kernels import tuning  # noqa: E402

VARIANTS = {"copy in step": (), "up ahead": ("up",), "up, dA ahead": ("up", "down_backward")}


def set_variant(variant):
    tuning.COPY_ROWS_AHEAD_ROLES = VARIANTS[variant]


def pieces(name):
    config, x, o = operands(name)
    s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
    gated = o.h_up is not None
    flop = 2.0 * L.num_rows * config.hidden_size * L.max_width * (2 if gated else 1)
    sorted_x = x.new_empty(L.num_rows, config.hidden_size)  # [R, H]
    sorted_grad_out = x.new_empty(L.num_rows, config.hidden_size)  # [R, H]

    def up(copy=True):
        return kernels.up_projection(x, o.w1, o.v1, s.row_to_token, L, act, rw, routing_weight_index=s.row_to_flat,
                                     sorted_x=sorted_x if copy else None)

    def dA(copy=True):
        return kernels.down_projection_backward(o.grad_out, o.w2, o.h_pre, o.h_up, s.row_to_token, L, rw, act,
                                                routing_weight_index=s.row_to_flat,
                                                sorted_grad_out=sorted_grad_out if copy else None)

    print(f"\n## {name}: device µs per launch (TFLOP/s); outputs and copies bit-equal to the copy in step", flush=True)
    with torch.no_grad():
        set_variant("copy in step")
        print(f"  no copy       up {graph_us(lambda: up(False)):8.1f}  dA {graph_us(lambda: dA(False)):8.1f}",
              flush=True)
        reference = None
        for variant in VARIANTS:
            set_variant(variant)
            outputs = [t.clone() for t in (*up(), *dA(), sorted_x, sorted_grad_out) if t is not None]
            if reference is None:
                reference = outputs
            equal = all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
            up_us, dA_us = graph_us(up), graph_us(dA)
            print(f"  {variant:13s} up {up_us:8.1f} ({flop / up_us / 1e6:5.1f})  dA {dA_us:8.1f} "
                  f"({flop / dA_us / 1e6:5.1f})  equal {equal}", flush=True)
    set_variant("copy in step")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["h2048_64x1024_top8", "h2048_128x768_top8",
                                                          "h2048_64x1024_top8_swiglu", "h4096_8x14336_top2"])
    parser.add_argument("--layer-configs", nargs="+", default=["h2048_64x1024_top8", "h2048_128x768_top8"])
    parser.add_argument("--variants", nargs="+", default=["copy in step", "up ahead"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-layer", action="store_true")
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for name in args.configs:
        for _ in range(args.rounds):
            pieces(name)
    if not args.no_layer:
        for name in args.layer_configs:
            layer_variants(name, tuple(args.variants), set_variant, rounds=args.rounds)


if __name__ == "__main__":
    main()
