"""Grouped-GEMM launchers against plain PyTorch in fp64, expert by expert, over widths, hidden sizes, routings
and dtypes."""

import ctypes
import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from triton_moe.kernels import (
    ExpertLayout,
    GemmTiles,
    down_projection,
    down_projection_backward,
    input_grad_rows,
    is_gated,
    up_projection,
    weight_grad,
)
from triton_moe.kernels import grouped_gemm, host, persistent, tuning
from conftest import DEVICE, DTYPES, HALF_DTYPES, RefuseLaunch, gpu_only

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

# Largest error allowed, relative to the largest magnitude of the fp64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ACTIVATIONS = ["relu_squared", "gelu", "swiglu"]
# The ways down_projection_backward finishes dh_pre, per activation: the dA GEMM's epilogue (large problems, one
# projection) or the row pass after it (small problems, gated activations). The test cases are small: "fused" is
# forced (take_dh_path).
DH_PATHS = [("relu_squared", "fused"), ("relu_squared", "row pass"), ("gelu", "fused"), ("gelu", "row pass"),
            ("swiglu", "row pass")]

# (expert widths, hidden size, tokens, top_k, experts the tokens may pick (None: all))
CASES = {
    "one_expert": ([16], 32, 8, 1, None),
    "equal_widths": ([48, 48, 48], 64, 24, 2, None),
    "mixed_widths": ([64, 16, 200, 48], 96, 40, 2, None),
    "expert_without_tokens": ([64, 16, 200, 48], 32, 24, 2, [0, 2, 3]),
    "all_tokens_on_one_expert": ([64, 16, 200, 48], 64, 40, 1, [2]),
    "single_token": ([32, 48, 16, 200, 64], 96, 1, 2, None),
}



def take_dh_path(dh_path, monkeypatch):
    """Make down_projection_backward finish dh_pre the `dh_path` way whatever the problem's size; "fused" also
    refuses the row pass, so that a test of it fails if the epilogue does not run."""
    if dh_path == "fused":
        monkeypatch.setattr(tuning, "FUSED_DH_MIN_ROWS_X_HIDDEN", 0)
        monkeypatch.setattr(grouped_gemm, "_activation_backward_rows", RefuseLaunch())
    else:
        monkeypatch.setattr(tuning, "FUSED_DH_MIN_ROWS_X_HIDDEN", 2**62)


@dataclass
class SortedRouting:
    """Expert-sorted routing of the tokens, built with plain torch the way routing.py does."""

    expert_widths: list[int]
    row_to_token: torch.Tensor  # (R,) int32
    flat_to_row: torch.Tensor  # (N * k,) int64
    row_to_flat: torch.Tensor  # (R,) int64, the inverse of flat_to_row
    flat_weights: torch.Tensor  # (N * k,) fp32, the routing weights in (token, slot) order
    routing_weights: torch.Tensor  # (R,) fp32, the same sorted by row: flat_weights[row_to_flat]
    layout: ExpertLayout

    @property
    def num_rows(self):
        return self.row_to_token.numel()

    def experts(self):
        """Per expert: its rows and its weight rows (slices), and its width."""
        for expert, width in enumerate(self.expert_widths):
            row_start, row_end = self.layout.expert_row_offsets[expert : expert + 2].tolist()
            width_start, width_end = self.layout.expert_width_offsets[expert : expert + 2].tolist()
            yield slice(row_start, row_end), slice(width_start, width_end), width


def make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator):
    num_experts = len(expert_widths)
    scores = torch.rand(num_tokens, num_experts, generator=generator)  # (N, E)
    if allowed_experts is not None:
        blocked = torch.ones(num_experts, dtype=torch.bool)
        blocked[allowed_experts] = False
        scores[:, blocked] = -1.0
    top_scores, expert_indices = scores.topk(top_k, dim=1)  # (N, k): distinct experts per token
    flat_experts = expert_indices.reshape(-1)  # (N * k,)
    row_to_flat = torch.sort(flat_experts, stable=True).indices  # (R,)
    tokens_per_expert = torch.bincount(flat_experts, minlength=num_experts)  # (E,)

    def offsets(sizes):
        return F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)

    flat_weights = torch.softmax(top_scores, dim=1).reshape(-1)  # (N * k,)
    layout = ExpertLayout(offsets(tokens_per_expert), offsets(torch.tensor(expert_widths)), expert_widths,
                          row_to_flat.numel())
    return SortedRouting(
        expert_widths=list(expert_widths),
        row_to_token=(row_to_flat // top_k).to(torch.int32).to(DEVICE),
        flat_to_row=torch.argsort(row_to_flat).to(DEVICE),
        row_to_flat=row_to_flat.to(DEVICE),
        flat_weights=flat_weights.to(DEVICE),
        routing_weights=flat_weights[row_to_flat].to(DEVICE),
        layout=layout,
    )


def sorted_rows(token_rows, routing):
    """[R, H]: each expert-sorted row's token row, as the gathering GEMMs copy them for weight_grad."""
    return token_rows[routing.row_to_token.long()]


def random(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)


def setup_case(case):
    expert_widths, hidden, num_tokens, top_k, allowed_experts = CASES[case]
    generator = torch.Generator().manual_seed(0)
    return make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator), hidden, num_tokens, generator


def random_hidden(routing, dtype, generator):
    """[R, max_width] random values where each row's expert has columns, NaN past them: a kernel that reads the
    padding fails the comparison."""
    hidden = random(routing.layout.hidden_shape, dtype, generator)
    return hidden.masked_fill(~routing.layout.valid_columns(), float("nan"))


def random_weight(routing, hidden, dtype, generator):
    return random((sum(routing.expert_widths), hidden), dtype, generator, scale=hidden**-0.5)  # (TW, H)


def assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3e} vs max reference {scale:.3e}"


def same(got, want):
    """The same values, NaN in the same places (the unwritten columns past each row's width)."""
    return got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=0, equal_nan=True)


def assert_hidden_close(actual, expected, routing, dtype):
    """Two [R, max_width] hidden-activation matrices agree where their rows' experts have columns."""
    assert actual.shape == expected.shape == routing.layout.hidden_shape
    valid = routing.layout.valid_columns()
    assert_close(actual[valid], expected[valid], dtype)


def reference_activation(h_pre, h_up, activation):
    if activation == "relu_squared":
        return torch.relu(h_pre) ** 2
    if activation == "gelu":
        return F.gelu(h_pre)
    return F.silu(h_pre) * h_up


def reference_up_projection(x, w1, v1, routing, activation, routing_weights=None):
    """fp64 h_pre, h_up, h_act [R, max_width] (times each row's weight when given; NaN past each row's width); the
    activation reads h_pre and h_up rounded to x.dtype, as they are stored."""
    tokens = routing.row_to_token.long()
    h_pre = torch.full(routing.layout.hidden_shape, float("nan"), dtype=torch.float64, device=DEVICE)
    h_up = h_pre.clone() if v1 is not None else None
    for rows, weight_rows, width in routing.experts():
        sorted_x = x.double()[tokens[rows]]  # (count_e, H)
        h_pre[rows, :width] = sorted_x @ w1.double()[weight_rows].T
        if v1 is not None:
            h_up[rows, :width] = sorted_x @ v1.double()[weight_rows].T

    def as_stored(tensor):
        return None if tensor is None else tensor.to(x.dtype).double()

    h_act = reference_activation(as_stored(h_pre), as_stored(h_up), activation)  # (R, max_width)
    if routing_weights is not None:
        h_act = h_act * routing_weights.double()[:, None]
    return h_pre, h_up, h_act


