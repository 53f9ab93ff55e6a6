"""Time every grouped-GEMM role of the Triton layer under several tile shapes, on one config: the data for
choosing tuning.py's tiles (and later an autotuner's candidates).

    python3 benchmarks/sweep_tiles.py --configs h2048_128x768_top8
"""

import torch
from harness import DTYPES, build_layer, device, environment, make_config, parse_args, time_ms, triton_operands

from triton_moe import kernels
from triton_moe.kernels import GemmBlocks

CANDIDATES = [
    GemmBlocks(128, 128, 64, 8, 3),
    GemmBlocks(128, 128, 64, 8, 4),
    GemmBlocks(128, 128, 64, 4, 3),
    GemmBlocks(128, 128, 64, 4, 4),
    GemmBlocks(128, 256, 64, 8, 3),
    GemmBlocks(256, 128, 64, 8, 3),
    GemmBlocks(64, 128, 64, 4, 4),
    GemmBlocks(64, 256, 64, 4, 3),
    GemmBlocks(128, 64, 64, 4, 4),
    GemmBlocks(64, 64, 64, 4, 4),
    GemmBlocks(128, 128, 32, 4, 5),
    GemmBlocks(128, 128, 128, 8, 3),
]


def roles(layer, x):
    """role -> (function of blocks, FLOPs of that GEMM)."""
    o = triton_operands(layer, x)
    cfg, layout = o.cfg, o.layout
    one_product = 2 * layout.h_numel * cfg.hidden_size  # FLOPs of one GEMM over all routed rows
    gated_products = one_product * (2 if o.v1 is not None else 1)  # the roles that do both swiglu projections
    return {
        "up": (lambda b: kernels.up_projection(x, o.w1, o.v1, layout.row_to_token, *layout.offsets(),
                                               layout.h_numel, cfg.activation, o.row_weights, blocks=b),
               gated_products),
        "down": (lambda b: kernels.down_projection(o.h_act, o.w2, *layout.offsets(), layout.num_rows, blocks=b),
                 one_product),
        "down bwd dH": (lambda b: kernels.down_projection_backward(
            o.grad_out, o.w2, o.h_pre, o.h_up, layout.row_to_token, *layout.offsets(), o.row_weights,
            cfg.activation, blocks=b), one_product),
        "dW2": (lambda b: kernels.weight_grad(o.h_act, None, o.grad_out, layout.row_to_token, *layout.offsets(),
                                              blocks=b), one_product),
        "dX rows": (lambda b: kernels.input_grad_rows(o.dh_pre, o.w1, o.dh_up, o.v1, *layout.offsets(),
                                                      layout.num_rows, blocks=b), gated_products),
        "dW1": (lambda b: kernels.weight_grad(o.dh_pre, o.dh_up, x, layout.row_to_token, *layout.offsets(),
                                              blocks=b), gated_products),
    }


def main():
    args = parse_args(__doc__)
    dtype = DTYPES[args.dtype]
    env = environment()
    print(f"# sweep_tiles: {env['device']}, triton {env['triton']}, {env['date']}; TFLOP/s per role")
    for name in args.configs:
        config, tokens = make_config(name, args.activation)
        x = torch.randn(args.tokens or tokens, config.hidden_size, device=device(), dtype=dtype)
        layer, _ = build_layer("triton", config, dtype)
        with torch.no_grad():
            role_fns = roles(layer, x)
            print(f"\n## {name} ({args.activation})\n| tiles (M,N,K,warps,stages) | "
                  + " | ".join(role_fns) + " |\n|---|" + "---:|" * len(role_fns))
            for blocks in CANDIDATES:
                cells = []
                for fn, flops in role_fns.values():
                    try:
                        ms = time_ms(lambda: fn(blocks), args.warmup, args.repeats)
                        cells.append(f"{flops / ms / 1e9:.0f}")
                    except Exception as error:  # a tile shape that does not fit (shared memory, registers)
                        cells.append(type(error).__name__)
                tiles = (blocks.block_m, blocks.block_n, blocks.block_k, blocks.num_warps, blocks.num_stages)
                print(f"| {tiles} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
