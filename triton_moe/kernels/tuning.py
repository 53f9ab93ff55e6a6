"""Tile sizes, warps and pipeline stages of every kernel, per device kind and dtype, with the reasons.

No autotuning yet: every launcher takes `blocks: GemmBlocks | None` and falls back on `gemm_blocks(dtype)`,
so an autotuner can later pass its own choice without touching the kernels.
"""

import os
from dataclasses import dataclass

import torch
import triton


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
            if size < 16 or size != triton.next_power_of_2(size):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


# Triton's interpreter runs each program as numpy operations on the CPU: the cost is per program and per
# operation, hardly per flop. 32-wide tiles keep the number of programs small for the test shapes while
# widths 16, 48, 200 and hidden sizes 32, 64, 96 still exercise partial tiles and several tiles per expert.
INTERPRETER_BLOCKS = GemmBlocks(block_m=128, block_n=128, block_k=128, num_warps=1, num_stages=1)

# H100, fp16/bf16 operands: 128x128 output tiles with 64-deep K steps keep the tensor cores fed; 8 warps share
# the 128x128 fp32 accumulator (64 registers a thread) and 3 stages of A and B tiles take 96 KiB of shared
# memory, well below the 228 KiB available, so the loads of the next steps are in flight during the MMAs.
GPU_16BIT_BLOCKS = GemmBlocks(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)

# H100, fp32 operands with input_precision="ieee" (TF32 would miss the 1e-4 accuracy target): the dot runs
# as FMAs on the CUDA cores and holds both operand tiles in registers, so 64x64x32 with 4 warps avoids spills.
GPU_FP32_BLOCKS = GemmBlocks(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)

# Permute kernels copy or sum whole rows, one program per row: up to 1024 elements a step is 8 (fp32) or
# 16 (fp16) contiguous bytes per thread with 4 warps, enough for full-width memory transactions.
PERMUTE_MAX_BLOCK_H = 1024
PERMUTE_NUM_WARPS = 4


def running_in_interpreter() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemm_blocks(dtype: torch.dtype) -> GemmBlocks:
    """Default grouped-GEMM tiles for operands of `dtype` on the current backend."""
    if running_in_interpreter():
        return INTERPRETER_BLOCKS
    if dtype == torch.float32:
        return GPU_FP32_BLOCKS
    return GPU_16BIT_BLOCKS


def permute_block_h(hidden: int) -> int:
    """Columns handled per step by the permute kernels for rows of `hidden` elements."""
    return min(triton.next_power_of_2(hidden), PERMUTE_MAX_BLOCK_H)
