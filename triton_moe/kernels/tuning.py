"""Tile sizes, warps and pipeline stages of every kernel, per device kind and dtype, with the reasons.

No autotuning yet: every launcher takes `blocks: GemmBlocks | None` and falls back on
`gemm_blocks(dtype, role, gated, rows_x_hidden)`, a table keyed on the role and a shape class measured on the H100,
so an autotuner can later pass its own choice without touching the kernels.
"""

import functools
from dataclasses import dataclass

import torch

from triton_moe.kernels.host import next_power_of_2, running_in_interpreter


@dataclass(frozen=True)
class GemmBlocks:
    """Tile shape of one grouped-GEMM launch: output tile block_m x block_n, reduction steps of block_k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            size = getattr(self, name)
            # tl.dot needs every dimension to be a power of two and at least 16.
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


# Triton's interpreter runs each program as numpy operations on the CPU: the cost is per program and per
# operation, hardly per flop. 128-wide tiles keep the number of programs small for the test shapes while
# widths 16, 48, 200 and hidden sizes 32, 64, 96 still exercise partial tiles, and width 200 two tiles per expert
# (test_grouped_gemm passes smaller tiles explicitly to cover more tiles per expert).
INTERPRETER_BLOCKS = GemmBlocks(block_m=128, block_n=128, block_k=128, num_warps=1, num_stages=1)

# Per role, the tiles that measured best in benchmarks/results/h100-2026-11-25/sweep.md (hidden 2048, 128x768 and
# 64x1024 top-8, relu_squared), in TFLOP/s there; the 2026-11-24 sweep, which added hidden 4096 with 8x14336
# top-2, ranked them the same. With the ragged strides declared multiples of 16 (grouped_gemm.WIDTH_MULTIPLE) wide
# tiles win: 128x256 with 8 warps for the two roles that write [R, H] rows from the ragged buffer and for the two
# gathered ones (the up projection, and the down backward's dA GEMM, timed with its row pass in
# h100-2026-11-25/dh_tiles.md, where 128x128x128 gives 323). The weight gradients (dW1 and dW2 are the same GEMM
# shape), which reduce over the ragged rows, prefer 128x128 tiles.
GPU_16BIT_ROLE_BLOCKS = {
    # up: 465/526. 4 stages (with the routing weight loaded before the K loop): 0.84 vs 0.87 ms per launch at
    # 128x768, the same at 64x1024 and with variable widths, 11.2 vs 7.4 ms at hidden 4096 (session6/stages.md);
    # a whole 128x768 step with them was 0.11 ms slower from a CUDA graph, on another H100 than the baseline: kept
    # at 3 until an A/B on one machine says otherwise.
    "up": GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
    "down": GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),  # 472/565
    # dA + row pass: 392 vs 358 (3 stages); with variable widths 1.16 vs 1.36 ms, at 64x1024 1.24 vs 1.19 ms.
    # With the weights by TMA and the fused epilogue (large problems), 4 stages against 3: 1.20 vs 1.25 ms at
    # 128x768, 1.36 vs 1.39 at 64x1024, 1.45 vs 1.51 with variable widths (h100-2026-11-26/rows_ab.md, medians).
    "down_backward": GemmBlocks(128, 256, 64, num_warps=8, num_stages=4),
    "input_grad": GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),  # 489/568
    "weight_grad": GemmBlocks(128, 128, 64, num_warps=8, num_stages=4),  # dW2 348/409, dW1 349/411
    # The same GEMM reading the token rows already sorted, by TMA (session8/sweep_dw.md, dW2/dW1 TFLOP/s): 529/532
    # and 637/610, against 533/533 and 596/582 with 4 stages; with variable widths 513/511 (519/513).
    "weight_grad_sorted": GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
}
# A gated (swiglu) activation doubles the operand tiles of the up projection (two weights, two accumulators), and
# the outputs of the weight gradient (dW1 with dV1): 128x256 runs out of shared memory or registers there.
# Measured in h100-2026-11-25/sweep_swiglu.md (hidden 2048, 128x768 top-8, TFLOP/s of the role's GEMMs). The input
# gradient's second product runs in a K loop of its own, so it takes the one-product tiles (none here): 515 TFLOP/s
# with 128x256 at 128x768, against 426-461 for both products in one loop with 128x128, then the widest tile that
# fitted (h100-2026-11-26/sweep_dx_swiglu.md).
GPU_16BIT_GATED_BLOCKS = {
    "up": GemmBlocks(128, 128, 64, num_warps=8, num_stages=4),  # 445 (454 with 3 stages; 430 vs 387 the day before)
    "weight_grad": GemmBlocks(64, 128, 64, num_warps=4, num_stages=4),  # dW1 + dV1: 342 vs 318
    # From sorted rows by TMA: 500 at 128x768, 528 with variable widths (4 stages: 494, 489; 64x128 tiles: 484,
    # 487; session8/sweep_dw_swiglu.md).
    "weight_grad_sorted": GemmBlocks(128, 128, 64, num_warps=8, num_stages=3),
}
GEMM_ROLES = tuple(GPU_16BIT_ROLE_BLOCKS)
# The GEMMs that write the ragged buffer (up, and dA of the down projection's backward) reduce over the hidden
# size. Past hidden 2048 their 4-stage pipeline collapses: at hidden 4096 (8x14336 top-2) up takes 11.2 ms and dA
# 10.9 ms with 4 stages, 7.4 and 7.8 with 3 (session6/stages.md; the only shape measured past 2048). Up has 3
# stages anyway; dA takes 3 there.
LONG_HIDDEN = 2048
GPU_16BIT_LONG_HIDDEN_BLOCKS = {
    "down_backward": GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
}

# Small problems (the seed configs: hidden 256, 8192 to 32768 rows) make too few 128x256 tiles to fill the GPU:
# 64-row tiles with 4 warps run every role but the weight gradients faster there, and the weight gradients do as
# well with 128x64 as with 128x128 and 8 warps. Device µs per launch from CUDA-graph replays in
# h100-2026-11-25/sweep_seed.md ("default" there is this table), summed over the six GEMMs of a step, the large
# tiles (the (128, 256, 64, 8, 3) and (128, 128, 64, 8, 4) rows) -> these: 8 experts 89.9 -> 74.4, 16 experts
# 61.8 -> 53.2, 64 experts 149.7 -> 142.8, 128 experts 176.5 -> 167.8. The gated up and dW1 + dV1 were not swept at
# these sizes and keep the gated tiles above; the gated input gradient (two one-product loops) takes these.
SMALL_PROBLEM_ROWS_X_HIDDEN = 2**24  # rows * hidden below this is a small problem (seed configs: at most 2**23)
GPU_16BIT_SMALL_BLOCKS = {
    "up": GemmBlocks(64, 128, 64, num_warps=4, num_stages=3),
    "down": GemmBlocks(64, 128, 64, num_warps=4, num_stages=3),
    "down_backward": GemmBlocks(64, 128, 64, num_warps=4, num_stages=3),
    "input_grad": GemmBlocks(64, 128, 64, num_warps=4, num_stages=3),
    "weight_grad": GemmBlocks(128, 64, 64, num_warps=4, num_stages=3),
    # sorted_rows_pay_off keeps small problems on gathered rows; a caller handing sorted rows anyway gets the tile
    # that measured best for them (session8/sweep_dw_seed.md: 9.9 / 13.1 / 24.2 µs per dW at 8 / 64 / 128 experts).
    "weight_grad_sorted": GemmBlocks(128, 128, 64, num_warps=4, num_stages=3),
}

# H100, fp32 operands with input_precision="ieee" (TF32 would miss the 1e-4 accuracy target): the dot runs
# as FMAs on the CUDA cores and holds both operand tiles in registers, so 64x64x32 with 4 warps avoids spills.
GPU_FP32_BLOCKS = GemmBlocks(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)

# Permute kernels and the down backward's row pass walk whole rows: up to 1024 elements of a row a step is 8 (fp32)
# or 16 (fp16) contiguous bytes per thread with 4 warps, enough for full-width memory transactions.
PERMUTE_MAX_BLOCK_H = 1024
PERMUTE_NUM_WARPS = 4
# The row pass takes several short rows a program, about 2048 elements in all (8 rows of width 256): one program
# per row of 256 had 2 elements a thread and took 28 µs for the 32768 rows of a seed config.
ROW_PASS_ELEMENTS = 2048
# Triton's interpreter runs every program instance in Python, so its time follows the number of programs: there the
# row-wise kernels (the row pass, the combine) take up to this many elements a program.
INTERPRETER_ROW_ELEMENTS = 2**16


# Routing and the counting sort (kernels/router.py).
# The route's forward works on [tile tokens, EXPERTS_POW2] fp32 tiles (logits, probabilities, scores, slots) of
# 2048 elements with 4 warps: against 8 warps, 13.6 -> 10.0 µs at 4096 tokens and 128 experts, 48.8 -> 43.9 µs
# at 16384 tokens, 21.9 -> 18.4 µs at 16384 tokens and 64 experts (H100, session7/route_sweep.md).
# Its backward takes tiles of 512 elements, 8 a thread (2 warps up to 512 experts; past that a tile is one token
# and up to 8 warps): against 2048 elements and 8 warps, 9.1 -> 7.4 µs at 4096 tokens and 128 experts, 24.0 ->
# 20.7 at 16384 tokens (same run). (Tiles of 4096 elements, or 16 a thread, spilled in the backward.)
ROUTE_TILE_ELEMENTS = 2048
ROUTE_FORWARD_NUM_WARPS = 4
ROUTE_BACKWARD_TILE_ELEMENTS = 512
ROUTE_BACKWARD_ELEMENTS_PER_THREAD = 8
# Triton's interpreter pays per program and per operation rather than per element: 4x larger tiles there keep the
# CPU tests quick, and still take several tiles a block from 129 experts on.
INTERPRETER_ROUTE_TILE_ELEMENTS = 8192
# The forward covers up to 64 tokens a program, a tile at a time. A small batch takes smaller blocks, down to one
# tile, until ROUTE_MIN_BLOCKS programs run: at 4096 tokens the route kernel took 13.9 -> 7.6 µs with 64 experts
# (blocks of 64 -> 32 tokens) and 28.3 -> 13.8 µs with 128 (64 -> 16 tokens) on the H100 (route_blocks.md).
ROUTE_BLOCK_TOKENS = 64
ROUTE_MIN_BLOCKS = 256
# The [blocks, E] tables of the route (one row per block) are scanned over the blocks by one program per
# TABLE_EXPERT_CHUNK experts, TABLE_TILE_ELEMENTS at a time (the 256 x 128 tables of 16384 tokens and 128 experts:
# 8 programs of one step each). Those loads were the latency of one program per table, 7 µs a step, when a single
# program walked the whole table (route_blocks.md). The last program scans the experts' totals TABLE_SCAN_CHUNK at
# a time.
TABLE_EXPERT_CHUNK = 16
TABLE_TILE_ELEMENTS = 4096
TABLE_SCAN_CHUNK = 1024
TABLE_NUM_WARPS = 4
# Without the route's counts, the sort counts blocks of 256 assignments itself. The rank of an assignment compares
# it with every other of its block, 32 at a time: the work of a block grows with the square of its size.
SORT_BLOCK_ASSIGNMENTS = 256
RANK_CHUNK = 32
# The counting zeroes its row of the [blocks, E] table 1024 experts a step, and the scatter moves 1024 assignments
# a program: 8 elements per thread with 4 warps.
ZERO_CHUNK = 1024
SCATTER_BLOCK = 1024
SORT_NUM_WARPS = 4


# The weight gradients read the token rows in expert-sorted order, copied by the GEMMs that gather them, from this
# many rows * hidden on (and only on a device with TMA). At hidden 2048 on the H100 a copy costs its GEMM ~0.25 ms
# and its weight gradient gains ~0.35-0.4 ms: the step took 6.59-6.95 -> 6.34-6.38 ms at 128x768 and 7.63-7.97 ->
# 7.19-7.27 ms at 64x1024 (session8/ab_sorted.md). In the seed configs (at most 2**23) the copies cost more than
# they save: from a CUDA graph 0.217 -> 0.235 ms at 64 experts, 0.244 -> 0.264 ms at 128.
SORTED_ROWS_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN


@functools.lru_cache(maxsize=16)
def has_tma(device: torch.device) -> bool:
    """Whether kernels on `device` can load through TMA descriptors: Hopper (sm_90) and later NVIDIA GPUs, and
    Triton's interpreter, which runs the same descriptor loads on the CPU (so the CPU tests cover that path)."""
    if running_in_interpreter():
        return True
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (9, 0)


