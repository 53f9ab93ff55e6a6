"""triton-moe: a topology-free Triton grouped-GEMM Mixture-of-Experts MLP for training.

`MoEConfig`, `aux_loss` and the training helpers import without Triton; `MoEMLP` and `enable_cuda_graphs` bring in
the kernels (on a machine without a GPU, through Triton's CPU interpreter: see triton_moe.kernels).
"""

from triton_moe.config import MoEConfig
from triton_moe.layer import MoELayer, aux_loss
from triton_moe.training import active_parameters, expert_load, flops_per_token

__all__ = ["MoEConfig", "MoELayer", "MoEMLP", "active_parameters", "aux_loss", "enable_cuda_graphs", "expert_load",
           "flops_per_token"]


def __getattr__(name):
    if name in ("MoEMLP", "enable_cuda_graphs"):  # imported on first use, with the Triton kernels
        import triton_moe.moe

        return getattr(triton_moe.moe, name)
    raise AttributeError(f"module 'triton_moe' has no attribute {name!r}")