def reference_down_projection(h_act, w2, routing):
    return torch.cat(
        [h_act.double()[rows, :width] @ w2.double()[weight_rows] for rows, weight_rows, width in routing.experts()]
    )  # (R, H)


def reference_down_backward(h_pre, h_up, w2, grad_out, routing, routing_weights, activation):
    """fp64 autograd of sum(grad_out * combined y), y[r] = routing_weight[r] * act(h_pre, h_up)[r] @ w2_e summed over
    each token's rows: the gradients for h_pre, h_up, routing_weights and w2 (None where the input is None)."""
    h_pre, h_up, w2, routing_weights = (
        None if tensor is None else tensor.double().requires_grad_() for tensor in (h_pre, h_up, w2, routing_weights)
    )
    tokens = routing.row_to_token.long()
    loss = 0.0
    for rows, weight_rows, width in routing.experts():
        h_act = reference_activation(h_pre[rows, :width], None if h_up is None else h_up[rows, :width], activation)
        y_rows = h_act @ w2[weight_rows]  # (count_e, H)
        if routing_weights is not None:
            y_rows = y_rows * routing_weights[rows, None]
        loss = loss + (grad_out.double()[tokens[rows]] * y_rows).sum()
    loss.backward()
    return [None if tensor is None else tensor.grad for tensor in (h_pre, h_up, routing_weights, w2)]


def reference_up_backward(dh_pre, dh_up, x, w1, v1, routing):
    """fp64 dx_rows [R, H] and the weight gradients dw1, dv1 [TW, H] of h_pre = sorted_x @ w1_e^T (h_up with v1)."""
    tokens = routing.row_to_token.long()
    dx_rows = torch.zeros((routing.num_rows, x.shape[1]), dtype=torch.float64, device=DEVICE)
    dw1 = torch.zeros(w1.shape, dtype=torch.float64, device=DEVICE)
    dv1 = torch.zeros(w1.shape, dtype=torch.float64, device=DEVICE)
    for rows, weight_rows, width in routing.experts():
        sorted_x = x.double()[tokens[rows]]  # (count_e, H)
        dh_pre_e = dh_pre.double()[rows, :width]  # (count_e, W_e)
        dx_rows[rows] = dh_pre_e @ w1.double()[weight_rows]
        dw1[weight_rows] = dh_pre_e.T @ sorted_x
        if dh_up is not None:
            dh_up_e = dh_up.double()[rows, :width]
            dx_rows[rows] += dh_up_e @ v1.double()[weight_rows]
            dv1[weight_rows] = dh_up_e.T @ sorted_x
    return dx_rows, dw1, dv1 if dh_up is not None else None


def random_down_inputs(case, activation, dtype):
    """Routing, h_pre, h_up (gated only), w2 and grad_out [N, H] for the down projection's backward."""
    routing, hidden, num_tokens, generator = setup_case(case)
    h_pre = random_hidden(routing, dtype, generator)
    h_up = random_hidden(routing, dtype, generator) if is_gated(activation) else None
    w2 = random_weight(routing, hidden, dtype, generator)
    grad_out = random((num_tokens, hidden), dtype, generator)
    return routing, h_pre, h_up, w2, grad_out


