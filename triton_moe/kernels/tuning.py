"""Tile sizes, warps and pipeline stages of every kernel, per device kind and dtype, and the size thresholds of
the large-problem paths, each with its reason; docs/tuning.md holds the measurements.

No autotuning: every launcher takes `tiles: GemmTiles | None` and falls back on
`gemm_tiles(dtype, role, gated, rows_x_hidden)`, a table keyed on the role and a shape class measured on Hopper,
so an autotuner can pass its own choice without touching the kernels.
"""

import functools
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from triton_moe.kernels.host import next_power_of_2, running_in_interpreter, tracing


@dataclass(frozen=True)
class GemmTiles:
    """Tile shape of one grouped-GEMM launch: output tile tile_m x tile_n, reduction steps of tile_k."""

    tile_m: int
    tile_n: int
    tile_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("tile_m", "tile_n", "tile_k"):
            size = getattr(self, name)
            # tl.dot needs every dimension to be a power of two and at least 16.
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


# Each table row carries one line of reason; docs/tuning.md holds the measurements behind every choice.

# The interpreter pays per program and per operation, not per flop: few programs of large tiles. 256 columns cover
# the test configs' hidden size (256) in one tile.
INTERPRETER_TILES = GemmTiles(tile_m=128, tile_n=256, tile_k=128, num_warps=1, num_stages=1)

GPU_16BIT_ROLE_TILES = {
    "up": GemmTiles(128, 256, 64, num_warps=8, num_stages=3),  # wide tiles win once the strides are declared
    "down": GemmTiles(128, 256, 64, num_warps=8, num_stages=3),  # multiples of 16 (layout.WIDTH_ALIGNMENT)
    "down_backward": GemmTiles(128, 256, 64, num_warps=8, num_stages=4),  # a 4th stage hides the gather's latency
    "input_grad": GemmTiles(128, 256, 64, num_warps=8, num_stages=3),
    "weight_grad": GemmTiles(128, 128, 64, num_warps=8, num_stages=4),  # reduces over rows: square tiles
    "weight_grad_sorted": GemmTiles(128, 256, 64, num_warps=8, num_stages=3),  # TMA rows feed the wider tile
}
# A gated activation doubles the up projection's operand tiles and the weight gradient's outputs (dW1 with dV1):
# 128x256 runs out of shared memory or registers there.
GPU_16BIT_GATED_TILES = {
    "up": GemmTiles(128, 128, 64, num_warps=8, num_stages=4),
    "weight_grad": GemmTiles(64, 128, 64, num_warps=4, num_stages=4),
    "weight_grad_sorted": GemmTiles(128, 128, 64, num_warps=8, num_stages=3),
}
GEMM_ROLES = tuple(GPU_16BIT_ROLE_TILES)
# Past hidden 2048 the gathering GEMMs' 4-stage pipeline collapses: dA takes 3 there (up has 3 anyway).
LONG_HIDDEN = 2048
GPU_16BIT_LONG_HIDDEN_TILES = {
    "down_backward": GemmTiles(128, 256, 64, num_warps=8, num_stages=3),
}

# Small problems (the seed configs: hidden 256, 8192 to 32768 rows) make too few 128x256 tiles to fill the GPU:
# 64-row tiles with 4 warps. The gated up and dW1 + dV1 keep the gated tiles above.
SMALL_PROBLEM_ROWS_X_HIDDEN = 2**24  # rows * hidden below this is a small problem (seed configs: at most 2**23)
GPU_16BIT_SMALL_TILES = {
    "up": GemmTiles(64, 128, 64, num_warps=4, num_stages=3),
    "down": GemmTiles(64, 128, 64, num_warps=4, num_stages=3),
    "down_backward": GemmTiles(64, 128, 64, num_warps=4, num_stages=3),
    "input_grad": GemmTiles(64, 128, 64, num_warps=4, num_stages=3),
    # 64x64 output tiles make more programs of an exact grid; K steps of 128 rows halve the steps of each
    "weight_grad": GemmTiles(64, 64, 128, num_warps=4, num_stages=3),
    "weight_grad_sorted": GemmTiles(128, 128, 64, num_warps=4, num_stages=3),  # for a caller handing sorted rows
}
# A weight gradient of one width with at least 2^22 elements (64 experts of 256 at hidden 256 and more) has over a
# thousand 64x64 tiles, enough programs for 128x128 ones, which read each operand row half as often. With several
# widths the larger tile measured faster at one config and slower at another: those keep 64x64.
SMALL_WEIGHT_GRAD_LARGE_TILE_ELEMENTS = 2**22
GPU_16BIT_SMALL_LARGE_WEIGHT_GRAD_TILES = GemmTiles(128, 128, 64, num_warps=4, num_stages=3)

