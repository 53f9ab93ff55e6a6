"""The benchmark harness runs end to end on a tiny config (timings through the interpreter mean nothing; this
checks that the scripts and their baselines work and write their JSON)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_fwd_bwd_writes_a_row_per_implementation(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_fwd_bwd.py"), "--configs", "8exp_variable", "--tokens", "16",
         "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert out.with_suffix(".png").stat().st_size > 0  # the plot of the rows
    # torch._grouped_mm runs on a GPU only; megablocks is not installed here (nor on the lent GPU machine);
    # ScatterMoE has one expert width only, so it skips this variable-width config wherever it imports.
    on_gpu = {"grouped_mm"} if torch.cuda.is_available() else set()
    assert {row["impl"] for row in rows} == {"triton", "stk_reference", "torch_loop"} | on_gpu
    assert all(row["ms"] > 0 and row["tokens"] == 16 for row in rows)
    assert "skipped megablocks" in result.stdout
    assert "skipped scattermoe on 8exp_variable: ScatterMoE supports one expert width only" in result.stdout


@pytest.mark.parametrize("options", [[], ["--large", "--activation", "swiglu"],
                                     ["--row-splits", "3", "--activation", "swiglu"]],
                         ids=["small", "large_swiglu", "row_splits_swiglu"])
def test_kernel_code_compiles_every_launch_and_finds_only_outputs_written(tmp_path, options):
    """kernel_code.py compiles each launch of a forward + backward for sm_90 without a GPU, and torch.compile's
    mutation analysis finds every kernel writing only its outputs (what it finds written beyond them, Inductor
    would clone before the launch and write back after). The large-problem paths' persistent kernels compile
    warp-specialised (the specialisation drops out silently where it cannot split their loops). With the weight
    gradients in runs of rows, both gradients and the runs' sums compile and write only their outputs."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_code.py"), "--out", str(tmp_path), "--tokens", "256", *options],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ptx_files = sorted(tmp_path.glob("*.ptx"))
    assert len(ptx_files) >= 12  # route, sort, up, down, combine; route backward, dA, dW2, dX, combine, dW1
    assert all(".entry" in path.read_text() for path in ptx_files)
    if "--row-splits" in options:  # the weight gradients in runs of rows (dW2, dW1 + dV1), then the runs' sums
        assert result.stdout.count("_sum_row_splits: 4 warps") == 2, result.stdout
    if "--large" in options:  # the large-problem paths: TMA loads of the weights and of the sorted rows
        assert any("cp.async.bulk.tensor" in path.read_text() for path in ptx_files)
        # the persistent kernels (down; dW2 of SwiGLU), warp-specialised: Triton makes their 4 warps 12
        assert "_persistent_rows_gemm: 12 warps" in result.stdout, result.stdout
        assert "_persistent_weight_grad: 12 warps" in result.stdout, result.stdout


