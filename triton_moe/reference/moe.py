"""The stk reference MoEMLP: block-sparse expert MLPs (megablocks' dMoE design) for variable expert widths.

One forward:
    route -> sort rows by expert -> pad each expert's rows to BLOCK_SIZE -> build the topology
    -> up projection (stk.ops.sdd) -> activation on the nonzero blocks -> down projection (stk.ops.dsd)
    -> un-pad -> weight by the routing weights and sum the k rows of each token.
The backward is autograd through stk's sdd/dsd Functions and the torch ops around them.
"""

import stk
import torch

from triton_moe.activations import apply_activation
from triton_moe.config import MoEConfig
from triton_moe.layer import MoELayer
from triton_moe.reference.topology_var import build_topology
from triton_moe.routing import Routing, sort_by_expert

BLOCK_SIZE = 128  # stk's block, fixed in its kernels: the widths and hidden_size must be multiples of it


def check_block_aligned(config: MoEConfig) -> None:
    """Raise a ValueError unless every width and hidden_size is a multiple of BLOCK_SIZE (stk's need)."""
    for width in sorted(set(config.expert_widths)):
        if width % BLOCK_SIZE:
            raise ValueError(
                f"expert_sizes: width {width} is not a multiple of stk's block size {BLOCK_SIZE}; "
                "the stk reference needs block-aligned widths (the Triton MoEMLP does not)"
            )
    if config.hidden_size % BLOCK_SIZE:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of stk's block size {BLOCK_SIZE}, "
            "which the stk reference needs"
        )


class MoEMLP(MoELayer):
    """Reference MoE MLP on stk block-sparse products; needs widths and hidden_size multiples of BLOCK_SIZE."""

    def __init__(self, config: MoEConfig):
        check_block_aligned(config)
        super().__init__(config)

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        num_tokens, hidden = x.shape
        dtype = self.compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            w1, w2 = self.w1.to(dtype), self.w2.to(dtype)
            sort = sort_by_expert(routing.expert_indices, cfg.num_experts)
            topology, padded_row_offsets, block_rows_per_expert = build_topology(sort.tokens_per_expert, cfg,
                                                                                 BLOCK_SIZE)

            # Row r of expert e moves to padded row padded_row_offsets[e] + (r - expert_row_offsets[e]).
            row_expert = sort.row_expert.long()  # [N*k]
            rank_in_expert = torch.arange(row_expert.numel(), device=x.device) - sort.expert_row_offsets[row_expert]
            padded_rows = padded_row_offsets[row_expert] + rank_in_expert  # [N*k]
            sorted_x = x[sort.row_to_token]  # [N*k, hidden]
            x_padded = x.new_zeros(topology.size()[0], hidden).index_copy(0, padded_rows, sorted_x)

            h_pre = stk.ops.sdd(x_padded, w1.t(), topology)  # block-sparse [padded_rows, total_width]
            if cfg.is_gated:
                h_up = stk.ops.sdd(x_padded, self.v1.to(dtype).t(), topology)
                h_act_data = apply_activation(cfg.activation, h_pre.data, h_up.data)
            else:
                h_act_data = apply_activation(cfg.activation, h_pre.data, None)
            h_act = _with_data(h_pre, h_act_data)
            y_padded = stk.ops.dsd(h_act, w2)  # [padded_rows, hidden]
            y_expert = y_padded[padded_rows]  # [N*k, hidden]

            sorted_routing_weights = routing.routing_weights.flatten()[sort.row_to_flat]  # [N*k] fp32
            y_weighted = y_expert.float() * sorted_routing_weights[:, None]  # [N*k, hidden] fp32
            # Back to (token, slot) order and a sum over the k slots: deterministic, unlike index_add_.
            k = cfg.num_active_experts
            output = y_weighted[sort.flat_to_row].view(num_tokens, k, hidden).sum(dim=1).to(dtype)

        if intermediates is not None:
            to_rows = lambda blocks: _blocks_to_expert_rows(blocks, sort.tokens_per_expert, block_rows_per_expert,
                                                            cfg, BLOCK_SIZE)
            intermediates.update(
                tokens_per_expert=sort.tokens_per_expert, row_to_token=sort.row_to_token,
                sorted_x=sorted_x, h_pre=to_rows(h_pre.data), h_act=to_rows(h_act_data), y_expert=y_expert,
            )
            if cfg.is_gated:
                intermediates["h_up"] = to_rows(h_up.data)
        return output


def _with_data(matrix: stk.Matrix, data: torch.Tensor) -> stk.Matrix:
    """A matrix with `matrix`'s topology and new block values `data` [nnz, bs, bs]."""
    return stk.Matrix(matrix.size(), data, matrix.row_indices, matrix.column_indices, matrix.offsets,
                      matrix.column_indices_t, matrix.offsets_t, matrix.block_offsets_t)


def _blocks_to_expert_rows(blocks, tokens_per_expert, block_rows_per_expert, config: MoEConfig, bs: int):
    """Nonzero blocks [nnz, bs, bs] -> list of E dense [count_e, width_e] (padding rows dropped)."""
    counts = tokens_per_expert.tolist()
    per_expert, first_block = [], 0
    for expert, width in enumerate(config.expert_widths):
        block_rows, block_cols = block_rows_per_expert[expert], width // bs
        expert_blocks = blocks[first_block:first_block + block_rows * block_cols]
        dense = expert_blocks.view(block_rows, block_cols, bs, bs).permute(0, 2, 1, 3).reshape(block_rows * bs, width)
        per_expert.append(dense[:counts[expert]])
        first_block += block_rows * block_cols
    return per_expert
