"""The expert activations: their names, which of them are gated, and their math in plain torch.

- "relu_squared": act = relu(h_pre) ** 2
- "gelu":         act = the exact (erf) GELU of h_pre, torch.nn.functional.gelu's default
- "swiglu":       act = silu(h_pre) * h_up: gated, h_pre the gate projection (w1) and h_up the up projection (v1)
The config, the kernels (kernels/activation.py, the same math in Triton), the fp64 ground truth and the stk reference
take the names and the torch math from here.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu_squared", "gelu", "swiglu")
GATED_ACTIVATIONS = ("swiglu",)


def check_activation(activation: str) -> None:
    """Raise ValueError unless `activation` names one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def is_gated(activation: str) -> bool:
    """Whether `activation` multiplies by a second up projection h_up (and so needs v1)."""
    return activation in GATED_ACTIVATIONS


def apply_activation(activation: str, h_pre: torch.Tensor, h_up: torch.Tensor | None) -> torch.Tensor:
    """act(h_pre[, h_up]) in plain torch, in the inputs' dtype; h_up only for a gated activation."""
    if activation == "relu_squared":
        return torch.relu(h_pre).square()
    if activation == "gelu":
        return F.gelu(h_pre)
    check_activation(activation)
    return F.silu(h_pre) * h_up
