"""A prototype: the two gathering GEMMs (up with its activation epilogue, dA with its activation-backward epilogue)
as persistent, warp-specialised kernels over rows sorted beforehand by a gather pass of their own, both operands by
TMA (as kernels/persistent.py's row GEMM), against the portable kernels that gather the rows and write the sorted
copy on the way. Uniform widths, one-projection activations. Device µs per launch from CUDA-graph replays of 20,
and the largest difference of the outputs against the portable kernels.

    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py [configs...]
    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py --split-up   (split_up, session 26)
    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py --layer [configs...]   (session 27)
    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py --layer-dA [configs...]   (session 28)
    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py --split-up CONFIG   (session 28)
    python3 benchmarks/results/h200-2026-12-05/scripts/persistent_gathered.py --row-group G ...   (session 28: the
        persistent kernels' tiles in groups of G row tiles, as the portable kernel's tuning.ROW_GROUP)
"""
import sys

import torch
import triton
import triton.language as tl

from triton_moe import kernels
from triton_moe.kernels.grouped_gemm import _act_backward_epilogue, _act_forward_epilogue
from triton_moe.kernels.host import ceil_div
from triton_moe.kernels.persistent import _descriptor_scratch, _num_programs, _tile_table
from triton_moe.kernels.tuning import GemmTiles


