"""The @triton.jit activation helpers against torch's activations and their autograd derivatives, in fp64."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from triton_moe.kernels import ACTIVATIONS, GATED_ACTIVATIONS, is_gated
from triton_moe.kernels.activation import activation_backward, activation_forward
from conftest import DEVICE

TORCH_ACTIVATIONS = {
    "relu_squared": lambda h_pre, h_up: torch.relu(h_pre) ** 2,
    "gelu": lambda h_pre, h_up: F.gelu(h_pre),
    "swiglu": lambda h_pre, h_up: F.silu(h_pre) * h_up,
}


# A test harness, not a library kernel: applies the helpers elementwise so they can be compared with torch.
@triton.jit
def _apply_activation(h_pre_ptr, h_up_ptr, act_ptr, d_pre_ptr, d_up_ptr, numel, ACTIVATION: tl.constexpr,
                      GATED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < numel
    h_pre = tl.load(h_pre_ptr + offsets, mask=mask)
    h_up = tl.load(h_up_ptr + offsets, mask=mask) if GATED else None
    tl.store(act_ptr + offsets, activation_forward(h_pre, h_up, ACTIVATION), mask=mask)
    d_act_d_pre, d_act_d_up = activation_backward(h_pre, h_up, ACTIVATION)
    tl.store(d_pre_ptr + offsets, d_act_d_pre, mask=mask)
    tl.store(d_up_ptr + offsets, d_act_d_up, mask=mask)


def test_activation_names():
    assert ACTIVATIONS == tuple(TORCH_ACTIVATIONS)
    assert set(GATED_ACTIVATIONS) == {"swiglu"}
    assert [is_gated(name) for name in ACTIVATIONS] == [False, False, True]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_forward_and_backward(activation):
    generator = torch.Generator().manual_seed(0)
    # Both signs, zero, and the tails where erf and sigmoid saturate.
    h_pre = torch.cat([torch.randn(200, generator=generator) * 3, torch.tensor([0.0, -12.0, 12.0, -1e-3, 1e-3])])
    h_up = torch.randn(h_pre.shape, generator=generator)
    h_pre, h_up = h_pre.to(DEVICE), h_up.to(DEVICE)
    gated = is_gated(activation)
    act, d_pre, d_up = (torch.full_like(h_pre, float("nan")) for _ in range(3))
    _apply_activation[(1,)](h_pre, h_up, act, d_pre, d_up, h_pre.numel(), ACTIVATION=activation, GATED=gated,
                            BLOCK=triton.next_power_of_2(h_pre.numel()))

    h_pre64, h_up64 = h_pre.double().requires_grad_(), h_up.double().requires_grad_()
    expected_act = TORCH_ACTIVATIONS[activation](h_pre64, h_up64)
    expected_act.sum().backward()
    # act does not depend on h_up unless gated: torch leaves that gradient None, the helper returns zeros.
    expected_d_up = h_up64.grad if gated else torch.zeros_like(h_up64)
    for got, expected in [(act, expected_act.detach()), (d_pre, h_pre64.grad), (d_up, expected_d_up)]:
        error = (got.double() - expected).abs().max().item()
        assert error <= 1e-5 * expected.abs().max().item(), f"max error {error:.3e}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_finite_values_come_out_as_torchs(activation):
    """NaN and ±inf inputs give what torch's activations and their autograd derivatives give, NaN where torch gives
    NaN: a NaN in the hidden activations (weights or inputs gone bad) reaches the output and the gradients, as it
    does through a dense MLP, rather than vanishing."""
    inf, nan = float("inf"), float("nan")
    h_pre = torch.tensor([nan, inf, -inf, 1.0, -1.0, 0.0, 2.0, nan], device=DEVICE)
    h_up = torch.tensor([1.0, 1.0, 1.0, nan, inf, inf, -inf, nan], device=DEVICE)
    act, d_pre, d_up = (torch.zeros_like(h_pre) for _ in range(3))
    gated = is_gated(activation)
    _apply_activation[(1,)](h_pre, h_up, act, d_pre, d_up, h_pre.numel(), ACTIVATION=activation, GATED=gated,
                            BLOCK=h_pre.numel())

    h_pre64, h_up64 = h_pre.double().requires_grad_(), h_up.double().requires_grad_()
    expected_act = TORCH_ACTIVATIONS[activation](h_pre64, h_up64)
    expected_act.sum().backward()
    expected_d_up = h_up64.grad if gated else torch.zeros_like(h_up64)
    for got, expected in [(act, expected_act.detach()), (d_pre, h_pre64.grad), (d_up, expected_d_up)]:
        assert torch.equal(got.isnan(), expected.isnan()), (got, expected)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6, equal_nan=True), (got, expected)
