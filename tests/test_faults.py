"""The checking tools can say no: with each deliberate defect of triton_moe.testing.faults injected into the Triton
layer,
check_intermediates, grad_similarity and validate_training exit non-zero; without one, zero. Tiny shapes in fp32."""

import json

import pytest
from conftest import DEVICE, load_script

from triton_moe.testing.faults import FAULTS, inject_fault

check_intermediates = load_script("scripts/check_intermediates.py")
grad_similarity = load_script("scripts/grad_similarity.py")
validate_training = load_script("benchmarks/validate_training.py")

FAULT_NAMES = [None, *FAULTS]
LAYER_ARGS = ["--configs", "4exp_variable_h128", "--tokens", "16", "--activation", "swiglu", "--dtypes", "float32"]
TRAINING_ARGS = ["--device", DEVICE, "--dtype", "float32", "--steps", "2", "--grad-check-every", "2",
                 "--batch-size", "1", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "128",
                 "--experts", "2x256,2x128", "--top-k", "2", "--activation", "swiglu"]


def fault_args(fault):
    return ["--inject-fault", fault] if fault else []


@pytest.mark.parametrize("fault", FAULT_NAMES)
@pytest.mark.parametrize("tool", [check_intermediates, grad_similarity], ids=["check_intermediates", "grad_similarity"])
def test_layer_tool_fails_on_each_fault(tool, fault):
    assert tool.main([*LAYER_ARGS, *fault_args(fault)]) == (1 if fault else 0)


@pytest.mark.parametrize("fault", FAULT_NAMES)
def test_validate_training_fails_on_each_fault(fault, tmp_path):
    code = validate_training.main([*TRAINING_ARGS, "--out-dir", str(tmp_path), *fault_args(fault)])
    result = json.loads((tmp_path / "validate_training.json").read_text())
    assert code == (1 if fault else 0), result["checks"]
    # The gradient check at step 0 alone catches every fault: a loss curve may not.
    assert result["checks"]["grad_rel_l2"] == (fault is None)
    assert result["metrics"]["grad_checks"][0]["step"] == 0
    # In fp32 the distance between the trained models catches every fault too (in bf16 it cannot: README).
    assert result["checks"]["weight_distance"] == (fault is None)


def test_fault_is_undone_on_exit():
    import triton_moe.moe

    original, route_and_experts = triton_moe.moe.expert_mlp, triton_moe.MoEMLP._route_and_experts
    with pytest.raises(RuntimeError), inject_fault("w1_grad_scale"):
        assert triton_moe.moe.expert_mlp is not original
        assert triton_moe.MoEMLP._route_and_experts is not route_and_experts
        raise RuntimeError
    assert triton_moe.moe.expert_mlp is original
    assert triton_moe.MoEMLP._route_and_experts is route_and_experts
    with pytest.raises(ValueError, match="unknown fault"), inject_fault("no_such_fault"):
        pass
