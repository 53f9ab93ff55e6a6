"""Expert activations as @triton.jit helpers, used inside the grouped-GEMM epilogues and prologues.

The kernels select an activation by a string constexpr, its name in ACTIVATIONS:
- "relu_squared": act = relu(h_pre) ** 2
- "gelu":         act = exact (erf) GELU of h_pre, as torch.nn.functional.gelu's default
- "swiglu":       act = silu(h_pre) * h_up, with h_pre the gate projection (w1) and h_up the up projection (v1)
Gated activations (GATED_ACTIVATIONS) take the second projection h_up; the others are passed h_up=None.
All helpers compute in the dtype of their arguments; the kernels pass fp32.
"""

import triton
import triton.language as tl

ACTIVATIONS = ("relu_squared", "gelu", "swiglu")
GATED_ACTIVATIONS = ("swiglu",)

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 * pi)


def check_activation(activation: str) -> None:
    """Raise ValueError unless `activation` names one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def is_gated(activation: str) -> bool:
    """Whether `activation` multiplies by a second projection h_up (and so needs v1)."""
    return activation in GATED_ACTIVATIONS


@triton.jit
def activation_forward(h_pre, h_up, ACTIVATION: tl.constexpr):
    """act(h_pre[, h_up]) elementwise; h_up is None unless ACTIVATION is gated."""
    if ACTIVATION == "relu_squared":
        relu = tl.maximum(h_pre, 0.0)
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
        d_act_d_pre = 2.0 * tl.maximum(h_pre, 0.0)
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
