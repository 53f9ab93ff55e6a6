"""The checking scripts run end to end on a small config and pass (each exits non-zero on a mismatch)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("script", ["check_intermediates.py", "grad_similarity.py"])
def test_script_passes_on_a_small_config(script):
    """...and heads each config's table with its place among the cases, before the case's minute of work."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--configs", "8exp_variable", "--tokens", "24",
         "--activation", "swiglu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "within tolerance" in result.stdout
    assert "## [1/1] 8exp_variable" in result.stdout


@pytest.mark.parametrize("arguments, message", [
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--tokens", "-5"], "--tokens must be >= 1"),
    *([] if torch.cuda.is_available() else [(["--dtypes", "bfloat16"], "--dtypes bfloat16 needs a GPU")]),
])
@pytest.mark.parametrize("script", ["check_intermediates.py", "grad_similarity.py"])
def test_command_line_mistakes_are_usage_errors(script, arguments, message):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--configs", "8exp_variable", *arguments],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
