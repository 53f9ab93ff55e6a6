"""triton-moe: a topology-free Triton grouped-GEMM Mixture-of-Experts MLP for training."""

import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. The interpreter is chosen when
# a kernel is decorated, so this must precede every import of a module that defines one (ours and stk's).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.layer import MoELayer, aux_loss  # noqa: E402
from triton_moe.moe import MoEMLP  # noqa: E402

__all__ = ["MoEConfig", "MoELayer", "MoEMLP", "aux_loss"]
