"""The persistent weight gradients (dW2, dW1 over sorted rows) with their tiles in groups of HIDDEN_GROUP hidden
tiles (tuning.HIDDEN_GROUP, applied past tuning.HIDDEN_GROUP_MIN_SLICE_BYTES of an expert's hidden activations),
device µs per launch from CUDA-graph replays, checked bit for bit against the ungrouped order; then the whole
layer's forward + backward under each grouping, alternating.

    python3 benchmarks/results/h200-2026-12-05/scripts/hidden_groups.py [--rounds N]
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


def set_group(group):
    tuning.HIDDEN_GROUP_MIN_SLICE_BYTES = 0 if group > 1 else 2**62
    tuning.HIDDEN_GROUP = group


def pieces(name, groups):
    config, x, o = operands(name)
    L = o.layout
    flop = 2.0 * L.num_rows * config.hidden_size * L.max_width

    def dW2():
        return kernels.weight_grad(o.h_act, None, *o.dw2_rows, L)[0]

    def dW1():
        return kernels.weight_grad(o.dh_pre, None, *o.dw1_rows, L)[0]

    print(f"\n## {name}: device µs per launch (TFLOP/s), bit-equal to HIDDEN_GROUP 1", flush=True)
    with torch.no_grad():
        reference = None
        for group in groups:
            set_group(group)
            outputs = [dW2().clone(), dW1().clone()]
            if reference is None:
                reference = outputs
            equal = all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
            dW2_us, dW1_us = graph_us(dW2), graph_us(dW1)
            print(f"  HIDDEN_GROUP {group:2d}  dW2 {dW2_us:8.1f} ({flop / dW2_us / 1e6:5.1f})  dW1 {dW1_us:8.1f} "
                  f"({flop / dW1_us / 1e6:5.1f})  equal {equal}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for _ in range(args.rounds):
        pieces("h4096_8x14336_top2", (1, 2, 4, 8))
        pieces("h2048_64x1024_top8", (1, 2))
    variants = {"group 1": 1, "group 2": 2, "group 4": 4}
    layer_variants("h4096_8x14336_top2", tuple(variants), lambda v: set_group(variants[v]), rounds=args.rounds)


if __name__ == "__main__":
    main()