def tma_reads_rows(num_rows: int, row_bytes: int, device: torch.device) -> bool:
    """Whether TMA can read a row-major matrix of `num_rows` rows of `row_bytes` (16-byte aligned) on `device`:
    a device with TMA, rows a multiple of 16 bytes (TMA's rule for strides), and int32 coordinates."""
    return has_tma(device) and row_bytes % 16 == 0 and num_rows < 2**31


def tma_readable(matrix: torch.Tensor) -> bool:
    """Whether contiguous [rows, cols] `matrix` can be read through a TMA descriptor (its start 16-byte aligned)."""
    return matrix.data_ptr() % 16 == 0 and tma_reads_rows(matrix.shape[0], matrix.shape[1] * matrix.element_size(),
                                                         matrix.device)


def sorted_rows_pay_off(token_rows: torch.Tensor, num_rows: int) -> bool:
    """Whether the weight gradient should read the [num_rows, H] expert-sorted copy of the [N, H] `token_rows`
    (which the GEMM gathering them writes on the way) rather than gather them itself: a large problem, with rows
    TMA can read."""
    hidden = token_rows.shape[1]
    return (num_rows * hidden >= SORTED_ROWS_MIN_ROWS_X_HIDDEN
            and tma_reads_rows(num_rows, hidden * token_rows.element_size(), token_rows.device))


