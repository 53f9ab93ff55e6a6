"""The helpers for training code: per-layer expert load of the last forward, active parameters and FLOPs."""

import pytest
import torch
import torch.nn as nn

from triton_moe import reference
import triton_moe
from conftest import make_input, make_layer
from triton_moe import MoEConfig, active_parameters, aux_loss, expert_load, flops_per_token

CONFIG = MoEConfig(expert_sizes=[(2, 64), (2, 32)], num_active_experts=2, hidden_size=32)
STK_CONFIG = MoEConfig(expert_sizes=[(2, 256), (2, 128)], num_active_experts=2, hidden_size=128)  # 128-blocks


def test_expert_load_of_the_last_forward():
    """Each implementation's counts are the routing's, as fractions; the two agree on the same weights."""
    model = nn.ModuleDict(dict(triton=make_layer(triton_moe.MoEMLP, STK_CONFIG, torch.float32),
                               stk=make_layer(reference.MoEMLP, STK_CONFIG, torch.float32)))
    model["stk"].load_state_dict(model["triton"].state_dict())
    assert expert_load(model) == {}  # before any forward
    x = make_input((20, 128), torch.float32)
    want = torch.bincount(model["triton"].forward_with_intermediates(x)["expert_indices"].flatten().cpu(),
                          minlength=4)
    for layer in model.values():
        layer(x)
        assert torch.equal(layer.tokens_per_expert.cpu(), want)
    loads = expert_load(model)
    assert loads.keys() == {"triton", "stk"}
    for load in loads.values():
        assert torch.allclose(load.cpu(), want / 40.0)


def test_active_parameters_count_top_k_experts():
    layer = make_layer(triton_moe.MoEMLP, CONFIG, torch.float32)
    model = nn.Sequential(nn.Linear(32, 32, bias=False), layer)
    mean_width = (2 * 64 + 2 * 32) / 4
    want = 32 * 32 + 4 * 32 + round(2 * mean_width * 2 * 32)  # linear, router, 2 experts of the mean width
    assert active_parameters(model) == want
    assert sum(p.numel() for p in model.parameters()) == 32 * 32 + 4 * 32 + (2 * 64 + 2 * 32) * 2 * 32
    # All tokens on the two wide experts: the last forward's widths count.
    with torch.no_grad():
        layer.router.weight.zero_()  # ties: experts 0 and 1, both of width 64
    layer(make_input((8, 32), torch.float32))
    assert active_parameters(model, from_last_forward=True) == 32 * 32 + 4 * 32 + 2 * 64 * 2 * 32
    assert flops_per_token(model, seq_len=16, n_layer=1, n_embd=32) == 6 * want + 12 * 1 * 32 * 16


@pytest.mark.parametrize("call, error, match", [
    (lambda layer: expert_load(None), TypeError, "model must be an nn.Module"),
    (lambda layer: active_parameters(layer.w1), TypeError, "model must be an nn.Module"),
    (lambda layer: aux_loss("model"), TypeError, "model must be an nn.Module"),
    (lambda layer: triton_moe.enable_cuda_graphs(None), TypeError, "model must be an nn.Module"),
    (lambda layer: aux_loss(layer, detach_layers="yes"), ValueError, "detach_layers must be True or False"),
    (lambda layer: active_parameters(layer, from_last_forward=1), ValueError, "from_last_forward must be True"),
    (lambda layer: flops_per_token(layer, -5, 2, 32), ValueError, "seq_len must be >= 1"),
    (lambda layer: flops_per_token(layer, 16.5, 2, 32), ValueError, "seq_len must be an int"),
    (lambda layer: flops_per_token(layer, 16, -1, 32), ValueError, "n_layer must be >= 0"),
    (lambda layer: flops_per_token(layer, 16, 2, 0), ValueError, "n_embd must be >= 1"),
])
def test_the_helpers_name_a_wrong_argument(call, error, match):
    """A model that is not a module, a flag that is not a bool, a size that is not a positive int: an error that
    names the argument, not an AttributeError from inside or a number computed from it."""
    with pytest.raises(error, match=match):
        call(make_layer(triton_moe.MoEMLP, CONFIG, torch.float32))