# A weight gradient's tiles follow from the widths and H alone (8 experts of 384 at hidden 256 make 192 of 64x64),
# each summing over its expert's rows, thousands of them in a small problem: where the tiles fill fewer than
# ROW_SPLIT_PROGRAMS_PER_SM programs per SM, each expert's rows split into runs of at least ROW_SPLIT_MIN_K_STEPS K
# steps (at the mean rows per expert), up to MAX_ROW_SPLITS, and a second launch adds the runs' fp32 sums,
# SUM_SPLITS_ELEMENTS a program. 16-bit operands on a GPU only: the fp32 path is for accuracy, not speed.
ROW_SPLIT_PROGRAMS_PER_SM = 4
ROW_SPLIT_MIN_K_STEPS = 8
MAX_ROW_SPLITS = 8
SUM_SPLITS_ELEMENTS = 1024

# fp32 operands with input_precision="ieee" (TF32 would miss the 1e-4 accuracy target): the dot runs as FMAs on
# the CUDA cores and holds both operand tiles in registers, so 64x64x32 with 4 warps avoids spills.
GPU_FP32_TILES = GemmTiles(tile_m=64, tile_n=64, tile_k=32, num_warps=4, num_stages=3)

# The permute kernels walk whole rows: up to 1024 elements a step is 8 (fp32) or 16 (fp16) contiguous bytes a
# thread with 4 warps, full-width memory transactions.
PERMUTE_MAX_BLOCK_H = 1024
PERMUTE_NUM_WARPS = 4
# The row pass takes several short rows a program, ROW_PASS_TILE_W columns of each a step and ROW_PASS_ELEMENTS in
# all (8 rows of 128 columns), with 8 warps: each program looks up its rows' experts once (variable widths) and steps
# over only the columns its rows' widths reach.
ROW_PASS_TILE_W = 128
ROW_PASS_ELEMENTS = 1024
ROW_PASS_NUM_WARPS = 8
# The interpreter's time follows the number of programs: there the row-wise kernels (the row pass, the combine,
# the gather) take up to this many elements a program.
INTERPRETER_ROW_ELEMENTS = 2**16


# Routing and the counting sort (kernels/router.py).
# The route's forward works on [tile tokens, EXPERTS_POW2] fp32 tiles of 2048 elements with 4 warps; its backward
# on tiles of 512 elements, 8 a thread (larger tiles spilled).
ROUTE_TILE_ELEMENTS = 2048
ROUTE_FORWARD_NUM_WARPS = 4
ROUTE_BACKWARD_TILE_ELEMENTS = 512
ROUTE_BACKWARD_ELEMENTS_PER_THREAD = 8
# 4x larger tiles keep the interpreter quick, and still take several tiles a segment from 129 experts on.
INTERPRETER_ROUTE_TILE_ELEMENTS = 8192
# Up to 64 tokens a program; a small batch takes smaller segments, down to one tile, until ROUTE_MIN_SEGMENTS
# programs run.
ROUTE_SEGMENT_TOKENS = 64
ROUTE_MIN_SEGMENTS = 256
# The [segments, E] tables are scanned over the segments by one program per TABLE_EXPERT_CHUNK experts,
# TABLE_TILE_ELEMENTS at a time (a single program walking a whole table waited on its loads); the last program
# scans the experts' totals TABLE_SCAN_CHUNK at a time.
TABLE_EXPERT_CHUNK = 16
TABLE_TILE_ELEMENTS = 4096
TABLE_SCAN_CHUNK = 1024
TABLE_NUM_WARPS = 4
# Without the route's counts, the sort counts segments of 256 assignments itself. The rank of an assignment compares
# it with every other of its segment, 32 at a time: the work of a segment grows with the square of its size.
SORT_SEGMENT_ASSIGNMENTS = 256
RANK_CHUNK = 32
# The counting zeroes its row of the [segments, E] table 1024 experts a step, and the scatter moves 1024 assignments
# a program: 8 elements per thread with 4 warps.
ZERO_CHUNK = 1024
SCATTER_ASSIGNMENTS = 1024
SORT_NUM_WARPS = 4