# The two row GEMMs that gather token rows (up, and dA of the down backward) read the weights by TMA for problems
# from this many rows * hidden on, 16-bit, on a device with TMA. At hidden 2048 on the H100, in a probe copy of
# the kernel (h100-2026-11-26/rows_ab.md, medians of 5 interleaved rounds): up 1.21 -> 1.18 ms at 128x768,
# 1.50 -> 1.44 at 64x1024, about the same with variable widths, and swiglu's up (two weights) 2.04 -> 1.86 and
# 2.61 -> 2.45 ms; the dA GEMM with its fused activation epilogue 1.64 -> 1.36 ms at 64x1024 (1.19-1.20 either way
# at 128x768, 1.41 -> 1.45 with variable widths). In the seed configs the up launch took 67 -> 81 us at 64 experts
# (host-bound; the descriptors add host time). The GEMMs reading the ragged buffer (down, dX) were no faster with TMA
# for either operand (h100-2026-11-26/rows_variants.md), and keep pointer loads.
TMA_WEIGHTS_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN


# The dA GEMM of a one-projection activation (relu², gelu) finishes dh_pre in its epilogue for problems from this
# many rows * hidden on (grouped_gemm.down_projection_backward); below, the separate row pass. Device time of a
# whole step on the H100, two rounds each (h100-2026-11-26/kernels_ab.md): 5.92-5.93 -> 5.71-5.75 ms at
# 128x768, 6.76-6.80 -> 6.71-6.72 at 64x1024, 6.65-6.76 -> 6.36-6.47 with variable widths (with the weights by TMA
# below); in the seed configs the fused epilogue and the partial sums' extra launch cost 0.235-0.237 -> 0.240 ms at
# 128 experts, 0.209-0.210 -> 0.211-0.213 at 64.
FUSED_DH_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN


