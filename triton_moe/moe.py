"""MoEMLP: the topology-free Triton Mixture-of-Experts MLP. What a user imports.

One forward (N tokens, k = top-k, E experts of widths W_e, R = N * k rows):
    route            x [N, H] -> expert_weights, expert_indices [N, k], aux_loss      (router_ops.fused_route)
    sort by expert   -> row_to_token [R], expert_row_offsets [E+1]             (router_ops.fused_sort_by_expert)
    layout           -> where each expert's rows and ragged hidden block lie           (ops.ExpertLayout)
    expert_mlp       gather + up + activation * routing weight, down, combine -> [N, H] (ops.py -> kernels/)
No padding and no sparse topology: each kernel program finds its (expert, row tile, column tile) from the
offsets. Any width >= 1 works, and experts of different widths share one layer.
"""

import torch

from triton_moe.config import MoEConfig
from triton_moe.kernels import down_projection, gather_rows, up_projection
from triton_moe.layer import MoELayer
from triton_moe.ops import ExpertLayout, expert_mlp
from triton_moe.router_ops import FusedRouting, fused_route, fused_sort_by_expert


class MoEMLP(MoELayer):
    """Drop-in MoE MLP for a nanoGPT Block: [..., hidden] -> [..., hidden]; see MoELayer for the parameters."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("expert_width_offsets", torch.tensor(config.expert_width_offsets), persistent=False)
        self.register_buffer("expert_widths_tensor", torch.tensor(config.expert_widths), persistent=False)

    def _route(self, x: torch.Tensor) -> FusedRouting:
        """routing.route's results in two kernels after the router GEMM, plus the counts the sort reuses."""
        return fused_route(x, self.router.weight, self.config)

    def _experts(self, x: torch.Tensor, routing: FusedRouting, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        dtype = self.compute_dtype(x)
        # rows by expert, then token, then slot: routing.sort_by_expert's result, from the route's counts
        sort = fused_sort_by_expert(routing.expert_indices, cfg.num_experts, routing.block_offsets)
        layout = ExpertLayout.from_sort(sort, cfg.expert_widths, self.expert_width_offsets,
                                        self.expert_widths_tensor, cfg.num_active_experts)
        x, w1, w2 = x.to(dtype), self.w1.to(dtype), self.w2.to(dtype)
        v1 = self.v1.to(dtype) if cfg.is_glu else None
        output = expert_mlp(x, routing.expert_weights.flatten(), w1, v1, w2, layout, cfg.activation,
                            cfg.keep_sorted_x)  # [N, H]
        if intermediates is not None:
            intermediates.update(self._debug_intermediates(x, w1, v1, w2, sort, layout))
        return output

    @torch.no_grad()
    def _debug_intermediates(self, x, w1, v1, w2, sort, layout: ExpertLayout) -> dict:
        """The tensors the fused path never materialises, recomputed step by step by the same kernels."""
        h_pre, h_up, h_act = up_projection(x, w1, v1, layout.row_to_token, *layout.offsets(), layout.h_numel,
                                           self.config.activation)
        y_expert = down_projection(h_act, w2, *layout.offsets(), layout.num_rows)  # [R, H], unweighted
        sizes = (sort.tokens_per_expert.cpu() * self.expert_widths_tensor.cpu()).tolist()
        to_rows = lambda ragged: [block.view(-1, width) for block, width in
                                  zip(ragged.split(sizes), self.config.expert_widths)]
        result = dict(tokens_per_expert=sort.tokens_per_expert, row_to_token=sort.row_to_token,
                      x_gathered=gather_rows(x, layout.row_to_token), h_pre=to_rows(h_pre), h_act=to_rows(h_act),
                      y_expert=y_expert)
        if h_up is not None:
            result["h_up"] = to_rows(h_up)
        return result
