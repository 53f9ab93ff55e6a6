"""Shared fixtures: the device, per-dtype tolerances, layers and inputs, and the assertions that compare an
implementation's intermediates and gradients with the fp64 loop of triton_moe.testing.ground_truth."""

import os

# The suite runs in pytest-xdist workers (pyproject's addopts: -n auto), each of which should keep to one core:
# Triton's interpreter is single-threaded Python, and more torch/BLAS threads only contend with the other workers
# (measured on 2 cores: the same wall time for 1.8x the CPU time). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# stk's Triton kernels use TF32 for fp32 operands on a GPU unless told otherwise; the fp32 comparisons with the
# fp64 loop below need IEEE fp32. (Our own kernels choose their precision explicitly.)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import triton_moe.kernels  # noqa: E402, F401  (selects the interpreter on CPU-only machines before stk imports triton)
from triton_moe.config import MoEConfig  # noqa: E402
from triton_moe.testing.shapes import SEED_CONFIGS  # noqa: E402
from triton_moe.testing.ground_truth import TOLERANCES, cosine, max_rel_error, run_with_loop  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (bf16 is broken in Triton's interpreter)")

# dtypes for parametrize; bf16 runs on a GPU only and is skipped, with the reason, on the CPU.
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=gpu_only, id="bfloat16")]
DTYPES = [torch.float32, *HALF_DTYPES]

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str, siblings: tuple[str, ...] = ()):
    """A script of the repository (scripts/, benchmarks/, examples/) as a module, for its main() and helpers.
    siblings: the modules beside it that it imports by name (nanoGPT's train.py imports model.py), loaded first from
    their files and registered under those names, so that nothing is added to the import path."""
    path = ROOT / relative_path
    for name in siblings:
        sys.modules[name] = _module_from_file(path.parent / f"{name}.py", name)
    return _module_from_file(path, path.stem)


def _module_from_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def poison_allocations(monkeypatch, integer_fill: int | None):
    """Make torch.empty(_like) fill what they allocate: floats with NaN, integers with `integer_fill` (None: left
    as allocated)."""

    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if tensor.is_floating_point():
                return tensor.fill_(float("nan"))
            return tensor if integer_fill is None else tensor.fill_(integer_fill)

        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


@pytest.fixture
def nan_filled_outputs(monkeypatch):
    """Fill what launchers allocate with torch.empty(_like) with NaN, so that any element a kernel leaves
    unwritten (a ragged block, a partial tile) fails the comparison with the reference."""
    poison_allocations(monkeypatch, None)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fill what torch.empty(_like) allocates with NaN, or -7 for integers, so that any element a kernel leaves
    unwritten fails the comparison with the reference."""
    poison_allocations(monkeypatch, -7)


def use_problem_size_kernels(size, monkeypatch):
    """Make the launchers take the kernels of `size` ("large" or "small") problems whatever the sizes at hand:
    tuning's size thresholds (sorted token rows for the weight gradients, weights by TMA, dA's fused epilogue, the
    persistent kernel) at 0 or out of reach."""
    threshold = {"large": 0, "small": 2**62}[size]
    for constant in ("SORTED_ROWS_MIN_ROWS_X_HIDDEN", "TMA_WEIGHTS_MIN_ROWS_X_HIDDEN", "FUSED_DH_MIN_ROWS_X_HIDDEN",
                     "PERSISTENT_MIN_ROWS_X_HIDDEN"):
        monkeypatch.setattr(triton_moe.kernels.tuning, constant, threshold)


class RefuseLaunch:
    """Stands in for a kernel: indexing it with a grid (a launch) fails the test."""

    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched with grid {grid} where none should run")


def seed_config(name, **overrides) -> MoEConfig:
    return MoEConfig(**{**SEED_CONFIGS[name], **overrides})


def make_input(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=DEVICE, dtype=dtype)


def make_layer(cls, config, dtype, seed=0):
    torch.manual_seed(seed)
    layer = cls(config).to(DEVICE)
    # Weights of size ~1/sqrt(fan-in) keep activations O(1), so that relative errors mean something.
    with torch.no_grad():
        layer.router.weight.normal_(0, config.hidden_size ** -0.5)
        for name in ("w1", "v1"):
            if getattr(layer, name) is not None:
                getattr(layer, name).normal_(0, config.hidden_size ** -0.5)
        layer.w2.normal_(0, config.total_width ** -0.5 * (config.num_experts / config.num_active_experts) ** 0.5)
    return layer.to(dtype)


def run_against_loop(layer, x):
    """`run_with_loop` with a fixed random upstream gradient."""
    upstream = make_input(x.shape, x.dtype, seed=1)
    return run_with_loop(layer, x, upstream)


def assert_close(name, got, want, dtype):
    """got vs want within the dtype's max-rel and cosine bounds; NaN never passes."""
    tol = TOLERANCES[dtype]
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, cos = max_rel_error(got, want), cosine(got, want)
    assert err <= tol["max_rel"], f"{name}: max rel error {err:.3g} > {tol['max_rel']}"
    if want.numel() > 1:
        assert cos >= tol["cosine"], f"{name}: cosine {cos:.7f} < {tol['cosine']}"


def assert_intermediates_match(got: dict, want: dict, dtype):
    """Every intermediate of `got` against `want`; integer ones exactly, per-expert lists expert by expert."""
    for name in ("expert_indices", "tokens_per_expert", "row_to_token"):
        assert torch.equal(got[name].cpu().long(), want[name].cpu().long()), f"{name} differs"
    for name in ("router_logits", "routing_weights", "aux_loss"):
        # Routing runs in fp32 whatever the layer's dtype.
        assert_close(name, got[name], want[name], torch.float32)
    for name in ("sorted_x", "y_expert", "output"):
        assert_close(name, got[name], want[name], dtype)
    for name in ("h_pre", "h_act", "h_up"):
        assert (name in got) == (name in want), f"{name} present in one result only"
        if name in want:
            assert len(got[name]) == len(want[name])
            for e, (g, w) in enumerate(zip(got[name], want[name])):
                assert g.shape == w.shape, f"{name}[{e}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert_close(name, torch.cat([g.flatten() for g in got[name]]),
                         torch.cat([w.flatten() for w in want[name]]), dtype)


def assert_bitwise_equal(eager: dict, other: dict):
    """The results of two runs by name (output, aux loss, gradients): eager's, and a compiled, graphed or replayed
    run's, equal bit for bit; the router's gradient, which the aux loss reaches, is not zero."""
    assert eager.keys() == other.keys()
    assert eager["router.weight"].abs().sum() > 0
    for name in eager:
        assert torch.equal(eager[name], other[name]), name


def assert_grads_match(got_grads: dict, want_grads: dict, dtype):
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert got_grads[name] is not None, f"grad of {name} is missing"
        assert_close(f"grad {name}", got_grads[name], want_grads[name], dtype)
