"""The expert activations (triton_moe/activations.py) as @triton.jit helpers, for the grouped-GEMM epilogues and
prologues, which select one by a string constexpr, its name. Gated activations take the second projection h_up;
the others are passed h_up=None. The helpers compute in their arguments' dtype; the kernels pass fp32.
"""

import triton
import triton.language as tl

from triton_moe.activations import ACTIVATIONS, GATED_ACTIVATIONS, check_activation, is_gated  # noqa: F401

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 * pi)


@triton.jit
def activation_forward(h_pre, h_up, ACTIVATION: tl.constexpr):
    """act(h_pre[, h_up]) elementwise; h_up is None unless ACTIVATION is gated."""
    if ACTIVATION == "relu_squared":
        # NaN stays NaN, as torch.relu keeps it (tl.maximum's default returns the other operand)
        relu = tl.maximum(h_pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
        act = relu * relu
    elif ACTIVATION == "gelu":
        act = 0.5 * h_pre * (1.0 + tl.math.erf(h_pre * _SQRT_HALF))
    else:
        tl.static_assert(ACTIVATION == "swiglu", "unknown activation")
        act = h_pre * tl.sigmoid(h_pre) * h_up
    return act


@triton.jit
def activation_backward(h_pre, h_up, ACTIVATION: tl.constexpr):
    """(d act / d h_pre, d act / d h_up) elementwise; the second is zeros unless ACTIVATION is gated.

    (Zeros rather than None: compiled Triton cannot return None inside a tuple; unused, they cost nothing.)
    """
    if ACTIVATION == "relu_squared":
        d_act_d_pre = 2.0 * tl.maximum(h_pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
        d_act_d_up = tl.zeros_like(h_pre)
    elif ACTIVATION == "gelu":
        normal_cdf = 0.5 * (1.0 + tl.math.erf(h_pre * _SQRT_HALF))
        normal_pdf = _INV_SQRT_2PI * tl.exp(-0.5 * h_pre * h_pre)
        d_act_d_pre = normal_cdf + h_pre * normal_pdf
        d_act_d_up = tl.zeros_like(h_pre)
    else:
        tl.static_assert(ACTIVATION == "swiglu", "unknown activation")
        gate_sigmoid = tl.sigmoid(h_pre)
        silu = h_pre * gate_sigmoid
        d_act_d_pre = h_up * gate_sigmoid * (1.0 + h_pre * (1.0 - gate_sigmoid))
        d_act_d_up = silu
    return d_act_d_pre, d_act_d_up