def random_up_grad_inputs(case, gated, dtype):
    """Routing, dh_pre, dh_up (gated only), x, w1 and v1 (gated only) for the up projection's backward."""
    routing, hidden, num_tokens, generator = setup_case(case)
    dh_pre = random_hidden(routing, dtype, generator)
    dh_up = random_hidden(routing, dtype, generator) if gated else None
    x = random((num_tokens, hidden), dtype, generator)
    w1 = random_weight(routing, hidden, dtype, generator)
    v1 = random_weight(routing, hidden, dtype, generator) if gated else None
    return routing, dh_pre, dh_up, x, w1, v1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_routing_weights", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_up_projection(case, activation, with_routing_weights, dtype):
    routing, hidden, num_tokens, generator = setup_case(case)
    x = random((num_tokens, hidden), dtype, generator)  # (N, H)
    w1 = random_weight(routing, hidden, dtype, generator)
    v1 = random_weight(routing, hidden, dtype, generator) if is_gated(activation) else None
    routing_weights = routing.routing_weights if with_routing_weights else None
    h_pre, h_up, h_act = up_projection(x, w1, v1, routing.row_to_token, routing.layout, activation,
                                       routing_weights)
    expected_pre, expected_up, expected_act = reference_up_projection(x, w1, v1, routing, activation, routing_weights)
    assert_hidden_close(h_pre, expected_pre, routing, dtype)
    assert_hidden_close(h_act, expected_act, routing, dtype)
    if is_gated(activation):
        assert_hidden_close(h_up, expected_up, routing, dtype)
    else:
        assert h_up is None
    padding = ~routing.layout.valid_columns()  # zeros past each row's width, whatever the memory held
    for hidden_rows in (h_pre, h_act, *([h_up] if is_gated(activation) else [])):
        assert torch.equal(hidden_rows[padding], torch.zeros_like(hidden_rows[padding]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_down_projection(case, dtype):
    routing, hidden, _, generator = setup_case(case)
    h_act = random_hidden(routing, dtype, generator)
    w2 = random_weight(routing, hidden, dtype, generator)
    y = down_projection(h_act, w2, routing.layout)
    assert_close(y, reference_down_projection(h_act, w2, routing), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, dh_path", DH_PATHS)
@pytest.mark.parametrize("case", CASES)
def test_down_projection_backward(case, activation, dh_path, dtype, monkeypatch):
    take_dh_path(dh_path, monkeypatch)
    routing, h_pre, h_up, w2, grad_out = random_down_inputs(case, activation, dtype)
    dh_pre, dh_up, d_routing_weights = down_projection_backward(
        grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout, routing.routing_weights, activation
    )
    expected_dh_pre, expected_dh_up, expected_d_routing_weights, _ = reference_down_backward(
        h_pre, h_up, w2, grad_out, routing, routing.routing_weights, activation
    )
    assert_hidden_close(dh_pre, expected_dh_pre, routing, dtype)
    assert_close(d_routing_weights, expected_d_routing_weights, dtype)
    if is_gated(activation):
        assert_hidden_close(dh_up, expected_dh_up, routing, dtype)
    else:
        assert dh_up is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_down_projection_backward_row_pass_in_column_steps(activation, monkeypatch):
    """The row pass with 16 columns a step: rows of 200 take 13 steps, and one program holds every row (128 rows
    a program), of all four widths, and masks the rest."""
    monkeypatch.setattr(tuning, "PERMUTE_MAX_BLOCK_H", 16)
    routing, h_pre, h_up, w2, grad_out = random_down_inputs("mixed_widths", activation, torch.float32)
    dh_pre, dh_up, d_routing_weights = down_projection_backward(
        grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout, routing.routing_weights, activation
    )
    expected_dh_pre, expected_dh_up, expected_d_routing_weights, _ = reference_down_backward(
        h_pre, h_up, w2, grad_out, routing, routing.routing_weights, activation
    )
    assert_hidden_close(dh_pre, expected_dh_pre, routing, torch.float32)
    assert_close(d_routing_weights, expected_d_routing_weights, torch.float32)
    if is_gated(activation):
        assert_hidden_close(dh_up, expected_dh_up, routing, torch.float32)


@pytest.mark.parametrize("activation, dh_path", DH_PATHS)
@pytest.mark.parametrize("case", ["mixed_widths", "expert_without_tokens"])
def test_routing_weights_through_an_index(case, activation, dh_path, monkeypatch):
    """Weights in (token, slot) order read through row_to_flat, as MoEMLP passes them, give bit for bit the h_act
    of the weights sorted by row, and the same routing-weight gradients, written back in (token, slot) order."""
    take_dh_path(dh_path, monkeypatch)
    routing, hidden, num_tokens, generator = setup_case(case)
    x = random((num_tokens, hidden), torch.float32, generator)
    w1 = random_weight(routing, hidden, torch.float32, generator)
    v1 = random_weight(routing, hidden, torch.float32, generator) if is_gated(activation) else None
    w2 = random_weight(routing, hidden, torch.float32, generator)
    grad_out = random((num_tokens, hidden), torch.float32, generator)
    up_args = (x, w1, v1, routing.row_to_token, routing.layout, activation)
    h_pre, h_up, h_act_sorted = up_projection(*up_args, routing.routing_weights)
    _, _, h_act_indexed = up_projection(*up_args, routing.flat_weights, routing_weight_index=routing.row_to_flat)
    assert same(h_act_indexed, h_act_sorted)
    down_args = (grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout)
    dh_pre_sorted, _, d_sorted = down_projection_backward(*down_args, routing.routing_weights, activation)
    dh_pre_indexed, _, d_indexed = down_projection_backward(*down_args, routing.flat_weights, activation,
                                                            routing_weight_index=routing.row_to_flat)
    assert same(dh_pre_indexed, dh_pre_sorted)
    assert torch.equal(d_indexed, d_sorted[routing.flat_to_row])  # d_sorted is by row; d_indexed by (token, slot)


@pytest.mark.parametrize("activation, dh_path", DH_PATHS)
def test_down_projection_backward_without_routing_weights(activation, dh_path, monkeypatch):
    take_dh_path(dh_path, monkeypatch)
    routing, h_pre, h_up, w2, grad_out = random_down_inputs("mixed_widths", activation, torch.float32)
    dh_pre, dh_up, d_routing_weights = down_projection_backward(
        grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout, None, activation
    )
    expected_dh_pre, expected_dh_up, _, _ = reference_down_backward(
        h_pre, h_up, w2, grad_out, routing, None, activation
    )
    assert d_routing_weights is None
    assert_hidden_close(dh_pre, expected_dh_pre, routing, torch.float32)
    if is_gated(activation):
        assert_hidden_close(dh_up, expected_dh_up, routing, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_input_grad_rows(case, gated, dtype):
    routing, dh_pre, dh_up, x, w1, v1 = random_up_grad_inputs(case, gated, dtype)
    dx_rows = input_grad_rows(dh_pre, w1, dh_up, v1, routing.layout)
    assert_close(dx_rows, reference_up_backward(dh_pre, dh_up, x, w1, v1, routing)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_rows", ["gathered", "sorted"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_weight_grad(case, gated, token_rows, dtype):
    """dW1 (and dV1 from the second ragged buffer when gated), from x gathered through row_to_token or from x's
    rows already sorted; dW2 is the same call on other operands."""
    routing, dh_pre, dh_up, x, w1, v1 = random_up_grad_inputs(case, gated, dtype)
    if token_rows == "gathered":
        dw1, dv1 = weight_grad(dh_pre, dh_up, x, routing.row_to_token, routing.layout)
    else:
        dw1, dv1 = weight_grad(dh_pre, dh_up, sorted_rows(x, routing), None, routing.layout)
    _, expected_dw1, expected_dv1 = reference_up_backward(dh_pre, dh_up, x, w1, v1, routing)
    assert_close(dw1, expected_dw1, dtype)
    if gated:
        assert_close(dv1, expected_dv1, dtype)
    else:
        assert dv1 is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ["mixed_widths", "expert_without_tokens"])
def test_down_weight_grad_from_weighted_activations(case, activation, dtype):
    """dW2 as the layer computes it, from up_projection's weighted activations or from its pre-activations with
    the activation and the routing weights applied on load (the same operand, so the same dW2 bit for bit),
    against autograd of the down projection of the unweighted activations scaled by the routing weights."""
    routing, hidden, num_tokens, generator = setup_case(case)
    x = random((num_tokens, hidden), dtype, generator)
    w1 = random_weight(routing, hidden, dtype, generator)
    v1 = random_weight(routing, hidden, dtype, generator) if is_gated(activation) else None
    w2 = random_weight(routing, hidden, dtype, generator)
    grad_out = random((num_tokens, hidden), dtype, generator)
    h_pre, h_up, h_act_weighted = up_projection(x, w1, v1, routing.row_to_token, routing.layout, activation,
                                                routing.flat_weights, routing_weight_index=routing.row_to_flat)
    dw2, _ = weight_grad(h_act_weighted, None, grad_out, routing.row_to_token, routing.layout)
    recomputed_dw2, none = weight_grad(h_pre, h_up, grad_out, routing.row_to_token, routing.layout,
                                       activation=activation, routing_weights=routing.flat_weights,
                                       routing_weight_index=routing.row_to_flat)
    expected_dw2 = reference_down_backward(h_pre, h_up, w2, grad_out, routing, routing.routing_weights, activation)[3]
    assert_close(dw2, expected_dw2, dtype)
    assert torch.equal(recomputed_dw2, dw2) and none is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu"])
@pytest.mark.parametrize("tiles", ["default", "32x32x16"])
@pytest.mark.parametrize("case", CASES)
def test_gathering_gemms_copy_their_rows(case, tiles, activation, dtype):
    """up_projection's sorted_x and down_projection_backward's sorted_grad_out are exactly the token rows they gather,
    in expert-sorted order, and asking for them leaves every other output as it was, bit for bit. The small tiles
    make several K steps, row tiles and column tiles per expert, on the CPU too."""
    routing, h_pre, h_up, w2, grad_out = random_down_inputs(case, activation, dtype)
    _, _, _, x, w1, v1 = random_up_grad_inputs(case, is_gated(activation), dtype)
    tiles = None if tiles == "default" else GemmTiles(32, 32, 16, num_warps=4, num_stages=2)
    up_args = (x, w1, v1, routing.row_to_token, routing.layout, activation, routing.routing_weights)
    down_args = (grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout, routing.routing_weights, activation)
    for launcher, args, token_rows, copy_name in ((up_projection, up_args, x, "sorted_x"),
                                                  (down_projection_backward, down_args, grad_out, "sorted_grad_out")):
        rows = torch.full((routing.num_rows, token_rows.shape[1]), float("nan"), dtype=dtype, device=DEVICE)
        with_copy = launcher(*args, **{copy_name: rows}, tiles=tiles)
        assert torch.equal(rows, sorted_rows(token_rows, routing))
        for got, want in zip(with_copy, launcher(*args, tiles=tiles), strict=True):
            assert (got is None and want is None) or same(got, want)


# Cases with many rows per expert, so that K steps of 16 rows make several runs of each: (expert widths, hidden,
# tokens, top_k, experts the tokens may pick)
ROW_SPLIT_CASES = {
    "mixed_widths": ([64, 16, 200, 48], 96, 150, 2, None),
    "expert_without_tokens": ([64, 16, 200, 48], 32, 100, 2, [0, 2, 3]),
    "single_token": ([32, 48, 16, 200, 64], 96, 1, 2, None),
}
ROW_SPLIT_TILES = GemmTiles(64, 64, 16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("token_rows", ["gathered", "sorted_tma", "sorted"])
@pytest.mark.parametrize("operand", ["dW1", "dW1 + dV1", "dW2 from h_pre"])
@pytest.mark.parametrize("case", ROW_SPLIT_CASES)
def test_weight_grad_row_splits(case, operand, token_rows, monkeypatch):
    """Each expert's rows split into runs, summed by a second launch (what small problems with few tiles take):
    the fp64 loop's gradients for every split, experts with fewer runs than splits (and without rows) included,
    for each way of reading the token rows and each operand; the runs' fp32 workspace starts as NaN."""
    expert_widths, hidden, num_tokens, top_k, allowed_experts = ROW_SPLIT_CASES[case]
    generator = torch.Generator().manual_seed(0)
    routing = make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator)
    dtype = torch.float32
    x = random((num_tokens, hidden), dtype, generator)
    dh_pre, dh_up = random_hidden(routing, dtype, generator), random_hidden(routing, dtype, generator)
    w1, v1 = random_weight(routing, hidden, dtype, generator), random_weight(routing, hidden, dtype, generator)
    if token_rows == "gathered":
        rows, row_to_token = x, routing.row_to_token
    else:
        rows, row_to_token = sorted_rows(x, routing), None
        if token_rows == "sorted":
            monkeypatch.setattr(grouped_gemm, "tma_readable", lambda matrix: False)
    if operand == "dW2 from h_pre":  # the weighted activation, recomputed on load: dW2 with x's rows as grad_out
        h_act_weighted = (F.silu(dh_pre.double()) * dh_up.double() * routing.routing_weights.double()[:, None])
        expected = reference_up_backward(h_act_weighted, None, x, w1, None, routing)[1:2]
        options = dict(activation="swiglu", routing_weights=routing.flat_weights,
                       routing_weight_index=routing.row_to_flat)
        hidden_rows2 = dh_up  # h_up, the gate's partner
    else:
        gated = operand == "dW1 + dV1"
        hidden_rows2 = dh_up if gated else None
        expected = reference_up_backward(dh_pre, hidden_rows2, x, w1, v1 if gated else None, routing)[1:1 + 1 + gated]
        options = {}
    for row_splits in (3, 8):
        gradients = weight_grad(dh_pre, hidden_rows2, rows, row_to_token, routing.layout, tiles=ROW_SPLIT_TILES,
                                row_splits=row_splits, **options)
        for got, want in zip(gradients, expected):
            assert_close(got, want, dtype)
        assert gradients[1] is None or len(expected) == 2


def test_weight_grad_row_splits_where_tiles_are_few(monkeypatch):
    """tuning.weight_grad_row_splits splits 16-bit small problems on a GPU whose tiles leave SMs idle, as far as
    the mean rows per expert allow, and nothing else."""
    monkeypatch.setattr(tuning, "running_in_interpreter", lambda: False)
    monkeypatch.setattr(tuning, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda")
    splits = tuning.weight_grad_row_splits
    # 8 experts x 384 at hidden 256 in 128x64 tiles: 96 tiles, 2048 rows per expert in K steps of 64
    assert splits(96, 16384, 8, 64, torch.bfloat16, gpu) == min(4 * 132 // 96, 2048 // 64 // 8, 8) == 4
    assert splits(1024, 16384, 8, 64, torch.float16, gpu) == 1  # the tiles fill the GPU
    assert splits(96, 8 * 64 * 16, 8, 64, torch.bfloat16, gpu) == 2  # 16 K steps per expert: runs of at least 8
    assert splits(96, 16384, 8, 64, torch.float32, gpu) == 1  # fp32: no split
    assert splits(96, 16384, 8, 64, torch.bfloat16, torch.device("cpu")) == 1
    assert splits(2, 10**6, 1, 64, torch.bfloat16, gpu) == tuning.MAX_ROW_SPLITS


@pytest.mark.parametrize("case", ["equal_widths", "mixed_widths"])
def test_weight_grad_tiles_know_the_gradient_of_one_width(case, monkeypatch):
    """weight_grad hands tuning.gemm_tiles its gradient's elements (total width x hidden) where the experts have one
    width, and None with several widths, which keep the small problems' 64x64 tile."""
    routing, dh_pre, _, x, _, _ = random_up_grad_inputs(case, False, torch.float32)
    asked = []
    choose = grouped_gemm.gemm_tiles

    def recording(*args, **kwargs):
        asked.append(kwargs.get("uniform_weight_elements"))
        return choose(*args, **kwargs)
    monkeypatch.setattr(grouped_gemm, "gemm_tiles", recording)
    dw, _ = weight_grad(dh_pre, None, x, routing.row_to_token, routing.layout)
    assert asked == [dw.numel() if case == "equal_widths" else None]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", ["mixed_widths", "expert_without_tokens", "single_token"])
def test_weight_grad_token_rows_three_ways(case, gated, monkeypatch):
    """The same gradients, bit for bit, from the token rows gathered through row_to_token, sorted and read through
    a TMA descriptor (an expert's last step reads the next expert's rows, which the ragged operand's zeros cancel),
    and sorted and read by masked pointer loads (sorted rows without TMA: before Hopper, or rows whose length is no
    multiple of 16 bytes)."""
    if not tuning.has_tma(torch.device(DEVICE)):
        pytest.skip("this GPU has no TMA")
    routing, dh_pre, dh_up, x, _, _ = random_up_grad_inputs(case, gated, torch.float32)
    rows = sorted_rows(x, routing)
    assert grouped_gemm.tma_readable(rows)
    assert not grouped_gemm.tma_readable(torch.zeros(4, 36, dtype=torch.float16, device=DEVICE))  # rows of 72 bytes
    gathered = weight_grad(dh_pre, dh_up, x, routing.row_to_token, routing.layout)
    by_tma = weight_grad(dh_pre, dh_up, rows, None, routing.layout)
    monkeypatch.setattr(grouped_gemm, "tma_readable", lambda matrix: False)
    by_pointers = weight_grad(dh_pre, dh_up, rows, None, routing.layout)
    for way in (by_tma, by_pointers):
        for got, want in zip(way, gathered, strict=True):
            assert (got is None and want is None) or same(got, want)


# Cases for the persistent kernel of the expert width -> hidden GEMMs (kernels/persistent.py), which takes widths
# that are multiples of its K step, or one width: (expert widths, hidden, tokens, top_k, experts the tokens may pick)
PERSISTENT_CASES = {
    "widths_multiple_of_k_step": ([128, 64, 192, 64], 96, 100, 2, None),  # several K steps of each GEMM
    "expert_without_tokens": ([128, 64, 192, 64], 64, 24, 2, [0, 2, 3]),
    "one_width_not_multiple": ([48, 48, 48], 64, 30, 2, None),
    "single_token": ([64, 128, 64], 32, 1, 2, None),
    # more tiles than the GPU's programs (one per SM): programs walk several tiles
    "many_tiles": ([128, 256, 64, 192], 512, 4096, 2, None),
}
# Under the interpreter, tiles small enough that the test cases take several tiles, K steps and tiles a program.
PERSISTENT_TEST_TILES = GemmTiles(32, 64, 32, num_warps=1, num_stages=1) if DEVICE == "cpu" else None


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [pytest.param(case, marks=gpu_only) if case == "many_tiles" else case
                                  for case in PERSISTENT_CASES])
def test_persistent_kernels_same_results(case, dtype, monkeypatch):
    """down_projection, input_grad_rows of one product and weight_grad of one output over sorted rows through the
    persistent, warp-specialised kernels (as for large 16-bit problems on Hopper) agree with the fp64 loop, and bit
    for bit with the portable kernels at the same K step. The hidden activations hold NaN past each width: a K step
    of the row GEMM that read them would show, as would a weight gradient's K step that summed the next expert's
    rows."""
    if not tuning.has_warp_specialization(torch.device(DEVICE)):
        pytest.skip("this GPU takes the portable kernels")
    expert_widths, hidden, num_tokens, top_k, allowed_experts = PERSISTENT_CASES[case]
    generator = torch.Generator().manual_seed(0)
    routing = make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator)
    h_act, dh_pre = random_hidden(routing, dtype, generator), random_hidden(routing, dtype, generator)
    w2, w1 = random_weight(routing, hidden, dtype, generator), random_weight(routing, hidden, dtype, generator)
    x = random((num_tokens, hidden), dtype, generator)  # (N, H)
    x_rows = sorted_rows(x, routing)  # (R, H)
    tiles = PERSISTENT_TEST_TILES

    def run(tiles):
        return (down_projection(h_act, w2, routing.layout, tiles=tiles),
                input_grad_rows(dh_pre, w1, None, None, routing.layout, tiles=tiles),
                weight_grad(dh_pre, None, x_rows, None, routing.layout, tiles=tiles)[0])

    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 0)
    # the portable weight gradient sums each expert's rows in one run, as the persistent kernel does
    monkeypatch.setattr(grouped_gemm, "weight_grad_row_splits", lambda *args: 1)
    portable_kernels = grouped_gemm._expert_rows_gemm, grouped_gemm._weight_grad_gemm
    # the persistent kernels or a failure
    monkeypatch.setattr(grouped_gemm, "_expert_rows_gemm", RefuseLaunch())
    monkeypatch.setattr(grouped_gemm, "_weight_grad_gemm", RefuseLaunch())
    y, dx_rows, dw1 = run(tiles)
    assert_close(y, reference_down_projection(h_act, w2, routing), dtype)
    expected_dx_rows, expected_dw1, _ = reference_up_backward(dh_pre, None, x, w1, None, routing)
    assert_close(dx_rows, expected_dx_rows, dtype)
    assert_close(dw1, expected_dw1, dtype)

    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 2**62)
    monkeypatch.setattr(grouped_gemm, "_expert_rows_gemm", portable_kernels[0])
    monkeypatch.setattr(grouped_gemm, "_weight_grad_gemm", portable_kernels[1])
    # the portable kernels at the persistent tiles' K step: the same sums in the same order
    k_step = (tiles or tuning.PERSISTENT_TILES).tile_k
    for got, want in zip((y, dx_rows, dw1), run(tiles or GemmTiles(64, 128, k_step, num_warps=4, num_stages=3)),
                         strict=True):
        assert same(got, want)


@pytest.mark.parametrize("hidden_group", [2, 3])
def test_weight_grad_hidden_groups_same_results(hidden_group, monkeypatch):
    """The persistent weight gradient's tiles in groups of hidden tiles (as for experts whose hidden activations
    outgrow L2) give the ungrouped order's gradient bit for bit, with an expert without rows and a group that ends
    short of HIDDEN_GROUP hidden tiles."""
    if not tuning.has_warp_specialization(torch.device(DEVICE)):
        pytest.skip("this GPU takes the portable kernels")
    tiles = PERSISTENT_TEST_TILES or tuning.PERSISTENT_TILES
    hidden = 5 * tiles.tile_n  # five hidden tiles: groups of 2 or 3 end short
    expert_widths, _, num_tokens, top_k, allowed_experts = PERSISTENT_CASES["expert_without_tokens"]
    generator = torch.Generator().manual_seed(0)
    routing = make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator)
    dtype = torch.float16
    dh_pre = random_hidden(routing, dtype, generator)
    x_rows = sorted_rows(random((num_tokens, hidden), dtype, generator), routing)  # (R, H)
    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 0)
    monkeypatch.setattr(grouped_gemm, "_weight_grad_gemm", RefuseLaunch())  # the persistent kernel or a failure
    ungrouped = weight_grad(dh_pre, None, x_rows, None, routing.layout, tiles=tiles)[0]
    monkeypatch.setattr(tuning, "HIDDEN_GROUP_MIN_SLICE_BYTES", 0)
    monkeypatch.setattr(tuning, "HIDDEN_GROUP", hidden_group)
    groups = []  # each launch's HIDDEN_GROUP
    monkeypatch.setattr(persistent, "hidden_group",
                        lambda nbytes: groups.append(tuning.hidden_group(nbytes)) or groups[-1])
    assert same(weight_grad(dh_pre, None, x_rows, None, routing.layout, tiles=tiles)[0], ungrouped)
    assert groups == [hidden_group]