@triton.jit
def _persistent_token_rows_gemm(
    a_ptr, b_ptr, out_ptr, out3_ptr, h_pre_ptr, partials_ptr, routing_weights_ptr, routing_weight_index_ptr,
    expert_row_offsets_ptr, expert_width_offsets_ptr, tile_table_ptr, num_tiles_ptr,
    num_rows, total_width, hidden, max_width, partial_tiles,
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_ROUTING_WEIGHTS: tl.constexpr,
    INDEXED_ROUTING_WEIGHTS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = True,
    ROW_GROUP: tl.constexpr = 1,
):
    """Tiles program_id, program_id + NUM_PROGRAMS, ... of out = A_sorted[rows of e] @ B_eᵀ, hidden -> width."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[num_rows, hidden], strides=[hidden, 1],
                                       block_shape=[TILE_M, TILE_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[total_width, hidden], strides=[hidden, 1],
                                       block_shape=[TILE_N, TILE_K])
    num_tiles = tl.load(num_tiles_ptr)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, warp_specialize=WARP_SPECIALIZE):
        expert = tl.load(tile_table_ptr + 2 * tile_id)
        first_tile = tl.load(tile_table_ptr + 2 * tile_id + 1)
        row_start = tl.load(expert_row_offsets_ptr + expert).to(tl.int32)
        expert_num_rows = tl.load(expert_row_offsets_ptr + expert + 1).to(tl.int32) - row_start
        width_start = tl.load(expert_width_offsets_ptr + expert).to(tl.int32)
        width = tl.load(expert_width_offsets_ptr + expert + 1).to(tl.int32) - width_start
        col_tiles = tl.cdiv(width, TILE_N)
        local_tile = tile_id - first_tile
        if ROW_GROUP == 1:
            row_tile = local_tile // col_tiles
            col_tile = local_tile % col_tiles
        else:  # session 28: groups of ROW_GROUP row tiles, as the portable kernel's ROW_GROUP
            group_tiles = ROW_GROUP * col_tiles
            group_first_row_tile = (local_tile // group_tiles) * ROW_GROUP
            group_row_tiles = tl.minimum(tl.cdiv(expert_num_rows, TILE_M) - group_first_row_tile, ROW_GROUP)
            row_tile = group_first_row_tile + (local_tile % group_tiles) % group_row_tiles
            col_tile = (local_tile % group_tiles) // group_row_tiles
        a_row = row_start + row_tile * TILE_M
        b_row = width_start + col_tile * TILE_N
        acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
        for k_start in range(0, hidden, TILE_K):
            a = a_desc.load([a_row, k_start])
            b = b_desc.load([b_row, k_start]).T
            acc = tl.dot(a, b, acc)
        expert_rows = row_tile * TILE_M + tl.arange(0, TILE_M)
        rows = row_start + expert_rows
        cols = col_tile * TILE_N + tl.arange(0, TILE_N)
        row_mask = expert_rows < expert_num_rows
        out_mask = row_mask[:, None] & (cols < width)[None, :]
        out_offsets = rows[:, None].to(tl.int64) * max_width + cols[None, :]
        routing_weights = None
        weight_slots = rows
        if HAS_ROUTING_WEIGHTS:
            if INDEXED_ROUTING_WEIGHTS:
                weight_slots = tl.load(routing_weight_index_ptr + rows, mask=row_mask, other=0)
            routing_weights = tl.load(routing_weights_ptr + weight_slots, mask=row_mask, other=0.0)
        if EPILOGUE == "plain":  # h_pre only, as a plain GEMM would store it
            tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        elif EPILOGUE == "act_forward":
            _act_forward_epilogue(acc, None, out_ptr, None, out3_ptr, out_offsets, out_mask, rows, row_mask,
                                  routing_weights, col_tile, col_tiles, width, max_width, ACTIVATION, False,
                                  HAS_ROUTING_WEIGHTS, False, TILE_M, TILE_N)
        else:
            _act_backward_epilogue(acc, out_ptr, h_pre_ptr, partials_ptr, out_offsets, out_mask, row_mask,
                                   routing_weights, weight_slots, col_tile, col_tiles, partial_tiles, ACTIVATION,
                                   HAS_ROUTING_WEIGHTS)


ROW_GROUP = 1  # session 28: --row-group G sets it


def _launch(a_sorted, b, layout, tiles, epilogue, activation, routing_weights, routing_weight_index,
            out, out3=None, h_pre=None, partials=None, warp_specialize=True):
    col_tiles = ceil_div(layout.max_width, tiles.tile_n)
    max_tiles = (ceil_div(layout.num_rows, tiles.tile_m) + layout.num_experts) * col_tiles
    tile_table, num_tiles = _tile_table(layout.expert_row_offsets, layout, col_tiles, max_tiles, tiles.tile_m)
    num_programs = min(_num_programs(a_sorted.device), max_tiles)
    with _descriptor_scratch():
        _persistent_token_rows_gemm[(num_programs,)](
            a_sorted, b, out, out3, h_pre, partials, routing_weights, routing_weight_index,
            layout.expert_row_offsets, layout.expert_width_offsets, tile_table, num_tiles,
            layout.num_rows, b.shape[0], b.shape[1], layout.max_width, 0 if partials is None else partials.shape[1],
            EPILOGUE=epilogue, ACTIVATION=activation, HAS_ROUTING_WEIGHTS=routing_weights is not None,
            INDEXED_ROUTING_WEIGHTS=routing_weight_index is not None,
            TILE_M=tiles.tile_m, TILE_N=tiles.tile_n, TILE_K=tiles.tile_k, NUM_PROGRAMS=num_programs,
            WARP_SPECIALIZE=warp_specialize, ROW_GROUP=ROW_GROUP, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)


def up_persistent(x, w1, row_to_token, layout, activation, routing_weights, routing_weight_index, tiles,
                  sorted_x=None):
    sorted_x = kernels.gather_rows(x, row_to_token) if sorted_x is None else sorted_x  # (R, H)
    h_pre = x.new_empty(layout.hidden_shape)
    h_act = torch.empty_like(h_pre)
    _launch(sorted_x, w1, layout, tiles, "act_forward", activation, routing_weights, routing_weight_index,
            h_pre, out3=h_act)
    return h_pre, h_act, sorted_x


def dA_persistent(grad_out, w2, h_pre, row_to_token, layout, activation, routing_weights, routing_weight_index,
                  tiles, sorted_grad_out=None):
    sorted_grad_out = kernels.gather_rows(grad_out, row_to_token) if sorted_grad_out is None else sorted_grad_out
    dh_pre = torch.empty_like(h_pre)
    partials = torch.empty(layout.num_rows, ceil_div(layout.max_width, tiles.tile_n), dtype=torch.float32,
                           device=h_pre.device)
    _launch(sorted_grad_out, w2, layout, tiles, "act_backward", activation, routing_weights, routing_weight_index,
            dh_pre, h_pre=h_pre, partials=partials)
    return dh_pre, partials.sum(1), sorted_grad_out


TILES = [GemmTiles(128, 256, 64, 4, 3), GemmTiles(128, 256, 64, 4, 4), GemmTiles(128, 128, 64, 4, 4)]


def _operands(harness, name):
    """(config, x, every kernel's operands of one forward and backward: harness.triton_operands), bf16, relu²."""
    config, tokens = harness.make_config(name, "relu_squared")
    layer, _ = harness.build_layer("triton", config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        return config, x, harness.triton_operands(layer, x)


def split_up(harness, graph_us, name="h2048_64x1024_top8", tiles=GemmTiles(128, 256, 64, 4, 4)):
    """Session 26: the persistent up over pre-sorted rows with and without warp specialisation, with its activation
    epilogue (h_pre and h_act stored) and with a plain one (h_pre only): which of the two makes it slower than the
    portable kernel. Device µs per launch; the plain epilogue's output is checked against the portable h_pre."""
    config, x, o = _operands(harness, name)
    with torch.no_grad():
        s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
        ref_h_pre, _, _ = kernels.up_projection(x, o.w1, None, s.row_to_token, L, act, rw,
                                                routing_weight_index=s.row_to_flat)
        sx = kernels.gather_rows(x, s.row_to_token)
        h_pre, h_act = x.new_empty(L.hidden_shape), x.new_empty(L.hidden_shape)
        print(f"\n## {name}: persistent up over sorted rows, {tiles}, device µs per launch", flush=True)
        for ws in (True, False):
            for epilogue in ("act_forward", "plain"):
                run = lambda: _launch(sx, o.w1, L, tiles, epilogue, act, rw, s.row_to_flat, h_pre,  # noqa: E731
                                      out3=h_act, warp_specialize=ws)
                try:
                    run()
                    same = torch.equal(h_pre, ref_h_pre)
                    print(f"  warp_specialize={ws!s:5s} epilogue={epilogue:11s} {graph_us(run):8.1f}  "
                          f"h_pre equal to the portable kernel's: {same}", flush=True)
                except Exception as error:
                    print(f"  warp_specialize={ws} epilogue={epilogue}: {type(error).__name__}: {str(error)[:300]}",
                          flush=True)


def patch_layer(variant, persistent_tiles=GemmTiles(128, 256, 64, 4, 3)):
    """Session 27: the layer's up and dA GEMMs as the persistent kernels over rows a gather pass sorted (variant
    "persistent"; session 28: "persistent dA", the dA alone), patched into ops where the layer keeps the sorted rows
    (large 16-bit problems on Hopper) and the activation takes one projection; elsewhere, and for variant "base",
    the portable kernels. The gather lands in the layer's own sorted-rows buffer by a copy (one more pass over R·H
    than a product path would make)."""
    import triton_moe.ops as ops
    if not hasattr(patch_layer, "original"):
        patch_layer.original = (ops.up_projection, ops.down_projection_backward)
    up_original, dA_original = patch_layer.original
    if variant == "base":
        ops.up_projection, ops.down_projection_backward = up_original, dA_original
        return

    def up(x, w1, v1, row_to_token, layout, activation, routing_weights=None, *, routing_weight_index=None,
           sorted_x=None, tiles=None):
        if v1 is not None or sorted_x is None:
            return up_original(x, w1, v1, row_to_token, layout, activation, routing_weights,
                               routing_weight_index=routing_weight_index, sorted_x=sorted_x, tiles=tiles)
        sorted_x.copy_(kernels.gather_rows(x, row_to_token))
        h_pre, h_act, _ = up_persistent(x, w1, row_to_token, layout, activation, routing_weights,
                                        routing_weight_index, persistent_tiles, sorted_x=sorted_x)
        return h_pre, None, h_act

    def dA(grad_out, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation, *,
           routing_weight_index=None, sorted_grad_out=None, tiles=None):
        if h_up is not None or sorted_grad_out is None or routing_weights is None:
            return dA_original(grad_out, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation,
                               routing_weight_index=routing_weight_index, sorted_grad_out=sorted_grad_out,
                               tiles=tiles)
        sorted_grad_out.copy_(kernels.gather_rows(grad_out, row_to_token))
        dh_pre, d_routing_weights, _ = dA_persistent(grad_out, w2, h_pre, row_to_token, layout, activation,
                                                     routing_weights, routing_weight_index, persistent_tiles,
                                                     sorted_grad_out=sorted_grad_out)
        return dh_pre, None, d_routing_weights

    ops.up_projection, ops.down_projection_backward = (up_original if variant == "persistent dA" else up), dA


def main():
    sys.path.insert(0, "benchmarks")
    import harness
    from sweep_tiles import graph_us
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    global ROW_GROUP
    if sys.argv[1:2] == ["--row-group"]:
        ROW_GROUP = int(sys.argv[2])
        del sys.argv[1:3]
        print(f"ROW_GROUP {ROW_GROUP} (the persistent kernels' tiles)", flush=True)
    if sys.argv[1:2] == ["--split-up"]:
        return split_up(harness, graph_us, *sys.argv[2:3])
    if sys.argv[1:2] in (["--layer"], ["--layer-dA"]):
        from copy_variants import layer_variants
        variant = "persistent" if sys.argv[1] == "--layer" else "persistent dA"
        for name in sys.argv[2:] or ["h4096_8x14336_top2"]:
            layer_variants(name, ("base", variant), patch_layer, rounds=2 if variant == "persistent" else 3)
        return
    for name in sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8"]:
        config, x, o = _operands(harness, name)
        with torch.no_grad():
            s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
            up_args = (o.w1, None, s.row_to_token, L, act, rw)
            dA_args = (o.w2, o.h_pre, None, s.row_to_token, L, rw, act)
            ref_h_pre, _, ref_h_act = kernels.up_projection(x, *up_args, routing_weight_index=s.row_to_flat)
            ref_dh, _, ref_drw = kernels.down_projection_backward(o.grad_out, *dA_args,
                                                                  routing_weight_index=s.row_to_flat)
            print(f"\n## {name}, device µs per launch", flush=True)
            base_up = graph_us(lambda: kernels.up_projection(x, *up_args, routing_weight_index=s.row_to_flat,
                                                            sorted_x=o.sorted_x))
            base_dA = graph_us(lambda: kernels.down_projection_backward(
                o.grad_out, *dA_args, routing_weight_index=s.row_to_flat, sorted_grad_out=o.sorted_x))
            gather = graph_us(lambda: kernels.gather_rows(x, s.row_to_token))
            print(f"  portable up, copying {base_up:8.1f}   portable dA, copying {base_dA:8.1f}   gather {gather:7.1f}",
                  flush=True)
            sx = kernels.gather_rows(x, s.row_to_token)
            sg = kernels.gather_rows(o.grad_out, s.row_to_token)
            for tiles in TILES:
                label = f"{tiles.tile_m}x{tiles.tile_n}x{tiles.tile_k} w{tiles.num_warps} s{tiles.num_stages}"
                try:
                    h_pre, h_act, _ = up_persistent(x, o.w1, s.row_to_token, L, act, rw, s.row_to_flat, tiles)
                    dh, drw, _ = dA_persistent(o.grad_out, o.w2, o.h_pre, s.row_to_token, L, act, rw, s.row_to_flat,
                                               tiles)
                    diffs = [float((a.float() - b.float()).abs().max()) for a, b in
                             ((h_pre, ref_h_pre), (h_act, ref_h_act), (dh, ref_dh), (drw, ref_drw))]
                    equal = [torch.equal(a, b) for a, b in
                             ((h_pre, ref_h_pre), (h_act, ref_h_act), (dh, ref_dh), (drw, ref_drw))]
                    up_alone = graph_us(lambda: up_persistent(x, o.w1, s.row_to_token, L, act, rw, s.row_to_flat,
                                                              tiles, sorted_x=sx))
                    dA_alone = graph_us(lambda: dA_persistent(o.grad_out, o.w2, o.h_pre, s.row_to_token, L, act, rw,
                                                              s.row_to_flat, tiles, sorted_grad_out=sg))
                    up_all = graph_us(lambda: up_persistent(x, o.w1, s.row_to_token, L, act, rw, s.row_to_flat,
                                                            tiles))
                    dA_all = graph_us(lambda: dA_persistent(o.grad_out, o.w2, o.h_pre, s.row_to_token, L, act, rw,
                                                            s.row_to_flat, tiles))
                    print(f"  {label:22s} up {up_alone:7.1f} (+gather {up_all:7.1f})  dA {dA_alone:7.1f} "
                          f"(+gather {dA_all:7.1f})  max diff h_pre/h_act/dh_pre/d_rw {diffs} equal {equal}",
                          flush=True)
                except Exception as error:
                    print(f"  {label:22s} {type(error).__name__}: {str(error)[:300]}", flush=True)


if __name__ == "__main__":
    main()
