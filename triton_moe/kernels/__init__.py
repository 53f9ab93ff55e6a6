"""Triton kernels of the MoE MLP and their launchers; no autograd here (see triton_moe/ops.py)."""

from triton_moe.kernels.activation import ACTIVATIONS, GATED_ACTIVATIONS, is_gated
from triton_moe.kernels.grouped_gemm import (
    down_projection,
    down_projection_backward,
    input_grad_rows,
    up_projection,
    weight_grad,
)
from triton_moe.kernels.layout import ExpertLayout
from triton_moe.kernels.permute import combine_rows, gather_rows
from triton_moe.kernels.tuning import GemmBlocks, gemm_blocks, sorted_rows_pay_off

__all__ = [
    "ACTIVATIONS",
    "ExpertLayout",
    "GATED_ACTIVATIONS",
    "GemmBlocks",
    "combine_rows",
    "down_projection",
    "down_projection_backward",
    "gather_rows",
    "gemm_blocks",
    "input_grad_rows",
    "is_gated",
    "sorted_rows_pay_off",
    "up_projection",
    "weight_grad",
]
