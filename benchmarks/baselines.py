"""Baseline MoE layers the benchmarks compare against, on the same MoELayer parameters and routing.

- `LoopMoE`: a per-expert Python loop of torch.matmul (what a first implementation looks like).
- `GroupedMMMoE`: argsort, index gather, torch._grouped_mm for the up and down projections (one call per width
  class for variable widths), index_add_ combine, autograd throughout.
- `megablocks_dmoe`: megablocks' dMoE where megablocks imports (uniform widths only), else None with a reason.
The stk reference (`reference.MoEMLP`) is the fourth baseline.
"""

import torch
import torch.nn as nn

from triton_moe.activations import apply_activation
from triton_moe.layer import MoELayer
from triton_moe.routing import Routing, sort_by_expert


class LoopMoE(MoELayer):
    """One pair of matmuls per expert, tokens selected by a mask; weighted index_add_ combine."""

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        output = torch.zeros_like(x, dtype=torch.float32)  # [N, H]
        offsets = cfg.expert_width_offsets
        for expert in range(cfg.num_experts):
            tokens, slots = (routing.expert_indices == expert).nonzero(as_tuple=True)
            rows = slice(offsets[expert], offsets[expert + 1])
            x_e = x[tokens]
            h_up = x_e @ self.v1[rows].to(x.dtype).T if cfg.is_gated else None
            h_act = apply_activation(cfg.activation, x_e @ self.w1[rows].to(x.dtype).T, h_up)
            y_e = h_act @ self.w2[rows].to(x.dtype)
            output.index_add_(0, tokens, y_e.float() * routing.expert_weights[tokens, slots][:, None])
        return output.to(x.dtype)


class GroupedMMMoE(MoELayer):
    """torch._grouped_mm over the expert-sorted rows; experts of one width form one grouped call."""

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        sort = sort_by_expert(routing.expert_indices, cfg.num_experts)
        x_sorted = x[sort.row_to_token]  # [R, H]
        row_weights = routing.expert_weights.flatten()[sort.row_to_flat]  # [R]
        row_offsets = sort.expert_row_offsets.tolist()  # host values to slice each width class's rows
        y_parts, first_expert = [], 0
        for count, width in cfg.expert_sizes:
            experts = slice(first_expert, first_expert + count)
            rows = slice(row_offsets[first_expert], row_offsets[first_expert + count])
            weight_rows = slice(cfg.expert_width_offsets[first_expert],
                                cfg.expert_width_offsets[first_expert + count])
            group_ends = (sort.expert_row_offsets[experts.start + 1:experts.stop + 1]
                          - row_offsets[first_expert]).to(torch.int32)  # [count]
            as_groups = lambda w: w[weight_rows].to(x.dtype).view(count, width, cfg.hidden_size)  # [count, W, H]
            x_class = x_sorted[rows]
            h_pre = torch._grouped_mm(x_class, as_groups(self.w1).transpose(1, 2), offs=group_ends)
            h_up = torch._grouped_mm(x_class, as_groups(self.v1).transpose(1, 2), offs=group_ends) \
                if cfg.is_gated else None
            h_act = apply_activation(cfg.activation, h_pre, h_up)
            y_parts.append(torch._grouped_mm(h_act, as_groups(self.w2), offs=group_ends))
            first_expert += count
        y_sorted = torch.cat(y_parts) * row_weights[:, None].to(x.dtype)  # [R, H]
        return torch.zeros_like(x).index_add_(0, sort.row_to_token, y_sorted)


def megablocks_dmoe(config, device, dtype):
    """(layer, None) with megablocks' dMoE for a uniform-width config, or (None, reason it is skipped)."""
    if not config.uniform_width:
        return None, "megablocks supports one expert width only"
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as error:  # megablocks does not import at all without its CUDA extension
        return None, f"megablocks does not import here ({type(error).__name__}: {error})"
    args = Arguments(hidden_size=config.hidden_size, ffn_hidden_size=config.expert_widths[0],
                     moe_num_experts=config.num_experts, moe_top_k=config.num_active_experts,
                     mlp_type="mlp", mlp_impl="sparse", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     device=device)
    return _Megablocks(dMoE(args)), None


class _Megablocks(nn.Module):
    """dMoE takes [seq, batch, hidden] and returns (output, bias): adapt it to [N, hidden] -> [N, hidden]."""

    def __init__(self, dmoe):
        super().__init__()
        self.dmoe = dmoe

    def forward(self, x):
        return self.dmoe(x[:, None, :])[0][:, 0, :]