def test_persistent_kernels_only_where_they_serve(monkeypatch):
    """The persistent kernels take large 16-bit problems with matrices TMA can read, and the row GEMM widths its K
    steps cannot overrun; every other case keeps the portable kernels (as do two weight gradients in one launch and
    gathered token rows, whatever the size)."""
    device = torch.device(DEVICE)
    if not tuning.has_warp_specialization(device):
        pytest.skip("this GPU takes the portable kernels")
    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 0)
    hidden_rows = torch.zeros(8, 128, dtype=torch.float16, device=device)  # (R, max_width)
    weight = torch.zeros(192, 64, dtype=torch.float16, device=device)  # (TW, H)
    takes = tuning.takes_persistent_kernel
    assert takes(hidden_rows, weight) and takes(hidden_rows, weight[:, :48].contiguous())  # H below a tile too
    assert not takes(hidden_rows.float(), weight.float())  # fp32: FMA tiles
    assert not takes(hidden_rows[:, :36].contiguous(), weight)  # rows of 72 bytes
    storage = torch.zeros(192 * 64 + 1, dtype=torch.float16, device=device)
    assert not takes(hidden_rows, storage[1:].view(192, 64))  # a start 2 bytes past 16-byte alignment
    # Inside a trace (torch.compile), without addresses: by the offset into the storage. Host-side descriptors
    # (tma_readable) are never made there.
    with FakeTensorMode():
        fake_rows = torch.empty(8, 128, dtype=torch.float16, device=device)  # (R, max_width)
        fake_storage = torch.empty(192 * 64 + 8, dtype=torch.float16, device=device)
        assert takes(fake_rows, fake_storage[:192 * 64].view(192, 64))
        assert takes(fake_rows, fake_storage[8:].view(192, 64))  # 16 bytes in
        assert not takes(fake_rows, fake_storage[1:192 * 64 + 1].view(192, 64))
        assert not tuning.tma_readable(fake_storage[:192 * 64].view(192, 64))
    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 8 * 64 + 1)
    assert not takes(hidden_rows, weight)  # a small problem
    fits = tuning.widths_fit_k_steps
    assert fits((64, 128), 64) and fits((40, 40, 40), 64)  # multiples of the K step; one width
    assert not fits((64, 128), 128) and not fits((16, 48), 16 * 3)

    monkeypatch.setattr(tuning, "PERSISTENT_MIN_ROWS_X_HIDDEN", 0)
    monkeypatch.setattr(grouped_gemm, "persistent_weight_grad", RefuseLaunch())  # a call fails (it is not callable)
    routing = make_routing([64, 128], 16, 2, None, torch.Generator().manual_seed(0))
    rows = torch.zeros(routing.num_rows, 64, dtype=torch.float16, device=device)  # (R, H)
    hidden = torch.zeros(routing.layout.hidden_shape, dtype=torch.float16, device=device)
    weight_grad(hidden, hidden, rows, None, routing.layout)  # dW1 + dV1
    weight_grad(hidden, None, rows[:16], routing.row_to_token, routing.layout)  # gathered rows


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ["mixed_widths", "expert_without_tokens", "single_token"])
def test_weights_by_tma_same_results(case, activation, dtype, monkeypatch):
    """The two GEMMs that gather token rows (up; dA with its activation epilogue) give bit for bit the same outputs,
    copies and routing-weight gradients with the weights read by TMA (as for large 16-bit problems on Hopper) as
    with pointer loads, dA's epilogue fused as for large problems. Widths that are no multiple of the tile put the
    next expert's weight rows (or TMA's zeros past the last one) in a tile's last columns, which the stores and the
    partial sums must mask."""
    if not tuning.has_tma(torch.device(DEVICE)):
        pytest.skip("this GPU has no TMA")
    routing, h_pre, h_up, w2, grad_out = random_down_inputs(case, activation, dtype)
    _, _, _, x, w1, v1 = random_up_grad_inputs(case, is_gated(activation), dtype)
    up_args = (x, w1, v1, routing.row_to_token, routing.layout, activation, routing.routing_weights)
    down_args = (grad_out, w2, h_pre, h_up, routing.row_to_token, routing.layout, routing.routing_weights, activation)

    def run():
        sorted_x = x.new_empty(routing.num_rows, x.shape[1])
        sorted_grad_out = grad_out.new_empty(routing.num_rows, grad_out.shape[1])
        return [*up_projection(*up_args, sorted_x=sorted_x), sorted_x,
                *down_projection_backward(*down_args, sorted_grad_out=sorted_grad_out), sorted_grad_out]

    monkeypatch.setattr(tuning, "FUSED_DH_MIN_ROWS_X_HIDDEN", 0)  # relu² and gelu: TMA's tiles into the epilogue
    by_pointers = run()
    answers = []

    def recorded_weights_by_tma(weight, num_rows):
        answers.append(tuning.weights_by_tma(weight, num_rows))
        return answers[-1]

    monkeypatch.setattr(tuning, "TMA_WEIGHTS_MIN_ROWS_X_HIDDEN", 0)
    monkeypatch.setattr(grouped_gemm, "weights_by_tma", recorded_weights_by_tma)
    by_tma = run()
    assert answers and all(answers)  # every launch read its weights by TMA
    for got, want in zip(by_tma, by_pointers, strict=True):
        assert (got is None and want is None) or same(got, want)