def test_direct_launch_launches_what_kernel_grid_launches():
    """kernels.host.DirectLaunch, which launches the layer's kernels in eager mode, reaches the compiled kernels'
    launchers with the kernel and arguments Triton's kernel[grid] would, for x 16-byte aligned and not (kernels
    compiled for sm_90 without a GPU, no launch made)."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_code.py"), "--direct-launch", "--tokens", "256"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("the same as kernel[grid]'s: True") == 2, result.stdout


def test_bench_host_reports_the_host_time_and_what_the_launches_take():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_host.py"), "--configs", "8exp_variable", "--tokens", "16",
         "--dtype", "float32", "--warmup", "0", "--repeats", "1", "--impls", "triton"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 8exp_variable | triton |"))
    host_us, _, aten_ops, allocations, without_launches_us = row.strip(" |").split(" | ")[3:]
    assert int(aten_ops) >= int(allocations) > 0
    # the interpreter's launches run the kernels in Python: far more host time than the launchers' own
    assert 0 < float(without_launches_us) < float(host_us)


def test_round_robin_takes_the_steps_in_turn_and_reports_against_the_baseline(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    from harness import print_round_robin, round_robin_ms

    calls = []
    steps = {label: (lambda index, label=label: calls.append((label, index))) for label in ("dense", "moe")}
    times = round_robin_ms(steps, 3)
    assert calls == [("dense", 0), ("moe", 0), ("dense", 1), ("moe", 1), ("dense", 2), ("moe", 2)]
    assert [len(label_times) for label_times in times.values()] == [3, 3]
    print_round_robin({"dense": [2.0, 2.0, 2.0], "moe": [3.0, 3.0, 3.0]}, "dense")
    lines = capsys.readouterr().out.splitlines()
    assert "(1.000x)" in lines[0] and "(1.500x)" in lines[1] and lines[1].startswith("moe")



def test_source_digest_names_the_code_that_ran(tmp_path):
    """harness.source_digest, which every benchmark prints beside its command: the same for the same files, another
    for a changed byte, a renamed file or an added one, the same whatever other files lie beside them."""
    harness = load_script("benchmarks/harness.py", siblings=("baselines",))
    package = tmp_path / "package"
    (package / "kernels").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "kernels" / "b.py").write_text("y = 2\n")
    digest = harness.source_digest(package)
    assert digest == harness.source_digest(package) and len(digest) == 12
    (package / "a.py").write_text("x = 2\n")
    changed = harness.source_digest(package)
    (package / "kernels" / "b.py").rename(package / "kernels" / "c.py")
    renamed = harness.source_digest(package)
    (package / "d.py").write_text("")
    added = harness.source_digest(package)
    assert len({digest, changed, renamed, added}) == 4
    (package / "notes.txt").write_text("not code")
    assert harness.source_digest(package) == added


def test_clock_sampler_summarises_the_samples_inside_each_window(tmp_path, monkeypatch):
    """harness.ClockSampler (bench_*.py --clocks) runs nvidia-smi, here a stand-in that prints a 1500 MHz, 650 W
    sample every 10 ms, and clock_summary keeps only the samples inside a window; malformed lines are skipped."""
    sys.path.insert(0, str(BENCHMARKS))
    import harness

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/usr/bin/env bash\necho "timestamp, clocks.sm [MHz]"\n'
                    'while true; do echo "$(date +"%Y/%m/%d %H:%M:%S.%3N"), 1500, 650.5"; sleep 0.01; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(harness.ClockSampler, "gpu_id", staticmethod(lambda: "0"))
    with harness.ClockSampler() as sampler:
        time.sleep(0.3)
        _, window = harness.ClockSampler.window(time.sleep, 0.3)
    assert len(sampler.samples) > 5 and all(sample[1:] == (1500.0, 650.5) for sample in sampler.samples)
    summary = harness.clock_summary(sampler.samples, window)
    inside = [sample for sample in sampler.samples if window[0] <= sample[0] <= window[1]]
    assert 0 < summary["samples"] == len(inside) < len(sampler.samples)
    assert (summary["sm_mhz_median"], summary["sm_mhz_min"], summary["watts_max"]) == (1500.0, 1500.0, 650.5)
    assert harness.clock_summary(sampler.samples, (0.0, 1.0)) is None


def test_clock_log_lines_become_samples():
    sys.path.insert(0, str(BENCHMARKS))
    from harness import clock_summary, parse_clock_log

    samples = parse_clock_log(["2026/12/05 10:49:18.356, 1560, 594.01", "2026/12/05 10:49:18.456, 1170, 714.46",
                               "2026/12/05 10:49:18.556, [N/A], 700", "garbage", ""])
    assert [sample[1:] for sample in samples] == [(1560.0, 594.01), (1170.0, 714.46)]
    assert abs(samples[1][0] - samples[0][0] - 0.1) < 1e-6
    assert clock_summary(samples, (samples[0][0], samples[1][0])) == dict(
        samples=2, sm_mhz_median=1365.0, sm_mhz_min=1170.0, watts_max=714.46)
