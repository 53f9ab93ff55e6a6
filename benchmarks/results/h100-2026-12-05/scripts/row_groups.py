"""The portable gathering GEMMs (up with its row copy; dA with its fused epilogue and row copy) with their tiles in
groups of ROW_GROUP row tiles (tuning.ROW_GROUP, applied past tuning.ROW_GROUP_MIN_WEIGHT_BYTES of weight slice),
device µs per launch from CUDA-graph replays, checked bit for bit against the ungrouped order; then the whole
layer's forward + backward under each grouping, alternating, two rounds.

    python3 benchmarks/results/h100-2026-12-05/scripts/row_groups.py
"""
import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "benchmarks/results/h200-2026-12-05/scripts")
import harness  # noqa: E402
from copy_variants import layer_variants  # noqa: E402
from persistent_gathered import _operands  # noqa: E402
from sweep_tiles import graph_us  # noqa: E402

from triton_moe import kernels  # noqa: E402
from triton_moe.kernels import tuning  # noqa: E402


def set_group(group):
    tuning.ROW_GROUP_MIN_WEIGHT_BYTES = 0 if group > 1 else 2**62
    tuning.ROW_GROUP = group


def pieces(name, groups):
    config, x, o = _operands(harness, name)
    s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
    flop = 2.0 * L.num_rows * config.hidden_size * L.max_width

    def up():
        return kernels.up_projection(x, o.w1, None, s.row_to_token, L, act, rw, routing_weight_index=s.row_to_flat,
                                     sorted_x=o.sorted_x)

    def dA():
        return kernels.down_projection_backward(o.grad_out, o.w2, o.h_pre, None, s.row_to_token, L, rw, act,
                                                routing_weight_index=s.row_to_flat, sorted_grad_out=o.sorted_x)

    print(f"\n## {name}: device µs per launch (TFLOP/s), bit-equal to ROW_GROUP 1", flush=True)
    with torch.no_grad():
        reference = None
        for group in groups:
            set_group(group)
            outputs = [t.clone() for t in (*up(), *dA()) if t is not None]
            if reference is None:
                reference = outputs
            equal = all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
            up_us, dA_us = graph_us(up), graph_us(dA)
            print(f"  ROW_GROUP {group:2d}  up {up_us:8.1f} ({flop / up_us / 1e6:5.1f})  dA {dA_us:8.1f} "
                  f"({flop / dA_us / 1e6:5.1f})  equal {equal}", flush=True)


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    pieces("h4096_8x14336_top2", (1, 4, 8, 16))
    pieces("h2048_64x1024_top8", (1, 8))
    variants = {"group 1": 1, "group 8": 8, "group 16": 16}
    layer_variants("h4096_8x14336_top2", tuple(variants), lambda v: set_group(variants[v]), rounds=2)


if __name__ == "__main__":
    main()