# The weight gradients read the token rows in expert-sorted order, copied by the GEMMs that gather them, from this
# many rows * hidden on (and only on a device with TMA): the copy costs its GEMM less than its weight gradient
# gains at hidden 2048, and more than that in the seed configs.
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


def _starts_aligned(matrix: torch.Tensor) -> bool:
    """Whether `matrix` starts 16-byte aligned. Inside a trace (torch.compile), where a tensor has no address: where
    its offset into its storage is a multiple of 16 bytes, for Inductor allocates its buffers aligned, and copies a
    graph input that is not aligned where its code assumes it is."""
    if tracing():
        return statically_known_true(matrix.storage_offset() * matrix.element_size() % 16 == 0)
    return matrix.data_ptr() % 16 == 0


def tma_readable(matrix: torch.Tensor) -> bool:
    """Whether contiguous [rows, cols] `matrix` can be read through a TMA descriptor made on the host (its start
    16-byte aligned). Never inside a trace: there (torch 2.11, triton 3.6) the layer's launches with host-side
    descriptors failed to compile, functionalisation writing back into a weight that requires grad, so a traced
    launch reads by pointers."""
    if tracing():
        return False
    return kernel_tma_readable(matrix)


def kernel_tma_readable(matrix: torch.Tensor) -> bool:
    """Whether a kernel can read contiguous [rows, cols] `matrix` through a TMA descriptor it makes itself (on the
    device, as the persistent kernels do): its start 16-byte aligned (_starts_aligned, inside a trace too) and its
    rows what TMA reads."""
    row_bytes = matrix.shape[1] * matrix.element_size()
    return _starts_aligned(matrix) and tma_reads_rows(matrix.shape[0], row_bytes, matrix.device)


def sorted_rows_pay_off(token_rows: torch.Tensor, num_rows: int) -> bool:
    """Whether the weight gradient should read the [num_rows, H] expert-sorted copy of the [N, H] `token_rows`
    (which the GEMM gathering them writes on the way) rather than gather them itself: a large problem, with rows
    TMA can read."""
    hidden = token_rows.shape[1]
    return (num_rows * hidden >= SORTED_ROWS_MIN_ROWS_X_HIDDEN
            and tma_reads_rows(num_rows, hidden * token_rows.element_size(), token_rows.device))


# The two row GEMMs that gather token rows (up, and dA of the down backward) read the weights by TMA from this
# many rows * hidden on, 16-bit, on a device with TMA; below, the descriptors' host time costs more than they
# save. The GEMMs reading the hidden activations (down, dX) were no faster with TMA, and keep pointer loads.
TMA_WEIGHTS_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN


# The dA GEMM of a one-projection activation (relu², gelu) finishes dh_pre in its epilogue from this many
# rows * hidden on (grouped_gemm.down_projection_backward); below, the row pass costs less than the partial sums'
# extra launch.
FUSED_DH_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN


def fused_dh_pays_off(num_rows: int, hidden: int) -> bool:
    """Whether the dA GEMM over `num_rows` rows of `hidden` finishes dh_pre itself (a one-projection activation)."""
    return num_rows * hidden >= FUSED_DH_MIN_ROWS_X_HIDDEN


def weights_by_tma(weight: torch.Tensor, num_rows: int) -> bool:
    """Whether a grouped GEMM over `num_rows` expert-sorted rows reads the [TW, H] `weight` through TMA: a large
    problem, 16-bit operands, on a device with TMA, weight rows TMA can read from a 16-byte aligned start."""
    return (num_rows * weight.shape[1] >= TMA_WEIGHTS_MIN_ROWS_X_HIDDEN and weight.element_size() == 2
            and tma_readable(weight))


