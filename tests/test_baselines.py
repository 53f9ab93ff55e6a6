"""The ScatterMoE baseline of the benchmarks (benchmarks/baselines.py) computes our MoEMLP's function on its weights.

ScatterMoE is no dependency of ours: the comparisons run where `scattermoe` imports, from the Python path or from
the checkout that SCATTERMOE_PATH names (the folder that holds the scattermoe package), and skip elsewhere. Its
Triton kernels run in Triton's interpreter on the CPU; its flatten_sort_count is torch.compile'd, which on the CPU
needs a C++ compiler.
"""

import os
import sys

import pytest
import torch

import triton_moe
from conftest import DEVICE, assert_close, load_script, make_input, make_layer
from triton_moe.config import MoEConfig

baselines = load_script("benchmarks/baselines.py")
scattermoe_weights = baselines.scattermoe_weights  # the mapping under test, kept apart from the faulty ones below

SMALL = dict(expert_sizes=[(4, 32)], num_active_experts=2, hidden_size=32)
NUM_TOKENS = 24


@pytest.fixture
def scattermoe(monkeypatch):
    """The scattermoe package, with IEEE fp32 dots (it asks for TF32, which a GPU honours and the interpreter
    ignores); the test skips where it does not import."""
    if os.environ.get("SCATTERMOE_PATH"):
        monkeypatch.syspath_prepend(os.environ["SCATTERMOE_PATH"])
    module = pytest.importorskip("scattermoe", reason="scattermoe does not import: set SCATTERMOE_PATH to a "
                                                      "checkout of ScatterMoE (the folder holding its package)")
    monkeypatch.setattr(module.kernels.ops, "ALLOW_TF32", False)
    return module


def outputs_and_grads(layer, x, upstream):
    """(output, aux_loss, {x, router, experts' weights...: grad}) of one forward of `layer` and the backward of
    <output, upstream> + aux_loss."""
    x = x.detach().requires_grad_()
    output = layer(x)
    ((output * upstream).sum() + layer.aux_loss).backward()
    grads = {"x": x.grad, **{name: param.grad for name, param in layer.named_parameters()}}
    return output.detach(), layer.aux_loss.detach(), grads


def compare_with_moe_mlp(config):
    """Output, aux loss and every gradient of ScatterMoEMoE against MoEMLP on the same weights and input; our
    weights' gradients are put in ScatterMoE's layout by the same scattermoe_weights that maps the weights."""
    ours = make_layer(triton_moe.MoEMLP, config, torch.float32)
    theirs = baselines.ScatterMoEMoE(ours).to(DEVICE)  # its modules are made on the CPU
    x = make_input((NUM_TOKENS, config.hidden_size), torch.float32)
    upstream = make_input(x.shape, torch.float32, seed=1)
    want_output, want_aux, want = outputs_and_grads(ours, x, upstream)
    got_output, got_aux, got = outputs_and_grads(theirs, x, upstream)
    want_up, want_down = scattermoe_weights(config, want["w1"], want.get("v1"), want["w2"])
    assert_close("output", got_output, want_output, torch.float32)
    assert_close("aux_loss", got_aux, want_aux, torch.float32)
    assert_close("grad x", got["x"], want["x"], torch.float32)
    assert_close("grad router", got["router.weight"], want["router.weight"], torch.float32)
    assert_close("grad up (w1, v1)", got["experts.experts.weight"], want_up, torch.float32)
    assert_close("grad down (w2)", got["experts.output_experts.weight"], want_down, torch.float32)


@pytest.mark.parametrize("activation", ["relu_squared", "gelu", "swiglu"])
def test_scattermoe_matches_moe_mlp(scattermoe, activation, nan_filled_outputs, monkeypatch):
    # Its expert sort (torch.sort, bincount, cumsum) runs eagerly here: Inductor, compiling it, fails on the
    # NaN-filling torch.empty (it fills a tensor that requires grad); the compiled sort runs in the other tests.
    monkeypatch.setattr(scattermoe.mlp, "flatten_sort_count", scattermoe.mlp.flatten_sort_count.__wrapped__)
    compare_with_moe_mlp(MoEConfig(**SMALL, activation=activation))


def wrong_gate_order(config, w1, v1, w2):
    """GLUMLP's up weight with w1 (the gate) and v1 halves swapped: silu(x v1ᵀ) * (x w1ᵀ)."""
    up, down = scattermoe_weights(config, w1, v1, w2)
    width = config.expert_widths[0]
    return torch.cat([up[:, width:], up[:, :width]], dim=1), down


def untransposed_down(config, w1, v1, w2):
    """ScatterMoE's down weight [E, H, W] read from w2 without the transpose."""
    up, _ = scattermoe_weights(config, w1, v1, w2)
    return up, w2.reshape(config.num_experts, config.hidden_size, config.expert_widths[0])


@pytest.mark.parametrize("activation, wrong_mapping", [("swiglu", wrong_gate_order),
                                                       ("relu_squared", untransposed_down)])
def test_the_comparison_sees_a_wrong_weight_mapping(scattermoe, activation, wrong_mapping, monkeypatch):
    monkeypatch.setattr(baselines, "scattermoe_weights", wrong_mapping)
    with pytest.raises(AssertionError, match="output"):
        compare_with_moe_mlp(MoEConfig(**SMALL, activation=activation))


def test_scattermoe_refuses_variable_widths():
    config = MoEConfig(expert_sizes=[(2, 32), (2, 16)], num_active_experts=2, hidden_size=32)
    layer, reason = baselines.scattermoe_moe(config)
    assert layer is None and "one expert width" in reason
    with pytest.raises(ValueError, match="expert_sizes '2x32,2x16'"):
        scattermoe_weights(config, torch.zeros(96, 32), None, torch.zeros(96, 32))


def test_scattermoe_that_does_not_import_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "scattermoe", None)  # import scattermoe raises ImportError
    layer, reason = baselines.scattermoe_moe(MoEConfig(**SMALL))
    assert layer is None and "scattermoe does not import here" in reason and "PYTHONPATH" in reason

