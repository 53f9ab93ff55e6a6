"""Device µs per launch of the two gathering GEMMs (up with its row copy, and dA with its fused epilogue and row
copy) under a few tiles near tuning's, from CUDA-graph replays (sweep_tiles.graph_us), at the hidden-2048 configs.

    python3 benchmarks/results/h200-2026-12-04/scripts/gathering_tiles.py [configs...]
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
from harness import build_layer, make_config  # noqa: E402
from sweep_tiles import graph_us, roles  # noqa: E402

from triton_moe.kernels import GemmTiles  # noqa: E402

CANDIDATES = {
    "up": [None, GemmTiles(128, 256, 64, 8, 4), GemmTiles(256, 128, 64, 8, 3), GemmTiles(256, 128, 64, 8, 4),
           GemmTiles(128, 128, 64, 8, 4), GemmTiles(128, 256, 64, 8, 2)],
    "down bwd dH": [None, GemmTiles(128, 256, 64, 8, 3), GemmTiles(256, 128, 64, 8, 3), GemmTiles(256, 128, 64, 8, 4),
                    GemmTiles(128, 128, 64, 8, 4), GemmTiles(128, 256, 64, 8, 5)],
}

for name in sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8"]:
    config, tokens = make_config(name, "relu_squared")
    layer, _ = build_layer("triton", config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        role_fns = roles(layer, x)
        for role, candidates in CANDIDATES.items():
            fn, flops = role_fns[role]
            for tiles in candidates:
                try:
                    us = graph_us(lambda: fn(tiles))
                    cell = f"{us:7.1f} µs  {flops / us / 1e6:5.0f} TFLOP/s"
                except Exception as error:  # shared memory or registers
                    cell = type(error).__name__
                label = "default" if tiles is None else (
                    f"{tiles.tile_m}x{tiles.tile_n}x{tiles.tile_k} w{tiles.num_warps} s{tiles.num_stages}")
                print(f"{name:20s} {role:12s} {str(label):28s} {cell}", flush=True)