# Large 16-bit problems on Hopper run the GEMMs of the expert width -> hidden layout (down, dX rows of one product)
# and the weight gradients of one output over sorted token rows (dW2, dW1 without a gate) in the persistent,
# warp-specialised kernels of kernels/persistent.py, both operands by TMA: their producer loads the next tile while
# the consumers store the last. 128x256x64 in 3 stages measured best of the shapes tried at the hidden-2048
# configs; Triton's Hopper warp specialisation takes effect with 4 warps only (it makes them 12).
PERSISTENT_TILES = GemmTiles(128, 256, 64, num_warps=4, num_stages=3)
PERSISTENT_MIN_ROWS_X_HIDDEN = SMALL_PROBLEM_ROWS_X_HIDDEN
# The persistent kernels' tiles are listed on the device first, this many a program.
TILE_TABLE_BLOCK = 64


@functools.lru_cache(maxsize=16)
def multiprocessors(device: torch.device) -> int:
    """The SMs of CUDA `device`."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_grad_row_splits(num_tiles: int, num_rows: int, num_experts: int, tile_k: int, dtype: torch.dtype,
                           device: torch.device) -> int:
    """Runs each expert's rows split into for a weight gradient of `num_tiles` tiles over `num_rows` rows of
    `num_experts` experts, in K steps of `tile_k`, of `dtype` operands on `device` (see ROW_SPLIT_PROGRAMS_PER_SM):
    1 under the interpreter (whose tests pass their own), for fp32, and on a CPU."""
    if running_in_interpreter() or dtype == torch.float32 or device.type != "cuda":
        return 1
    programs = ROW_SPLIT_PROGRAMS_PER_SM * multiprocessors(device)
    mean_k_steps = num_rows // (num_experts * tile_k)
    return max(1, min(programs // num_tiles, mean_k_steps // ROW_SPLIT_MIN_K_STEPS, MAX_ROW_SPLITS))


@functools.lru_cache(maxsize=16)
def has_warp_specialization(device: torch.device) -> bool:
    """Whether Triton's warp specialisation of a TMA loop serves `device`: Hopper (sm_90), where it is measured, and
    the interpreter, which runs the same kernels without it (so the CPU tests cover them)."""
    if running_in_interpreter():
        return True
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9


def takes_persistent_kernel(hidden_rows: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether a GEMM of the [R, max_width] hidden activations `hidden_rows` with `other` (a [TW, H] weight, or [R, H]
    sorted token rows) takes a persistent kernel (kernels/persistent.py): a large 16-bit problem on Hopper, both
    matrices readable by the kernel's own TMA descriptors, eagerly and under torch.compile alike. The row GEMM also
    needs widths_fit_k_steps."""
    return (hidden_rows.shape[0] * other.shape[1] >= PERSISTENT_MIN_ROWS_X_HIDDEN and hidden_rows.element_size() == 2
            and has_warp_specialization(hidden_rows.device) and kernel_tma_readable(hidden_rows)
            and kernel_tma_readable(other))


# An expert's weight slice (the widest expert's [W, H]) past this many bytes does not stay in L2 across the expert's
# row tiles; the portable GEMM then runs its tiles in groups of ROW_GROUP row tiles (see _expert_rows_gemm), which
# measured fastest of 4, 8 and 16 on the gathering GEMMs of eight 14336-wide experts. Slices of a few MiB (64 or
# 128 experts at hidden 2048) keep the ungrouped order, which measured the same there.
ROW_GROUP_MIN_WEIGHT_BYTES = 2**24
ROW_GROUP = 16


def row_group(weight_slice_bytes: int) -> int:
    """The row tiles the portable GEMM groups (its ROW_GROUP) for experts whose weight slices take
    `weight_slice_bytes`: ROW_GROUP past ROW_GROUP_MIN_WEIGHT_BYTES, else 1."""
    return ROW_GROUP if weight_slice_bytes > ROW_GROUP_MIN_WEIGHT_BYTES else 1