@gpu_only
def test_tma_launches_from_a_thread_without_a_cuda_context(monkeypatch):
    """The GEMMs with host-side TMA descriptors (up and dA reading the weights by TMA, dW reading sorted rows by
    TMA) launch from a new thread after this one loaded their kernels, and give this thread's results. A new thread
    has no current CUDA context, which the driver needs to encode a descriptor, and Triton's launcher makes one
    current only after encoding; the caching allocator, which serves the new thread's outputs from the blocks this
    thread's run freed, makes none current either. So is autograd's device thread where the first backward ran
    elsewhere."""
    if not tuning.has_tma(torch.device(DEVICE)):
        pytest.skip("this GPU has no TMA")
    dtype = torch.bfloat16
    routing, h_pre, _, w2, grad_out = random_down_inputs("mixed_widths", "relu_squared", dtype)
    _, dh_pre, _, x, w1, _ = random_up_grad_inputs("mixed_widths", False, dtype)
    monkeypatch.setattr(tuning, "TMA_WEIGHTS_MIN_ROWS_X_HIDDEN", 0)
    monkeypatch.setattr(tuning, "FUSED_DH_MIN_ROWS_X_HIDDEN", 0)
    sorted_x = x[routing.row_to_token].contiguous()  # (R, H)
    assert grouped_gemm.tma_readable(sorted_x)

    def run():
        return [None if t is None else t.cpu() for t in (
            *up_projection(x, w1, None, routing.row_to_token, routing.layout, "relu_squared",
                           routing.routing_weights),
            *down_projection_backward(grad_out, w2, h_pre, None, routing.row_to_token, routing.layout,
                                      routing.routing_weights, "relu_squared"),
            *weight_grad(dh_pre, None, sorted_x, None, routing.layout, row_splits=1))]

    in_this_thread = run()
    torch.cuda.synchronize()
    outcome = {}

    def in_a_new_thread():
        context = ctypes.c_void_p()
        host._libcuda().cuCtxGetCurrent(ctypes.byref(context))
        outcome["context before"] = context.value
        try:
            outcome["results"] = run()
        except Exception as error:  # raised again below, in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=in_a_new_thread)
    thread.start()
    thread.join()
    assert outcome["context before"] is None  # the thread began without a current context
    if "error" in outcome:
        raise outcome["error"]
    for got, want in zip(outcome["results"], in_this_thread, strict=True):
        assert (got is None and want is None) or same(got, want)