def fused_dh_pays_off(num_rows: int, hidden: int) -> bool:
    """Whether the dA GEMM over `num_rows` rows of `hidden` finishes dh_pre itself (a one-projection activation)."""
    return num_rows * hidden >= FUSED_DH_MIN_ROWS_X_HIDDEN


def weights_by_tma(weight: torch.Tensor, num_rows: int) -> bool:
    """Whether a grouped GEMM over `num_rows` expert-sorted rows reads the [TW, H] `weight` through TMA: a large
    problem, 16-bit operands, on a device with TMA, weight rows TMA can read from a 16-byte aligned start."""
    return (num_rows * weight.shape[1] >= TMA_WEIGHTS_MIN_ROWS_X_HIDDEN and weight.element_size() == 2
            and tma_readable(weight))


def gemm_blocks(dtype: torch.dtype, role: str, gated: bool = False, rows_x_hidden: int | None = None,
                hidden: int | None = None) -> GemmBlocks:
    """Default grouped-GEMM tiles for operands of `dtype` in `role` (one of GEMM_ROLES) on the current backend.

    rows_x_hidden: the launch's expert-sorted rows times the hidden size, and hidden: the hidden size; they pick the
    shape class (None: large, and at most LONG_HIDDEN).
    """
    if role not in GEMM_ROLES:
        raise ValueError(f"role must be one of {GEMM_ROLES}, got {role!r}")
    if running_in_interpreter():
        return INTERPRETER_BLOCKS
    if dtype == torch.float32:
        return GPU_FP32_BLOCKS
    if gated and role in GPU_16BIT_GATED_BLOCKS:
        return GPU_16BIT_GATED_BLOCKS[role]
    if rows_x_hidden is not None and rows_x_hidden < SMALL_PROBLEM_ROWS_X_HIDDEN:
        return GPU_16BIT_SMALL_BLOCKS[role]
    if hidden is not None and hidden > LONG_HIDDEN:
        return GPU_16BIT_LONG_HIDDEN_BLOCKS.get(role, GPU_16BIT_ROLE_BLOCKS[role])
    return GPU_16BIT_ROLE_BLOCKS[role]


def permute_block_h(hidden: int) -> int:
    """Columns handled per step by the permute kernels for rows of `hidden` elements."""
    return min(next_power_of_2(hidden), PERMUTE_MAX_BLOCK_H)


def rows_per_program(block_h: int, gpu_elements: int | None) -> int:
    """Rows a program of a row-wise kernel takes, `block_h` columns of each a step: about `gpu_elements` on a GPU
    (None: one row), INTERPRETER_ROW_ELEMENTS in the interpreter; a power of two."""
    elements = INTERPRETER_ROW_ELEMENTS if running_in_interpreter() else gpu_elements
    return next_power_of_2(max(elements // block_h, 1)) if elements and elements > block_h else 1