# Likewise the persistent weight gradient sweeps an expert's hidden activations (the mean expert's [R / E,
# max_width]) once per hidden tile: past HIDDEN_GROUP_MIN_SLICE_BYTES it runs its tiles in groups of HIDDEN_GROUP
# hidden tiles (see persistent._persistent_weight_grad). 4 made the layer of eight 14336-wide experts fastest of
# 1, 2 and 4; at 64 experts of 1024 (4 MiB slices) grouping changes nothing, and the threshold leaves them ungrouped.
HIDDEN_GROUP_MIN_SLICE_BYTES = 2**24
HIDDEN_GROUP = 4


def hidden_group(slice_bytes: int) -> int:
    """The hidden tiles the persistent weight gradient groups (its HIDDEN_GROUP) for experts whose hidden
    activations take `slice_bytes`: HIDDEN_GROUP past HIDDEN_GROUP_MIN_SLICE_BYTES, else 1."""
    return HIDDEN_GROUP if slice_bytes > HIDDEN_GROUP_MIN_SLICE_BYTES else 1


def widths_fit_k_steps(expert_widths: tuple[int, ...], tile_k: int) -> bool:
    """Whether K steps of `tile_k` over each expert's width end at it (every width a multiple), or past it only
    outside the hidden activations (one width): what the persistent row GEMM's TMA loads need."""
    return len(set(expert_widths)) == 1 or all(width % tile_k == 0 for width in expert_widths)


def gemm_tiles(dtype: torch.dtype, role: str, gated: bool = False, rows_x_hidden: int | None = None,
                hidden: int | None = None, uniform_weight_elements: int | None = None) -> GemmTiles:
    """Default grouped-GEMM tiles for operands of `dtype` in `role` (one of GEMM_ROLES) on the current backend.

    rows_x_hidden: the launch's expert-sorted rows times the hidden size, and hidden: the hidden size; they pick the
    shape class (None: large, and at most LONG_HIDDEN). uniform_weight_elements: for a weight gradient of experts
    of one width, its elements (total width times hidden), which pick its tile in a small problem.
    """
    if role not in GEMM_ROLES:
        raise ValueError(f"role must be one of {GEMM_ROLES}, got {role!r}")
    if running_in_interpreter():
        return INTERPRETER_TILES
    if dtype == torch.float32:
        return GPU_FP32_TILES
    if gated and role in GPU_16BIT_GATED_TILES:
        return GPU_16BIT_GATED_TILES[role]
    if rows_x_hidden is not None and rows_x_hidden < SMALL_PROBLEM_ROWS_X_HIDDEN:
        if (role == "weight_grad" and uniform_weight_elements is not None
                and uniform_weight_elements >= SMALL_WEIGHT_GRAD_LARGE_TILE_ELEMENTS):
            return GPU_16BIT_SMALL_LARGE_WEIGHT_GRAD_TILES
        return GPU_16BIT_SMALL_TILES[role]
    if hidden is not None and hidden > LONG_HIDDEN:
        return GPU_16BIT_LONG_HIDDEN_TILES.get(role, GPU_16BIT_ROLE_TILES[role])
    return GPU_16BIT_ROLE_TILES[role]


def permute_tile_h(hidden: int) -> int:
    """Columns handled per step by the permute kernels for rows of `hidden` elements."""
    return min(next_power_of_2(hidden), PERMUTE_MAX_BLOCK_H)


def row_pass_tiles(max_width: int) -> tuple[int, int, int]:
    """(columns a step, rows a program, warps) of the activation backward's row pass over rows of up to
    `max_width`."""
    tile_w = min(next_power_of_2(max_width), ROW_PASS_TILE_W)
    return tile_w, rows_per_program(tile_w, ROW_PASS_ELEMENTS), ROW_PASS_NUM_WARPS


def rows_per_program(tile_h: int, gpu_elements: int | None) -> int:
    """Rows a program of a row-wise kernel takes, `tile_h` columns of each a step: about `gpu_elements` on a GPU
    (None: one row), INTERPRETER_ROW_ELEMENTS in the interpreter; a power of two."""
    elements = INTERPRETER_ROW_ELEMENTS if running_in_interpreter() else gpu_elements
    return next_power_of_2(max(elements // tile_h, 1)) if elements and elements > tile_h else 1
