"""The stk block-sparse MoEMLP that triton_moe is compared against (same config and parameter layout)."""

import triton_moe  # noqa: F401  (sets up Triton's interpreter on CPU-only machines before stk is imported)
from reference.moe import MoEMLP

__all__ = ["MoEMLP"]
