"""The variable-width block-sparse topology of the reference against the dense block pattern it encodes."""

import torch

from conftest import DEVICE
from triton_moe.reference.topology_var import build_topology
from triton_moe import MoEConfig


def test_topology_is_block_diagonal_by_expert():
    config = MoEConfig(expert_sizes=[(2, 256), (1, 128), (1, 384)], num_active_experts=1, hidden_size=128)
    tokens_per_expert = torch.tensor([130, 0, 5, 128], device=DEVICE)
    bs = 128
    topology, padded_row_offsets, block_rows_per_expert = build_topology(tokens_per_expert, config, bs)
    assert padded_row_offsets.tolist() == [0, 256, 256, 384, 512]
    assert block_rows_per_expert == [2, 0, 1, 1]
    assert tuple(topology.size()) == (512, config.total_width)

    # Expected pattern: expert e's padded block rows meet exactly expert e's block columns.
    expected = torch.zeros(512 // bs, config.total_width // bs, dtype=torch.bool)
    for e in range(config.num_experts):
        rows = slice(padded_row_offsets[e].item() // bs, padded_row_offsets[e + 1].item() // bs)
        cols = slice(config.expert_width_offsets[e] // bs, config.expert_width_offsets[e + 1] // bs)
        expected[rows, cols] = True
    rows, cols = topology.row_indices.long().cpu(), topology.column_indices.long().cpu()
    got = torch.zeros_like(expected)
    got[rows, cols] = True
    assert torch.equal(got, expected) and rows.numel() == expected.sum()
    # BCSR: blocks in row-major order, offsets delimit each block row.
    assert torch.equal(topology.offsets.cpu().diff(), expected.sum(1).int())
    assert torch.all(rows.diff() >= 0)

    # Transpose: offsets_t delimit each block column; block_offsets_t point at blocks of that column, in row order.
    block_offsets_t = topology.block_offsets_t.long().cpu()
    assert torch.equal(topology.offsets_t.cpu().diff(), expected.sum(0).int())
    offsets_t = topology.offsets_t.long().cpu()
    for col in range(expected.shape[1]):
        blocks = block_offsets_t[offsets_t[col]:offsets_t[col + 1]]
        assert torch.all(cols[blocks] == col)
        assert torch.equal(topology.column_indices_t.long().cpu()[offsets_t[col]:offsets_t[col + 1]], rows[blocks])
        assert torch.all(rows[blocks].diff() > 0)
