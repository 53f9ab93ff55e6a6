"""Smoke test of benchmarks/validate_training.py: a tiny GPT trained a few steps with each MoE MLP."""

import importlib.machinery
import json
import math
import sys
import types

import pytest
from conftest import DEVICE, load_script

validate_training = load_script("benchmarks/validate_training.py")

STEPS = 3
TINY = ["--device", DEVICE, "--dtype", "float32", "--steps", str(STEPS), "--batch-size", "2", "--block-size", "16",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "128", "--experts", "1x256,2x128", "--top-k", "2"]


class FakeWandb(types.ModuleType):
    """Records what validate_training logs, in place of the optional wandb package."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], summary={}, finished=False)
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_trains_both_and_writes_results(tmp_path, monkeypatch, capsys):
    fake_wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    assert validate_training.main([*TINY, "--out-dir", str(tmp_path), "--wandb", "--control"]) == 0
    summary = capsys.readouterr().out

    result = json.loads((tmp_path / "validate_training.json").read_text())
    assert (tmp_path / "validate_training.png").stat().st_size > 0
    reference, triton = result["runs"]["reference"]["losses"], result["runs"]["triton"]["losses"]
    assert len(reference) == len(triton) == STEPS
    # The control is the reference trained again from the same weights on the same batches: on the CPU, bit for bit.
    control, control_metrics = result["runs"]["control"]["losses"], result["metrics"]["control"]
    if DEVICE == "cpu":
        assert control == reference
        assert control_metrics["final_loss_gap"] == 0.0
        assert control_metrics["weight_distance"] == {"moe": 0.0, "all": 0.0}
    else:
        assert control == pytest.approx(reference, rel=1e-4)
    assert all(math.isfinite(loss) for loss in reference + triton)
    # Same weights and the same first batch in fp32: the same loss up to rounding.
    assert triton[0] == pytest.approx(reference[0], rel=1e-5)
    assert result["runs"]["triton"]["tokens_per_s"] > 0
    assert {"pearson_r", "final_loss_gap", "grad_checks", "weight_distance"} <= result["metrics"].keys()
    assert [check["step"] for check in result["metrics"]["grad_checks"]] == [0]
    assert result["metrics"]["grad_checks"][0]["grads"].keys() == {"router", "w1", "w2", "moe_input"}
    assert all(result["checks"].values())

    assert [run.kwargs["name"] for run in fake_wandb.runs] == ["reference", "triton", "control"]
    assert all(run.kwargs["mode"] == "offline" and run.finished for run in fake_wandb.runs)
    assert [step for step, _ in fake_wandb.runs[1].logged] == list(range(STEPS))
    # the experts' load, per step and per layer: 1 layer of 3 experts
    assert len(result["runs"]["triton"]["load_imbalance"]) == STEPS
    assert all(1.0 <= value <= 3.0 for value in result["runs"]["triton"]["load_imbalance"])
    logged = fake_wandb.runs[1].logged[0][1]
    assert sum(logged[f"load/transformer.h.0.mlp/expert_{e}"] for e in range(3)) == pytest.approx(1.0)
    # the summary table gives each run's busiest expert over its last steps
    last_steps = result["runs"]["triton"]["load_imbalance"][-validate_training.FINAL_WINDOW:]
    assert f"{sum(last_steps) / len(last_steps):.2f}x its share" in summary


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(SystemExit):
        assert validate_training.main([*TINY, "--out-dir", str(tmp_path), "--wandb"]) == 0
    assert "--wandb needs the wandb package" in capsys.readouterr().err


def test_rejects_bf16_on_cpu(capsys):
    with pytest.raises(SystemExit):
        validate_training.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    assert "bfloat16 needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, flag", [
    (["--experts", "abc"], "--experts"),
    (["--experts", "0x128"], "--experts"),
    (["--experts", "2x100"], "--experts"),  # the stk reference needs widths of whole 128-blocks
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "9"], "--top-k"),
    (["--n-embd", "-8"], "--n-embd"),
    (["--n-head", "3"], "--n-head"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--device", "tpu"], "--device"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--cuda-graphs"], "--cuda-graphs"),  # on the CPU
])
def test_command_line_mistakes_are_usage_errors(arguments, flag, capsys):
    """A mistaken flag exits with argparse's status 2 and one error line that names it, before any training."""
    with pytest.raises(SystemExit) as exit_info:
        validate_training.parse_args(["--device", "cpu", *arguments])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and flag in error_lines[0]


def test_out_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    a_file = tmp_path / "results"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        validate_training.parse_args(["--device", "cpu", "--out-dir", str(a_file)])
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err
