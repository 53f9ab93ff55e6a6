"""Time every grouped-GEMM role of the Triton layer under several tile shapes, on one config: the data for
choosing tuning.py's tiles (and later an autotuner's candidates).

    python3 benchmarks/sweep_tiles.py --configs h2048_128x768_top8
    python3 benchmarks/sweep_tiles.py --configs 64exp_uniform 8exp_uniform --graph    # small problems: device µs
    python3 benchmarks/sweep_tiles.py --configs h2048_128x768_top8 --roles dW2 dW1     # some roles only
"""

import torch
from harness import DTYPES, build_layer, device, environment, make_config, parse_args, time_ms, triton_operands

from triton_moe import kernels
from triton_moe.kernels import GemmTiles

CANDIDATES = [
    GemmTiles(128, 128, 64, 8, 3),
    GemmTiles(128, 128, 64, 8, 4),
    GemmTiles(128, 128, 64, 4, 3),
    GemmTiles(128, 128, 64, 4, 4),
    GemmTiles(128, 256, 64, 8, 3),
    GemmTiles(256, 128, 64, 8, 3),
    GemmTiles(64, 128, 64, 4, 4),
    GemmTiles(64, 256, 64, 4, 3),
    GemmTiles(128, 64, 64, 4, 4),
    GemmTiles(64, 64, 64, 4, 4),
    GemmTiles(128, 128, 32, 4, 5),
    GemmTiles(128, 128, 128, 8, 3),
]
# Added for small problems (the seed configs), where the tiles above are too few to fill the GPU.
SMALL_CANDIDATES = [
    GemmTiles(64, 128, 64, 4, 3),
    GemmTiles(128, 64, 64, 4, 3),
    GemmTiles(64, 64, 64, 4, 3),
    GemmTiles(32, 128, 64, 4, 3),
    GemmTiles(64, 128, 128, 4, 3),
    GemmTiles(64, 64, 128, 4, 3),
]


def extra_arguments(parser):
    parser.add_argument("--graph", action="store_true",
                        help="report device µs per launch, from CUDA-graph replays of 20 launches, instead of TFLOP/s "
                             "from timed calls (which include ~0.1 ms of host time per launch), and add small tiles")
    parser.add_argument("--roles", nargs="+", default=None, choices=ROLES, help="time these roles only")


def graph_us(fn, launches=20, replays=5) -> float:
    """Device µs per call of fn, captured `launches` times in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compiled, and the caching allocator warm
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    return time_ms(graph.replay, warmup=1, repeats=replays) * 1e3 / launches


ROLES = ("up", "down", "down bwd dH", "dW2", "dX rows", "dW1")


def roles(layer, x):
    """role -> (function of tiles, FLOPs of that GEMM)."""
    o = triton_operands(layer, x)
    cfg, layout, sort = o.cfg, o.layout, o.sort
    one_product = 2 * o.routed_width * cfg.hidden_size  # FLOPs of one GEMM over all routed rows
    gated_products = one_product * (2 if o.v1 is not None else 1)  # the roles that do both swiglu projections
    return {
        "up": (lambda b: kernels.up_projection(x, o.w1, o.v1, sort.row_to_token, layout, cfg.activation,
                                               o.routing_weights, routing_weight_index=sort.row_to_flat,
                                               sorted_x=o.sorted_x, tiles=b),
               gated_products),
        "down": (lambda b: kernels.down_projection(o.h_act, o.w2, layout, tiles=b), one_product),
        "down bwd dH": (lambda b: kernels.down_projection_backward(
            o.grad_out, o.w2, o.h_pre, o.h_up, sort.row_to_token, layout, o.routing_weights,
            cfg.activation, routing_weight_index=sort.row_to_flat, sorted_grad_out=o.sorted_grad_out, tiles=b),
            one_product),
        "dW2": (lambda b: kernels.weight_grad(o.h_act, None, *o.dw2_rows, layout, tiles=b), one_product),
        "dX rows": (lambda b: kernels.input_grad_rows(o.dh_pre, o.w1, o.dh_up, o.v1, layout, tiles=b),
                    gated_products),
        "dW1": (lambda b: kernels.weight_grad(o.dh_pre, o.dh_up, *o.dw1_rows, layout, tiles=b), gated_products),
    }


def main():
    args = parse_args(__doc__, extra_arguments)
    dtype = DTYPES[args.dtype]
    env = environment()
    unit = "device µs per launch (CUDA-graph replays)" if args.graph else "TFLOP/s per role"
    print(f"# sweep_tiles: {env['device']}, triton {env['triton']}, {env['date']}; {unit}")
    print(f"# command: {env['command']}; triton_moe source {env['source']}")
    candidates = [None] + CANDIDATES + SMALL_CANDIDATES if args.graph else CANDIDATES
    for name in args.configs:
        config, tokens = make_config(name, args.activation)
        x = torch.randn(args.tokens or tokens, config.hidden_size, device=device(), dtype=dtype)
        layer, _ = build_layer("triton", config, dtype)
        with torch.no_grad():
            role_fns = {role: timed for role, timed in roles(layer, x).items() if role in (args.roles or ROLES)}
            print(f"\n## {name} ({args.activation})\n| tiles (M,N,K,warps,stages) | "
                  + " | ".join(role_fns) + " |\n|---|" + "---:|" * len(role_fns))
            for tiles in candidates:  # None: the launchers' defaults (tuning.gemm_tiles)
                cells = []
                for fn, flops in role_fns.values():
                    try:
                        if args.graph:
                            cells.append(f"{graph_us(lambda: fn(tiles)):.1f}")
                        else:
                            ms = time_ms(lambda: fn(tiles), args.warmup, args.repeats)
                            cells.append(f"{flops / ms / 1e9:.0f}")
                    except Exception as error:  # a tile shape that does not fit (shared memory, registers)
                        cells.append(type(error).__name__)
                tile_text = "default" if tiles is None else (
                    tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.num_warps, tiles.num_stages)
                print(f"| {tile_text} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
