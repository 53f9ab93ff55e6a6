"""MoEMLP: the topology-free Triton Mixture-of-Experts MLP. What a user imports.

One forward (N tokens, k = top-k, E experts of widths W_e, R = N * k rows):
    route            x [N, H] -> routing_weights, expert_indices [N, k], aux_loss      (router_ops.fused_route)
    sort by expert   -> row_to_token [R], expert_row_offsets [E+1]             (router_ops.fused_sort_by_expert)
    expert_mlp       gather + up + activation * routing weight, down, combine -> [N, H] (ops.py -> kernels/)
Eager, the three run as one autograd node (layer_ops.moe_layer), or replay it from CUDA graphs where
enable_cuda_graphs asks for it (layer_graphs.py); under torch.compile, as the custom ops of router_ops.py and
ops.py. No sparse topology and no padding of the rows: each kernel program finds its (expert, row tile, column
tile) from the offsets (kernels/layout.py). Any width >= 1 works, and experts of different widths share one layer.
"""

import torch
import torch.nn as nn

from triton_moe.config import MoEConfig, check_bool
from triton_moe.kernels import ExpertLayout, down_projection, gather_rows, up_projection
from triton_moe.layer import MoELayer, check_model
from triton_moe.layer_graphs import LayerGraphs
from triton_moe.layer_ops import moe_layer
from triton_moe.ops import expert_mlp
from triton_moe.router_ops import FusedRouting, fused_route, fused_sort_by_expert


class MoEMLP(MoELayer):
    """Drop-in MoE MLP for a nanoGPT Block: [..., hidden] -> [..., hidden]; see MoELayer for the parameters."""

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("expert_width_offsets", torch.tensor(config.expert_width_offsets), persistent=False)
        self.cuda_graphs = None  # a LayerGraphs where enable_cuda_graphs turned them on

    def _layout_buffers(self) -> dict[str, list[int]]:
        return {**super()._layout_buffers(), "expert_width_offsets": self.config.expert_width_offsets}

    def __getstate__(self):
        # A copy keeps the setting but not the captures, which belong to this layer's tensors.
        state = super().__getstate__()
        return {**state, "cuda_graphs": None if self.cuda_graphs is None else LayerGraphs()}

    def _route_and_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eager: the route, the sort and the expert MLP as one autograd node (layer_ops.moe_layer), for less host
        time per step, or that node replayed from CUDA graphs (layer_graphs.LayerGraphs) where they are on. Under
        torch.compile, and without tokens: _route, then _experts, over the custom ops."""
        if torch.compiler.is_compiling() or x.numel() == 0:
            return super()._route_and_experts(x)
        run = moe_layer if self.cuda_graphs is None else self.cuda_graphs
        return run(x, self.router.weight, self.w1, self.v1, self.w2, self.expert_width_offsets, self.config,
                   self.compute_dtype(x))

    def _route(self, x: torch.Tensor) -> FusedRouting:
        """routing.route's results in two kernels after the router GEMM, plus the counts the sort reuses."""
        return fused_route(x, self.router.weight, self.config)

    def _count_tokens_per_expert(self, routing: FusedRouting) -> torch.Tensor:
        return routing.sort_tables.tokens_per_expert  # counted by the route for the sort

    def _experts(self, x: torch.Tensor, routing: FusedRouting, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        dtype = self.compute_dtype(x)
        # rows by expert, then token, then slot: routing.sort_by_expert's result, from the route's counts
        sort = fused_sort_by_expert(routing.expert_indices, cfg.num_experts, routing.sort_tables)
        # x and the weights in their own dtypes: expert_mlp casts them to the compute dtype inside, and writes the
        # output in x's dtype
        output = expert_mlp(x, routing.routing_weights.flatten(), self.w1, self.v1, self.w2, sort,
                            self.expert_width_offsets, cfg.expert_widths, cfg.activation, cfg.keep_sorted_x,
                            dtype)  # [N, H]
        if intermediates is not None:
            v1 = self.v1.to(dtype) if cfg.is_gated else None
            intermediates.update(self._debug_intermediates(x.to(dtype), self.w1.to(dtype), v1, self.w2.to(dtype),
                                                           sort))
        return output

    @torch.no_grad()
    def _debug_intermediates(self, x, w1, v1, w2, sort) -> dict:
        """The tensors the fused path never materialises, recomputed step by step by the same kernels."""
        layout = ExpertLayout(sort.expert_row_offsets, self.expert_width_offsets, self.config.expert_widths,
                              sort.row_to_token.shape[0])
        h_pre, h_up, h_act = up_projection(x, w1, v1, sort.row_to_token, layout, self.config.activation)
        y_expert = down_projection(h_act, w2, layout)  # [R, H], unweighted
        row_offsets = sort.expert_row_offsets.tolist()
        per_expert = lambda hidden: [hidden[row_offsets[e]:row_offsets[e + 1], :width]
                                     for e, width in enumerate(self.config.expert_widths)]
        result = dict(tokens_per_expert=sort.tokens_per_expert, row_to_token=sort.row_to_token,
                      sorted_x=gather_rows(x, sort.row_to_token), h_pre=per_expert(h_pre),
                      h_act=per_expert(h_act), y_expert=y_expert)
        if h_up is not None:
            result["h_up"] = per_expert(h_up)
        return result


def enable_cuda_graphs(model: nn.Module, enabled: bool = True) -> int:
    """Replay every MoEMLP of `model` from CUDA graphs in eager training steps, or stop (enabled=False, which frees
    the graphs); returns how many layers it set.

    Each layer captures its forward and backward at its first training forward of an input shape, and replays them
    from then on, with eager's results bit for bit; a forward that a replay cannot serve runs eagerly
    (layer_graphs.py says when: without gradients, under activation checkpointing, a second forward before the
    first one's backward). It takes the host's time out of small models' eager steps, and holds each layer's
    activations between steps. torch.compile ignores it: its own modes graph the layer.
    """
    check_model(model)
    check_bool("enabled", enabled)
    layers = [module for module in model.modules() if isinstance(module, MoEMLP)]
    for layer in layers:
        if not enabled:
            layer.cuda_graphs = None
        elif layer.cuda_graphs is None:
            layer.cuda_graphs = LayerGraphs()
    return len(layers)
