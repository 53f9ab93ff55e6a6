"""gather_rows and combine_rows against plain PyTorch."""

import pytest
import torch

from triton_moe.kernels import combine_rows, gather_rows
from triton_moe.kernels import permute
from conftest import DEVICE, DTYPES, RefuseLaunch

pytestmark = pytest.mark.usefixtures("nan_filled_outputs")

# (tokens, top_k, hidden, experts)
SHAPES = [(1, 1, 32, 4), (1, 2, 96, 4), (24, 2, 33, 8), (40, 3, 200, 5), (16, 1, 1500, 3)]


def make_permutation(num_tokens, top_k, num_experts, generator):
    """row_to_token [R] int32 and flat_to_row [N * k] int64 of a random top-k routing sorted by expert."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)  # (N, E)
    flat_experts = scores.topk(top_k, dim=1).indices.reshape(-1)  # (N * k,)
    row_to_flat = torch.sort(flat_experts, stable=True).indices  # (R,)
    return (row_to_flat // top_k).to(torch.int32).to(DEVICE), torch.argsort(row_to_flat).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, top_k, hidden, num_experts", SHAPES)
def test_gather_rows(num_tokens, top_k, hidden, num_experts, dtype):
    generator = torch.Generator().manual_seed(0)
    row_to_token, _ = make_permutation(num_tokens, top_k, num_experts, generator)
    src = torch.randn((num_tokens, hidden), generator=generator).to(device=DEVICE, dtype=dtype)  # (N, H)
    assert torch.equal(gather_rows(src, row_to_token), src[row_to_token.long()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, top_k, hidden, num_experts", SHAPES)
def test_combine_rows(num_tokens, top_k, hidden, num_experts, dtype):
    generator = torch.Generator().manual_seed(0)
    _, flat_to_row = make_permutation(num_tokens, top_k, num_experts, generator)
    rows = torch.randn((num_tokens * top_k, hidden), generator=generator).to(device=DEVICE, dtype=dtype)  # (R, H)
    out = combine_rows(rows, flat_to_row, top_k)
    # The kernel sums the slots in order in fp32 and rounds once, as this does.
    expected = rows.float()[flat_to_row].view(num_tokens, top_k, hidden)
    for slot in range(1, top_k):
        expected[:, 0] += expected[:, slot]
    assert torch.equal(out, expected[:, 0].to(dtype))


def test_combine_rows_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    _, flat_to_row = make_permutation(40, 3, 5, generator)
    rows = torch.randn((120, 96), generator=generator).to(DEVICE)  # (R, H)
    assert torch.equal(combine_rows(rows, flat_to_row, 3), combine_rows(rows, flat_to_row, 3))


def test_no_rows_launches_nothing(monkeypatch):
    monkeypatch.setattr(permute, "_gather_rows_kernel", RefuseLaunch())
    monkeypatch.setattr(permute, "_combine_rows_kernel", RefuseLaunch())
    src = torch.randn((0, 32), device=DEVICE)
    assert gather_rows(src, torch.zeros(0, dtype=torch.int32, device=DEVICE)).shape == (0, 32)
    assert combine_rows(src, torch.zeros(0, dtype=torch.int64, device=DEVICE), 2).shape == (0, 32)


def test_invalid_arguments_raise_value_error():
    rows = torch.randn((8, 32), device=DEVICE)
    flat_to_row = torch.arange(8, device=DEVICE)
    with pytest.raises(ValueError, match="flat_to_row"):
        combine_rows(rows, flat_to_row, 3)
    with pytest.raises(ValueError, match="flat_to_row"):
        combine_rows(rows, flat_to_row.float(), 2)
    with pytest.raises(ValueError, match="top_k"):
        combine_rows(rows, flat_to_row, 0)
    for top_k in (2.0, True, "2"):
        with pytest.raises(ValueError, match="top_k must be an int"):
            combine_rows(rows, flat_to_row, top_k)
    with pytest.raises(ValueError, match="src"):
        gather_rows(rows[:, ::2], flat_to_row)
    with pytest.raises(ValueError, match="src has no rows"):  # every index out of range, known on the host
        gather_rows(rows[:0], flat_to_row)
