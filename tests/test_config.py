"""MoEConfig: derived fields and a ValueError naming the field for every bad value."""

import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from triton_moe import MoEConfig


def test_derived_fields():
    config = MoEConfig(expert_sizes=[(2, 512), (3, 48)], num_active_experts=2, hidden_size=64)
    assert config.num_experts == 5
    assert config.expert_widths == [512, 512, 48, 48, 48]
    assert config.expert_width_offsets == [0, 512, 1024, 1072, 1120, 1168]
    assert config.total_width == 1168
    assert not config.uniform_width and not config.is_gated


@pytest.mark.parametrize("kwargs, field", [
    (dict(expert_sizes=[]), "expert_sizes"),
    (dict(expert_sizes=[(0, 64)]), "expert_sizes"),
    (dict(expert_sizes=[(2, 0)]), "expert_sizes"),
    (dict(expert_sizes=[(2, 64, 1)]), "expert_sizes"),
    (dict(expert_sizes=[(2, 64.0)]), "expert_sizes"),
    (dict(num_active_experts=0), "num_active_experts"),
    (dict(num_active_experts=5), "num_active_experts"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(activation="relu"), "activation"),
    (dict(load_balance_coef=-1.0), "load_balance_coef"),
    (dict(z_loss_coef=-1.0), "z_loss_coef"),
    (dict(init_std=0.0), "init_std"),
    (dict(init_std=float("nan")), "init_std"),
    (dict(init_std=float("inf")), "init_std"),
    (dict(load_balance_coef=float("nan")), "load_balance_coef"),
    (dict(load_balance_coef=float("inf")), "load_balance_coef"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef"),
    (dict(z_loss_coef="0.1"), "z_loss_coef"),
    (dict(load_balance_coef=1e39), "load_balance_coef"),
    (dict(z_loss_coef=10**400), "z_loss_coef"),
    (dict(init_std=1e39), "init_std"),
    (dict(init_std=1e-46), "init_std"),
    (dict(expert_sizes="²x16"), "expert_sizes"),
    (dict(expert_sizes=[(2**40, 1)]), "expert_sizes"),
    (dict(expert_sizes=[(2, 2**31)]), "expert_sizes"),
    (dict(expert_sizes=[4, 64]), "expert_sizes"),
    (dict(expert_sizes=["4x64"]), "expert_sizes"),
    (dict(expert_sizes="4x"), "expert_sizes"),
    (dict(expert_sizes="4x64;2x32"), "expert_sizes"),
    (dict(expert_sizes="0x64"), "expert_sizes"),
    (dict(normalize_weights=1), "normalize_weights"),
    (dict(keep_sorted_x="yes"), "keep_sorted_x"),
])
def test_bad_values_name_the_field(kwargs, field):
    args = dict(expert_sizes=[(4, 64)], num_active_experts=2, hidden_size=32) | kwargs
    with pytest.raises(ValueError, match=field):
        MoEConfig(**args)


def test_numpy_numbers_are_coefficients_like_floats():
    config = MoEConfig(expert_sizes=[(4, 64)], num_active_experts=2, hidden_size=32,
                       load_balance_coef=np.float32(0.5), z_loss_coef=np.int64(0), init_std=np.float64(0.25))
    assert (config.load_balance_coef, config.z_loss_coef, config.init_std) == (0.5, 0.0, 0.25)
    assert all(type(value) is float for value in (config.load_balance_coef, config.z_loss_coef, config.init_std))


@pytest.mark.parametrize("field, value", [("hidden_size", 64), ("expert_sizes", [(2, 16)]),
                                          ("load_balance_coef", float("nan")), ("total_width", 3)])
def test_a_built_config_is_read_only(field, value):
    """A field set after the checks would go unchecked (a NaN coefficient) and out of step with the derived fields
    and the layers built from the config; dataclasses.replace makes another config, checked again."""
    config = MoEConfig(expert_sizes=[(4, 64)], num_active_experts=2, hidden_size=32)
    with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot set MoEConfig.{field}"):
        setattr(config, field, value)
    assert config == MoEConfig(expert_sizes=[(4, 64)], num_active_experts=2, hidden_size=32)
    for copy_of_config in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copy_of_config == config
        with pytest.raises(dataclasses.FrozenInstanceError):
            copy_of_config.hidden_size = 64
    assert dataclasses.replace(config, hidden_size=64).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(config, hidden_size=0)


@pytest.mark.parametrize("expert_sizes", [None, 4, {4: 64}])
def test_expert_sizes_of_the_wrong_type_name_the_field(expert_sizes):
    with pytest.raises(TypeError, match="expert_sizes"):
        MoEConfig(expert_sizes=expert_sizes, num_active_experts=2, hidden_size=32)


def test_expert_sizes_as_text():
    config = MoEConfig(expert_sizes="4x512, 2x256", num_active_experts=2, hidden_size=32)
    assert config.expert_sizes == [(4, 512), (2, 256)]
    assert config.expert_sizes_text == "4x512,2x256"
    assert MoEConfig(expert_sizes=config.expert_sizes_text, num_active_experts=2, hidden_size=32) == config


def test_importing_the_config_leaves_triton_alone():
    """Only the kernels select Triton's CPU interpreter, when they are imported; the config, the aux loss and the
    training helpers leave the process as it was; kernels imported after triton, without a GPU, say so."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = ("import os, sys, triton_moe; from triton_moe import MoEConfig, aux_loss, expert_load; "
              "assert 'TRITON_INTERPRET' not in os.environ and 'triton' not in sys.modules; "
              "triton_moe.MoEMLP; assert os.environ['TRITON_INTERPRET'] == '1'")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    late = subprocess.run([sys.executable, "-c", "import triton; import triton_moe.kernels"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert late.returncode != 0 and "triton was imported before them" in late.stderr


@pytest.mark.parametrize("value", ["true", "ON", "yes"])
def test_a_true_interpreter_variable_of_any_spelling_runs_the_layer(value):
    """Triton reads TRITON_INTERPRET=true (or on, yes) as the interpreter; the package writes such a value as "1",
    which the launchers and the layer read, so that a layer runs on the CPU with it."""
    env = {**os.environ, "TRITON_INTERPRET": value, "CUDA_VISIBLE_DEVICES": ""}
    script = ("import os, torch, triton_moe; from triton_moe import MoEConfig; "
              "layer = triton_moe.MoEMLP(MoEConfig(expert_sizes='2x16', num_active_experts=1, hidden_size=16)); "
              "assert os.environ['TRITON_INTERPRET'] == '1'; assert layer(torch.randn(4, 16)).shape == (4, 16)")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    import triton
    from triton_moe.kernels import host
    problem = host.interpreter_version_problem(triton.__version__, np.__version__)
    if problem is None:
        assert result.returncode == 0, result.stderr[-3000:]
    else:  # these releases' interpreter cannot run the kernels: the first launch says so
        assert result.returncode != 0 and f"RuntimeError: {problem}" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("triton_version, numpy_version, runs", [
    ("3.6.0", "2.3.5", True), ("3.6.0", "2.4.0", False), ("3.5.1", "2.5.2", False), ("3.7.0", "2.5.2", True),
    ("3.9.0", "2.4.6", True), ("3.6.0", "2.4.0rc1", False), ("3.10.0", "2.5.0", True),
])
def test_interpreter_releases_that_cannot_run_the_kernels_are_named(triton_version, numpy_version, runs):
    """Triton before 3.7 with numpy from 2.4 on: the interpreter fails inside Triton at the first kernel that loops
    to a runtime bound (found with triton 3.5.1-3.9.0 and numpy 2.2-2.5), so the first launch refuses the pair with
    both versions named."""
    from triton_moe.kernels import host
    problem = host.interpreter_version_problem(triton_version, numpy_version)
    assert (problem is None) == runs
    if not runs:
        assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's CPU interpreter only")
def test_the_interpreters_overflow_sanitizer_is_off_and_changed_nothing():
    """Under the interpreter the kernels' import turns off its integer-overflow sanitizer, which computes each check
    and drops it without a debug mode: an int32 product that overflows comes out the same, without an error, with
    the sanitizer on and off."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def square(values_ptr, squares_ptr):
        values = tl.load(values_ptr + tl.arange(0, 4))
        tl.store(squares_ptr + tl.arange(0, 4), values * values)

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    values = torch.tensor([3, -7, 70000, 2**31 - 1], dtype=torch.int32)
    squares = {}
    for sanitize in (False, True):
        interpreter.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=sanitize)
        try:
            squares[sanitize] = torch.empty_like(values)
            square[(1,)](values, squares[sanitize])
        finally:
            interpreter.interpreter_builder.options = options
    assert torch.equal(squares[False], squares[True])
    assert torch.equal(squares[False], (values.long() ** 2).to(torch.int32))  # wrapped as int32 wraps
