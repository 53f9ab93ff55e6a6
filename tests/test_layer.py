"""What every MoE layer shares: input checks before any kernel runs, the aux loss, the state_dict layout."""

import pytest
import torch
import torch.nn as nn

import reference
import triton_moe
from conftest import DEVICE, make_input, make_layer, seed_config

IMPLEMENTATIONS = [reference.MoEMLP, triton_moe.MoEMLP]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def layer(request):
    return make_layer(request.param, seed_config("8exp_variable"), torch.float32)


def test_wrong_hidden_size(layer):
    with pytest.raises(ValueError, match="hidden_size=256"):
        layer(make_input((4, 128), torch.float32))


def test_integer_input(layer):
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 256, dtype=torch.int64, device=DEVICE))


def test_one_dimensional_input(layer):
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(make_input((256,), torch.float32))


def test_non_contiguous_input_is_handled(layer):
    x = make_input((256, 10), torch.float32).T  # [10, 256], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_no_tokens_gives_empty_output_and_zero_grads(layer):
    x = make_input((0, 256), torch.float32).requires_grad_()
    out = layer(x)
    assert out.shape == (0, 256)
    (out.sum() + layer.aux_loss).backward()
    for param in layer.parameters():
        assert param.grad is not None and param.grad.abs().max() == 0


def test_parameter_layout(layer):
    config = layer.config
    shapes = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    assert shapes == {
        "router.weight": (config.num_experts, 256), "w1": (config.total_width, 256), "w2": (config.total_width, 256),
    }
    assert layer.config is config


def test_aux_loss_sums_layers_of_a_model():
    config = seed_config("8exp_variable")
    model = nn.Sequential(*[make_layer(cls, config, torch.float32, seed=i) for i, cls in
                            enumerate(IMPLEMENTATIONS * 2)])
    x = make_input((12, 256), torch.float32)
    model(x)
    expected = sum(layer.aux_loss for layer in model)
    assert torch.equal(triton_moe.aux_loss(model), expected)
    assert triton_moe.aux_loss(model).requires_grad
    assert triton_moe.aux_loss(nn.Linear(2, 2)).item() == 0
