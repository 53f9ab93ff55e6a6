"""triton-moe: a topology-free Triton grouped-GEMM Mixture-of-Experts MLP for training."""

import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. The choice is read when triton
# is first imported (its own helpers such as tl.cdiv are decorated then), so import triton_moe before triton/stk.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.layer import MoELayer, aux_loss  # noqa: E402
from triton_moe.moe import MoEMLP  # noqa: E402
from triton_moe.training import active_parameters, expert_load, flops_per_token  # noqa: E402

__all__ = ["MoEConfig", "MoELayer", "MoEMLP", "active_parameters", "aux_loss", "expert_load", "flops_per_token"]
