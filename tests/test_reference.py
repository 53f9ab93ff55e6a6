"""The stk reference MoEMLP against the fp64 per-expert loop: every intermediate, aux loss and gradient."""

import pytest
import torch

from triton_moe import reference
from conftest import (DEVICE, HALF_DTYPES, SEED_CONFIGS, assert_grads_match, assert_intermediates_match, make_input,
                      make_layer, run_against_loop, seed_config)
from triton_moe import MoEConfig

NUM_TOKENS = 96  # not a multiple of the block size; top-8 over 64/128 experts leaves some experts empty


def check_against_loop(layer, x, dtype):
    got, want, got_grads, want_grads = run_against_loop(layer, x)
    assert_intermediates_match(got, want, dtype)
    assert_grads_match(got_grads, want_grads, dtype)
    return got


@pytest.mark.parametrize("name", list(SEED_CONFIGS))
def test_seed_configs_fp32(name):
    layer = make_layer(reference.MoEMLP, seed_config(name), torch.float32)
    check_against_loop(layer, make_input((NUM_TOKENS, 256), torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", ["8exp_variable", "64exp_variable"])
def test_seed_configs_16bit(name, dtype):
    layer = make_layer(reference.MoEMLP, seed_config(name), dtype)
    check_against_loop(layer, make_input((NUM_TOKENS, 256), dtype), dtype)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_activations(activation):
    config = seed_config("16exp_variable", activation=activation)
    layer = make_layer(reference.MoEMLP, config, torch.float32)
    got = check_against_loop(layer, make_input((NUM_TOKENS, 256), torch.float32), torch.float32)
    assert ("h_up" in got) == (activation == "swiglu")


def test_unnormalized_weights():
    layer = make_layer(reference.MoEMLP, seed_config("8exp_variable", normalize_weights=False), torch.float32)
    got = check_against_loop(layer, make_input((NUM_TOKENS, 256), torch.float32), torch.float32)
    assert not torch.allclose(got["routing_weights"].sum(-1), torch.ones(NUM_TOKENS, device=DEVICE))


def test_3d_input_keeps_shape():
    layer = make_layer(reference.MoEMLP, seed_config("8exp_variable"), torch.float32)
    x = make_input((3, 13, 256), torch.float32)
    got = check_against_loop(layer, x, torch.float32)
    assert got["output"].shape == (3, 13, 256)
    assert layer(x).shape == (3, 13, 256)


@pytest.mark.parametrize("num_tokens", [1, 2, 129])
def test_token_counts(num_tokens):
    layer = make_layer(reference.MoEMLP, seed_config("8exp_variable"), torch.float32)
    check_against_loop(layer, make_input((num_tokens, 256), torch.float32), torch.float32)


def _positive_input(num_tokens, hidden):
    return make_input((num_tokens, hidden), torch.float32).abs()


def test_expert_with_zero_tokens():
    config = seed_config("8exp_variable")
    layer = make_layer(reference.MoEMLP, config, torch.float32)
    with torch.no_grad():  # positive inputs and a negative router row: expert 5 is never chosen
        layer.router.weight[5] = -1.0
    got = check_against_loop(layer, _positive_input(40, 256), torch.float32)
    assert got["tokens_per_expert"][5] == 0
    assert got["h_pre"][5].shape == (0, config.expert_widths[5])
    assert layer.w1.grad[config.expert_width_offsets[5]:config.expert_width_offsets[6]].abs().max() == 0


def test_all_tokens_to_one_expert():
    config = seed_config("8exp_variable", num_active_experts=1)
    layer = make_layer(reference.MoEMLP, config, torch.float32)
    with torch.no_grad():
        layer.router.weight[6] = 1.0
    got = check_against_loop(layer, _positive_input(40, 256), torch.float32)
    assert got["tokens_per_expert"].tolist() == [0] * 6 + [40, 0]


def test_rejects_widths_not_multiple_of_block():
    with pytest.raises(ValueError, match="width 200 is not a multiple of stk's block size 128"):
        reference.MoEMLP(MoEConfig(expert_sizes=[(2, 200)], num_active_experts=1, hidden_size=256))
    with pytest.raises(ValueError, match="hidden_size"):
        reference.MoEMLP(MoEConfig(expert_sizes=[(2, 256)], num_active_experts=1, hidden_size=200))
    with pytest.raises(ValueError, match="width 200"):
        reference.check_block_aligned(MoEConfig(expert_sizes=[(2, 256), (2, 200)], num_active_experts=1,
                                                hidden_size=256))
    # stk's kernels take 128-row blocks only: the reference has no other block size to choose
    with pytest.raises(TypeError, match="block_size"):
        reference.MoEMLP(MoEConfig(expert_sizes=[(2, 256)], num_active_experts=1, hidden_size=256), block_size=64)
