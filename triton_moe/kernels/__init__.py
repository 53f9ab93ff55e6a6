"""Triton kernels of the MoE MLP and their launchers; no autograd here (see triton_moe/ops.py).

Without a GPU the kernels run on CPU tensors through Triton's interpreter, which Triton reads from TRITON_INTERPRET
when it is first imported: this package sets it then, where no CUDA device is visible and nothing has set it. Once
Triton is imported without it, kernels cannot run on such a machine, so importing them then is an error that says
so. Triton reads the variable as true for "1", "true" or "on" in any case (newer releases also "yes" and "y"); the
package reads "1" only, so a true value is written as "1" here, before the kernels or the layer read it.
"""

import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET", "").lower() in ("true", "on", "yes", "y"):
    os.environ["TRITON_INTERPRET"] = "1"
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError(
            "triton_moe's kernels need Triton's CPU interpreter on this machine (no CUDA device), but triton was "
            "imported before them: import triton_moe.MoEMLP (or triton_moe.kernels) before triton or stk, or set "
            "TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"

# ruff: noqa: E402  (the imports below come after the interpreter's selection)
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
from triton_moe.kernels.tuning import GemmTiles, gemm_tiles, sorted_rows_pay_off

__all__ = [
    "ACTIVATIONS",
    "ExpertLayout",
    "GATED_ACTIVATIONS",
    "GemmTiles",
    "combine_rows",
    "down_projection",
    "down_projection_backward",
    "gather_rows",
    "gemm_tiles",
    "input_grad_rows",
    "is_gated",
    "sorted_rows_pay_off",
    "up_projection",
    "weight_grad",
]