@pytest.mark.parametrize(
    "tiles",
    [
        pytest.param(GemmTiles(tile_m=16, tile_n=16, tile_k=16, num_warps=1, num_stages=1), id="16x16x16"),
        pytest.param(GemmTiles(tile_m=64, tile_n=16, tile_k=64, num_warps=1, num_stages=1), id="64x16x64"),
        pytest.param(GemmTiles(tile_m=16, tile_n=64, tile_k=32, num_warps=1, num_stages=1), id="16x64x32"),
    ],
)
@pytest.mark.parametrize("activation, dh_path", [("relu_squared", "fused"), ("swiglu", "row pass")])
def test_launchers_with_other_tiles(tiles, activation, dh_path, monkeypatch):
    """Every launcher with tiles other than the default: partial tiles and partial-sum columns move around (the
    fused dA epilogue sums the routing-weight gradient over up to 13 column tiles of a row)."""
    take_dh_path(dh_path, monkeypatch)
    dtype, gated = torch.float32, is_gated(activation)
    routing, h_pre, h_up, w2, grad_out = random_down_inputs("mixed_widths", activation, dtype)
    _, dh_pre, dh_up, x, w1, v1 = random_up_grad_inputs("mixed_widths", gated, dtype)
    layout, row_to_token, routing_weights = routing.layout, routing.row_to_token, routing.routing_weights

    h_pre_out, _, h_act = up_projection(
        x, w1, v1, row_to_token, layout, activation, routing_weights, tiles=tiles
    )
    expected_pre, _, expected_act = reference_up_projection(x, w1, v1, routing, activation, routing_weights)
    assert_hidden_close(h_pre_out, expected_pre, routing, dtype)
    assert_hidden_close(h_act, expected_act, routing, dtype)
    y = down_projection(h_act, w2, layout, tiles=tiles)
    assert_close(y, reference_down_projection(h_act, w2, routing), dtype)

    expected_dh_pre, expected_dh_up, expected_d_routing_weights, expected_dw2 = reference_down_backward(
        h_pre, h_up, w2, grad_out, routing, routing_weights, activation
    )
    got_dh_pre, got_dh_up, d_routing_weights = down_projection_backward(
        grad_out, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation, tiles=tiles
    )
    assert_hidden_close(got_dh_pre, expected_dh_pre, routing, dtype)
    assert_close(d_routing_weights, expected_d_routing_weights, dtype)
    if gated:
        assert_hidden_close(got_dh_up, expected_dh_up, routing, dtype)
    else:
        assert got_dh_up is None

    expected_dx_rows, expected_dw1, expected_dv1 = reference_up_backward(dh_pre, dh_up, x, w1, v1, routing)
    dx_rows = input_grad_rows(dh_pre, w1, dh_up, v1, layout, tiles=tiles)
    assert_close(dx_rows, expected_dx_rows, dtype)
    for token_rows, row_to_token_or_none in ((x, row_to_token), (sorted_rows(x, routing), None)):
        dw1, dv1 = weight_grad(dh_pre, dh_up, token_rows, row_to_token_or_none, layout, tiles=tiles)
        assert_close(dw1, expected_dw1, dtype)
        if gated:
            assert_close(dv1, expected_dv1, dtype)
        else:
            assert dv1 is None


@pytest.mark.parametrize("row_group", [2, 3])
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu"])
def test_row_groups_same_results(activation, row_group, monkeypatch):
    """The portable GEMM's tiles in groups of row tiles (as for experts whose weight slices outgrow L2): every
    launcher's results equal the ungrouped order's bit for bit, with an expert without rows and groups that end
    short of ROW_GROUP row tiles."""
    take_dh_path("fused" if activation == "relu_squared" else "row pass", monkeypatch)
    expert_widths, hidden, num_tokens, top_k, allowed_experts = ROW_SPLIT_CASES["expert_without_tokens"]
    generator = torch.Generator().manual_seed(0)
    routing = make_routing(expert_widths, num_tokens, top_k, allowed_experts, generator)
    dtype, gated = torch.float32, is_gated(activation)
    x, grad_out = random((num_tokens, hidden), dtype, generator), random((num_tokens, hidden), dtype, generator)
    w1, w2 = random_weight(routing, hidden, dtype, generator), random_weight(routing, hidden, dtype, generator)
    v1 = random_weight(routing, hidden, dtype, generator) if gated else None
    tiles = GemmTiles(16, 32, 16, num_warps=1, num_stages=1)
    layout, row_to_token, routing_weights = routing.layout, routing.row_to_token, routing.routing_weights
    row_tiles = (layout.expert_row_offsets.diff() + tiles.tile_m - 1) // tiles.tile_m
    # an expert without rows, and one with a full group of row tiles and a short one after it
    assert 0 in row_tiles.tolist() and any(n > row_group and n % row_group for n in row_tiles.tolist())

    def run():
        sorted_x = torch.full((routing.num_rows, hidden), float("nan"), dtype=dtype, device=DEVICE)
        h_pre, h_up, h_act = forward = up_projection(x, w1, v1, row_to_token, layout, activation, routing_weights,
                                                     sorted_x=sorted_x, tiles=tiles)
        y = down_projection(h_act, w2, layout, tiles=tiles)
        backward = down_projection_backward(grad_out, w2, h_pre, h_up, row_to_token, layout, routing_weights,
                                            activation, tiles=tiles)
        dx_rows = input_grad_rows(backward[0], w1, backward[1], v1, layout, tiles=tiles)
        return [*forward, sorted_x, y, *backward, dx_rows]

    ungrouped = run()
    monkeypatch.setattr(tuning, "ROW_GROUP_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(tuning, "ROW_GROUP", row_group)
    groups = []  # each portable launch's ROW_GROUP
    monkeypatch.setattr(grouped_gemm, "row_group", lambda nbytes: groups.append(tuning.row_group(nbytes)) or groups[-1])
    for got, want in zip(run(), ungrouped, strict=True):
        assert (got is None and want is None) or same(got, want)
    assert len(groups) >= 4 and set(groups) == {row_group}


def run_all_launchers(case, activation, dtype):
    """Forward and backward through every launcher, with fixed random inputs; returns every output."""
    routing, h_pre, h_up, w2, grad_out = random_down_inputs(case, activation, dtype)
    _, dh_pre, dh_up, x, w1, v1 = random_up_grad_inputs(case, is_gated(activation), dtype)
    layout, row_to_token, routing_weights = routing.layout, routing.row_to_token, routing.routing_weights
    sorted_x = x.new_empty(routing.num_rows, x.shape[1])
    forward = up_projection(x, w1, v1, row_to_token, layout, activation, routing_weights,
                            sorted_x=sorted_x)
    y = down_projection(forward[2], w2, layout)
    sorted_grad_out = grad_out.new_empty(routing.num_rows, grad_out.shape[1])
    backward = down_projection_backward(grad_out, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation,
                                        sorted_grad_out=sorted_grad_out)
    dw2, _ = weight_grad(forward[2], None, sorted_grad_out, None, layout)
    dx_rows = input_grad_rows(dh_pre, w1, dh_up, v1, layout)
    dw1, dv1 = weight_grad(dh_pre, dh_up, x, row_to_token, layout)
    return [*forward, sorted_x, y, *backward, sorted_grad_out, dw2, dx_rows, dw1, dv1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_launchers_are_deterministic(dtype):
    first = run_all_launchers("mixed_widths", "swiglu", dtype)
    second = run_all_launchers("mixed_widths", "swiglu", dtype)
    for first_output, second_output in zip(first, second, strict=True):
        assert same(first_output, second_output)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_rows_launches_nothing(activation, monkeypatch):
    monkeypatch.setattr(grouped_gemm, "_expert_rows_gemm", RefuseLaunch())
    monkeypatch.setattr(grouped_gemm, "_weight_grad_gemm", RefuseLaunch())
    monkeypatch.setattr(grouped_gemm, "_activation_backward_rows", RefuseLaunch())
    dtype, hidden, gated = torch.float32, 32, is_gated(activation)
    generator = torch.Generator().manual_seed(0)
    routing = make_routing([64, 16, 48], 0, 2, None, generator)
    layout, row_to_token = routing.layout, routing.row_to_token
    x = grad_out = random((0, hidden), dtype, generator)  # (0, H)
    w1, v1, w2 = (random_weight(routing, hidden, dtype, generator) for _ in range(3))
    v1 = v1 if gated else None

    h_pre, h_up, h_act = up_projection(x, w1, v1, row_to_token, layout, activation,
                                       routing.routing_weights)
    assert h_pre.shape == h_act.shape == (0, 64) and (h_up is not None) == gated
    assert down_projection(h_act, w2, layout).shape == (0, hidden)
    dh_pre, dh_up, d_routing_weights = down_projection_backward(
        grad_out, w2, h_pre, h_up, row_to_token, layout, routing.routing_weights, activation
    )
    assert dh_pre.shape == (0, 64) and d_routing_weights.shape == (0,) and (dh_up is not None) == gated
    assert input_grad_rows(dh_pre, w1, dh_up, v1, layout).shape == (0, hidden)
    dw1, dv1 = weight_grad(dh_pre, dh_up, x, row_to_token, layout)
    dw2, _ = weight_grad(h_act, None, grad_out, None, layout)  # x and grad_out are [0, H], as sorted rows too
    for grad in (dw1, dw2, *([dv1] if gated else [])):
        assert torch.equal(grad, torch.zeros_like(w1))


def test_invalid_arguments_raise_value_error():
    routing, hidden, num_tokens, generator = setup_case("mixed_widths")
    x = random((num_tokens, hidden), torch.float32, generator)
    w1 = random_weight(routing, hidden, torch.float32, generator)
    row_to_token, layout = routing.row_to_token, routing.layout
    with pytest.raises(ValueError, match="activation"):
        up_projection(x, w1, None, row_to_token, layout, "tanh")
    with pytest.raises(ValueError, match="v1"):
        up_projection(x, w1, None, row_to_token, layout, "swiglu")
    with pytest.raises(ValueError, match="v1"):
        up_projection(x, w1, w1, row_to_token, layout, "gelu")
    with pytest.raises(ValueError, match="w1"):
        up_projection(x, w1.half(), None, row_to_token, layout, "gelu")
    with pytest.raises(ValueError, match="w1"):
        up_projection(x, w1[1:], None, row_to_token, layout, "gelu")
    with pytest.raises(ValueError, match="x must be contiguous"):
        up_projection(x.T.contiguous().T, w1, None, row_to_token, layout, "gelu")
    with pytest.raises(ValueError, match="row_to_token"):
        up_projection(x, w1, None, row_to_token[1:], layout, "gelu")
    with pytest.raises(ValueError, match="routing_weights"):
        up_projection(x, w1, None, row_to_token, layout, "gelu", routing.routing_weights.half())
    with pytest.raises(ValueError, match="sorted_x"):
        up_projection(x, w1, None, row_to_token, layout, "gelu", sorted_x=x[:1])
    with pytest.raises(ValueError, match="routing_weight_index needs routing_weights"):
        up_projection(x, w1, None, row_to_token, layout, "gelu", routing_weight_index=routing.row_to_flat)
    with pytest.raises(ValueError, match="routing_weight_index"):
        up_projection(x, w1, None, row_to_token, layout, "gelu", routing.flat_weights,
                      routing_weight_index=routing.row_to_flat[1:])
    hidden_rows = random_hidden(routing, torch.float32, generator)
    with pytest.raises(ValueError, match="dh_up and v1"):
        input_grad_rows(hidden_rows, w1, None, w1, layout)
    with pytest.raises(ValueError, match="dh_pre"):
        input_grad_rows(hidden_rows[:, 1:].contiguous(), w1, None, None, layout)
    with pytest.raises(ValueError, match="token_rows"):
        weight_grad(hidden_rows, None, sorted_rows(x, routing).half(), None, layout)
    with pytest.raises(ValueError, match="token_rows"):
        weight_grad(hidden_rows, None, sorted_rows(x, routing)[1:], None, layout)
    with pytest.raises(ValueError, match="needs the routing_weights"):
        weight_grad(hidden_rows, None, x, row_to_token, layout, activation="gelu")
    with pytest.raises(ValueError, match="hidden_rows2"):
        weight_grad(hidden_rows, None, x, row_to_token, layout, activation="swiglu",
                    routing_weights=routing.routing_weights)
    with pytest.raises(ValueError, match="routing_weights are for"):
        weight_grad(hidden_rows, None, x, row_to_token, layout, routing_weights=routing.routing_weights)
    with pytest.raises(ValueError, match="row_splits"):
        weight_grad(hidden_rows, None, x, row_to_token, layout, row_splits=0)
    with pytest.raises(ValueError, match="tile_n"):
        GemmTiles(tile_m=32, tile_n=8, tile_k=32, num_warps=1, num_stages=1)


@pytest.mark.skipif(DEVICE != "cpu", reason="Triton's CPU interpreter")
def test_bf16_on_the_interpreter_is_refused():
    routing, hidden, num_tokens, generator = setup_case("mixed_widths")
    x = random((num_tokens, hidden), torch.bfloat16, generator)
    w1 = random_weight(routing, hidden, torch.bfloat16, generator)
    with pytest.raises(ValueError, match="x is bf16 on the CPU"):
        up_projection(x, w1, None, routing.row_to_token, routing.layout, "gelu")


def test_invalid_layout_raises_value_error():
    routing = setup_case("mixed_widths")[0]
    row_offsets, width_offsets = routing.layout.expert_row_offsets, routing.layout.expert_width_offsets
    with pytest.raises(ValueError, match="expert_widths"):
        ExpertLayout(row_offsets, width_offsets, [64, 16, 0, 48], routing.num_rows)
    with pytest.raises(ValueError, match="expert_widths"):
        ExpertLayout(row_offsets, width_offsets, [], routing.num_rows)
    for widths in ([64.0, 16, 32, 48], [64, True, 32, 48], [64, "16", 32, 48]):
        with pytest.raises(ValueError, match="expert_widths .* an int"):
            ExpertLayout(row_offsets, width_offsets, widths, routing.num_rows)
    with pytest.raises(ValueError, match="expert_row_offsets"):
        ExpertLayout(row_offsets[1:], width_offsets, routing.expert_widths, routing.num_rows)
    with pytest.raises(ValueError, match="expert_width_offsets"):
        ExpertLayout(row_offsets, width_offsets.float(), routing.expert_widths, routing.num_rows)
    with pytest.raises(ValueError, match="num_rows"):
        ExpertLayout(row_offsets, width_offsets, routing.expert_widths, -1)


def test_gpu_tiles_by_shape_class(monkeypatch):
    """The GPU tile table (read here with the interpreter switched off): small problems, the ragged-output GEMMs
    past hidden 2048, and the rest."""
    monkeypatch.setattr(host, "_INTERPRETER", False)
    bf16 = torch.bfloat16
    assert tuning.gemm_tiles(bf16, "up", rows_x_hidden=2**23, hidden=256) == tuning.GPU_16BIT_SMALL_TILES["up"]
    assert tuning.gemm_tiles(bf16, "down_backward", rows_x_hidden=2**28, hidden=2048).num_stages == 4
    assert tuning.gemm_tiles(bf16, "down_backward", rows_x_hidden=2**27, hidden=4096).num_stages == 3
    for role in ("up", "down", "input_grad", "weight_grad"):
        assert tuning.gemm_tiles(bf16, role, rows_x_hidden=2**27, hidden=4096) == tuning.GPU_16BIT_ROLE_TILES[role]
    assert tuning.gemm_tiles(torch.float32, "up", hidden=4096) == tuning.GPU_FP32_TILES
    # A small problem's weight gradient: 64x64 tiles, 128x128 from 2^22 elements with one width (64 x 256 at 256)
    small_dw = dict(rows_x_hidden=4096 * 8 * 256, hidden=256)
    assert tuning.gemm_tiles(bf16, "weight_grad", **small_dw) == tuning.GPU_16BIT_SMALL_TILES["weight_grad"]
    assert tuning.gemm_tiles(bf16, "weight_grad", uniform_weight_elements=8 * 512 * 256,
                             **small_dw) == tuning.GPU_16BIT_SMALL_TILES["weight_grad"]
    large_dw = tuning.gemm_tiles(bf16, "weight_grad", uniform_weight_elements=64 * 256 * 256, **small_dw)
    assert (large_dw.tile_m, large_dw.tile_n) == (128, 128)
    assert tuning.gemm_tiles(bf16, "weight_grad", gated=True, uniform_weight_elements=64 * 256 * 256,
                             **small_dw) == tuning.GPU_16BIT_GATED_TILES["weight_grad"]


def test_direct_launch_keys_apart_what_triton_compiles_apart():
    """kernels.host.DirectLaunch.key, which picks the compiled kernel of an eager launch: arguments Triton compiles
    different kernels for get different keys (a tensor's dtype or 16-byte alignment, a host int against a bool, a
    float or None of equal value, the compile-time arguments, a TMA descriptor's dtype, box or padding), and an
    argument of another kind no key (Triton launches it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from triton_moe.kernels.host import DirectLaunch

    key = lambda *args, **kwargs: DirectLaunch.key(0, args, kwargs)
    storage = torch.zeros(64)
    aligned, misaligned = storage[:16], storage[1:17]
    assert key(aligned, 16) == key(torch.zeros(16), 16)
    assert key(aligned, 16) != key(misaligned, 16)
    assert key(aligned, 16) != key(aligned.half(), 16)
    for first, second in [(1, True), (0, False), (1, 1.0), (0, None), (16, 17)]:
        assert key(aligned, first) != key(aligned, second)
    assert key(aligned, 1, BLOCK=64) != key(aligned, 1, BLOCK=128)
    assert key(aligned, object()) is None

    def descriptor(matrix, box, padding="zero"):
        return TensorDescriptor(matrix, list(matrix.shape), [matrix.shape[1], 1], box, padding)

    weights = torch.zeros(64, 32)
    # Triton compiles one kernel for descriptors of one dtype and box, whatever the matrix's size and address.
    assert key(descriptor(weights, [16, 16])) == key(descriptor(torch.zeros(128, 64)[64:], [16, 16]))
    for other in (descriptor(weights, [32, 16]), descriptor(weights.half(), [16, 16]),
                  descriptor(weights, [16, 16], padding="nan"), weights):
        assert key(descriptor(weights, [16, 16])) != key(other)
